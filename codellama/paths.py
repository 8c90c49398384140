"""Where codellama keeps files it writes for itself (compiled kernels, the demo checkpoint,
benchmark checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$CODELLAMA_CACHE``, else ``$XDG_CACHE_HOME/codellama``, else ``~/.cache/codellama``;
    an empty variable counts as unset (as the XDG spec says), never as the current folder."""
    own = os.environ.get("CODELLAMA_CACHE")
    if own:
        return Path(own)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "codellama"
