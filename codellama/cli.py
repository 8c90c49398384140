"""Running the package's command-line tools (``python -m codellama.reshard`` and others)."""

from __future__ import annotations

import sys
from typing import Any

from .errors import CodeLlamaError


def run(component: Any) -> None:
    """``fire.Fire(component)``; codellama's own errors, which name the problem and its fix,
    are printed as one line (``ConfigError: ...``) and exit with status 1, not a traceback.
    Text the terminal cannot show (model output on an ASCII locale) is printed escaped."""
    import fire

    for stream in (sys.stdout, sys.stderr):  # generated text on an ASCII-only terminal
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        fire.Fire(component)
    except CodeLlamaError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
