"""Where codellama keeps files it writes for itself (compiled kernels, the demo checkpoint,
benchmark checkpoints)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """``$CODELLAMA_CACHE``, else ``$XDG_CACHE_HOME/codellama``, else ``~/.cache/codellama``;
    an empty variable counts as unset (as the XDG spec says), never as the current folder.
    A process with no home (no $HOME, a user id without a passwd entry, as in some
    containers) uses ``codellama-<uid>`` in the temporary folder."""
    own = os.environ.get("CODELLAMA_CACHE")
    if own:
        return Path(own)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "codellama"
    try:
        return Path.home() / ".cache" / "codellama"
    except (RuntimeError, KeyError):  # pathlib cannot tell where home is
        uid = os.getuid() if hasattr(os, "getuid") else 0
        return Path(tempfile.gettempdir()) / f"codellama-{uid}"
