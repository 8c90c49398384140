"""Stop strings: checking them, and finding or cutting at the earliest one in a text.

Generation (:mod:`codellama.generation`) ends a row once its text holds a stop string;
streaming (:mod:`codellama.streaming`) holds back a tail that may begin one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .errors import PromptError
from .tokenizer import check_text


def first_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[int, int] | None:
    """(offset, index into ``stops``) of the earliest stop string in ``text[start:]``."""
    found = [(i, k) for k, stop in enumerate(stops) if (i := text.find(stop, start)) >= 0]
    return min(found) if found else None


def cut_at_stop(text: str, stops: Sequence[str], start: int = 0) -> str:
    """``text`` up to (not including) its earliest stop string at or after ``start``."""
    hit = first_stop(text, stops, start)
    return text if hit is None else text[: hit[0]]


def stop_overlap(text: str, stop: str) -> int:
    """The largest ``k < len(stop)`` such that ``text`` ends with ``stop[:k]`` (0 if none):
    how much of ``text``'s tail may be the start of ``stop``.

    Only tails that end with ``text``'s last few characters can qualify, so the candidates
    are where those characters occur in ``stop`` (found by ``str.rfind``), longest first;
    a step of a stream with long stop strings costs about their length, not its square.
    """
    top = min(len(stop) - 1, len(text))
    m = min(top, 8)
    if m <= 0:
        return 0
    tail = text[-m:]
    end = top
    while end > m:
        p = stop.rfind(tail, 0, end)  # the last occurrence ending at or before ``end``
        if p <= 0:  # none, or k == m: tried below
            break
        if text.endswith(stop[: p + m]):
            return p + m
        end = p + m - 1
    return next((k for k in range(m, 0, -1) if text.endswith(stop[:k])), 0)


def check_stop_strings(stop: object) -> tuple[str, ...]:
    """A stop string or a list of them, as a tuple of non-empty strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, Iterable) or isinstance(stop, (bytes, dict)):
        raise PromptError(f"stop strings must be a str or a list of str, got {stop!r:.80}")
    texts = tuple(stop)
    bad = [t for t in texts if not isinstance(t, str) or not t]
    if bad:
        raise PromptError(
            f"stop strings must be non-empty strings, got {bad[:3]!r:.80} in {texts!r:.80}"
        )
    for i, text in enumerate(texts):
        check_text(text, f"stop string {i}")  # a lone surrogate: no text can hold it
    return texts
