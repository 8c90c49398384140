"""Running the package's command-line tools (``python -m codellama.reshard`` and others)."""

from __future__ import annotations

import sys
from typing import Any

from .errors import CodeLlamaError


def run(component: Any) -> None:
    """``fire.Fire(component)``; codellama's own errors, which name the problem and its fix,
    are printed as one line (``ConfigError: ...``) and exit with status 1, not a traceback."""
    import fire

    try:
        fire.Fire(component)
    except CodeLlamaError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
