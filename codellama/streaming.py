"""Streaming text: each row's decoded text as its tokens come, cut at stop strings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length"]
_UNFINISHED = "\ufffd"  # what SentencePiece decodes an incomplete UTF-8 character to


@dataclass(frozen=True)
class StreamEvent:
    """One step of one row: ``text`` is what to append to that row's output so far.

    The texts of a row's events add up to exactly the text the non-streaming call returns.
    ``finish_reason`` (and ``stop_string``, if one ended it) is set on the row's last event.
    """

    index: int  # the prompt's (or dialog's) place in the caller's list
    text: str
    token: int | None  # the token just generated; None when the row ended without one
    finish_reason: FinishReason | None = None
    stop_string: str | None = None


class TextAssembler:
    """Turns one row's growing token list into text pieces.

    A piece never holds an unfinished UTF-8 character (SentencePiece's byte pieces decode
    to U+FFFD until the character is complete) nor a tail that could be the start of a
    stop string, since the finished text is cut there; both are sent once settled.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str] = ()):
        self.decode = decode
        self.stops = tuple(stops)
        self.sent = ""

    def push(self, tokens: Sequence[int], final_text: str | None = None) -> str:
        """The new text for ``tokens`` (all of the row's tokens so far); with ``final_text``
        (the row has ended: its whole text) the rest of it."""
        if final_text is not None:
            piece = final_text[len(self.sent) :] if final_text.startswith(self.sent) else ""
            self.sent = final_text
            return piece
        text = self.decode(tokens).rstrip(_UNFINISHED)
        text = text[: len(text) - self._stop_prefix(text)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
