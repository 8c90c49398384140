"""Running the package's command-line tools (``python -m codellama.reshard`` and others)."""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import CodeLlamaError

_FLAG = re.compile(r"^--|^-[a-zA-Z]")  # what fire takes for a flag (not "-1", a number)


def run(component: Any) -> None:
    """``fire.Fire(component)``, after refusing options the command lacks (see
    :func:`unknown_options`); codellama's own errors, which name the problem and its fix,
    are printed as one line (``ConfigError: ...``) and exit with status 1, not a traceback.
    Text the terminal cannot show (model output on an ASCII locale) is printed escaped."""
    import fire

    problem = unknown_options(component, sys.argv[1:])
    if problem:
        print(f"ERROR: {problem}", file=sys.stderr)
        raise SystemExit(2)
    for stream in (sys.stdout, sys.stderr):  # generated text on an ASCII-only terminal
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        fire.Fire(component)
    except CodeLlamaError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def check_generation_options(temperature: float, top_p: float, max_gen_len: int | None) -> None:
    """Refuse bad sampling options before a model loads (minutes for 34B/70B on every
    rank), with the error the generation call would raise after it."""
    from .sampling import SamplingParams, check_max_gen_len

    SamplingParams(temperature=temperature, top_p=top_p)
    if max_gen_len is not None:
        check_max_gen_len(max_gen_len)


def unknown_options(component: Callable[..., Any] | dict[str, Any], argv: Sequence[str]) -> str:
    """What is wrong with ``argv`` for ``component`` (a function, or a dict of commands
    named by the first argument), or ``""``: a misspelt option or a value too many.

    Fire calls the function with the options it knows and only then reports the others (a
    HumanEval run, a converted checkpoint later, with defaults the user did not ask for);
    this checks first, as fire would parse: ``--name value``, ``--name=value``, ``--name``
    and ``--noname`` for bools, ``-n`` for the one option starting with n, ``-`` in names
    read as ``_``, and anything after a bare ``--`` left to fire itself."""
    args = list(argv)
    if "--" in args:
        args = args[: args.index("--")]
    fn: Any = component
    if isinstance(component, dict):
        if not args or args[0] not in component:
            return ""  # fire lists the commands, before running any
        fn, args = component[args[0]], args[1:]
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return ""
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return ""
    names = [n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL]
    given: set[str] = set()
    values: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not _FLAG.match(arg):
            values.append(arg)
            continue
        key, has_value = arg.lstrip("-").split("=", 1)[0].replace("-", "_"), "=" in arg
        if key in ("help", "h"):
            return ""  # fire shows the help, running nothing
        name = _option(key, names)
        if name is None:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            return f"unknown option {arg.split('=', 1)[0]!r}{hint}; the options are " + ", ".join(
                f"--{n}" for n in names
            )
        given.add(name)
        if not has_value and i < len(args) and not _FLAG.match(args[i]):
            i += 1  # its value
    free = [n for n in names if n not in given]
    if len(values) > len(free):
        extra = values[len(free) :]
        return (
            f"unexpected value(s) {extra}: every option is given already"
            + (f" (positionally: {', '.join(free)})" if free else "")
            + "; pass options as --name value"
        )
    return ""


def _option(key: str, names: Sequence[str]) -> str | None:
    """The parameter ``key`` names as fire reads it (the name, ``no`` + a name, or the one
    name starting with a single letter), or None."""
    if key in names:
        return key
    if key.startswith("no") and key[2:] in names:
        return key[2:]
    if len(key) == 1:
        starting = [n for n in names if n[0] == key]
        if starting:
            return starting[0]  # several: fire refuses it as ambiguous, before running
    return None
