"""Streaming text: each row's decoded text as its tokens come, cut at stop strings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from .stops import stop_overlap

FinishReason = Literal["stop", "length"]
"""Why a row ended: ``"stop"`` (a stop token or stop string), ``"length"`` (``max_gen_len``
tokens, or the row reached ``max_seq_len``)."""
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
    logprob: float | None = None  # the token's log-probability, when asked for


class IncrementalDecoder:
    """``decode(tokens)`` for one row's growing token list, decoding only its newest tokens.

    SentencePiece decodes left to right: later tokens append to a prefix's text, except where
    a character spelt in byte pieces spans the cut (unfinished, it decodes to U+FFFD) and for
    the first piece's leading space, which is dropped. So once a prefix ``tokens[:s]`` is
    settled, the text is the prefix's plus what ``tokens[w:]`` adds to the text of
    ``tokens[w:s]``, ``w`` a plain piece (``plain``: not a byte, control or unused piece)
    shortly before ``s``, at which both decodes are in the same state. Every SETTLE tokens
    the cut moves on, where a whole decode confirms that the parts add up; a row of n tokens
    then costs O(n^2 / SETTLE) to decode as it grows instead of O(n^2) (0.5 ms per call at
    4,000 tokens with Code Llama's tokenizer, for every row and step of a long stream).
    """

    SETTLE = 32

    def __init__(self, decode: Callable[[Sequence[int]], str], plain: Callable[[int], bool]):
        self.decode = decode
        self.plain = plain
        self.settled = 0  # s: the tokens whose text is `head`
        self.head = ""
        self.start = 0  # w: the context's first token; `context` is the text of tokens[w:s]
        self.context = ""

    def __call__(self, tokens: Sequence[int]) -> str:
        text = None
        if self.settled:
            window = self.decode(tokens[self.start :])
            if window.startswith(self.context):
                text = self.head + window[len(self.context) :]
        if text is None:  # nothing settled yet (or the row was replaced): a whole decode
            self.settled = 0
            text = self.decode(tokens)
        if len(tokens) - self.settled >= 2 * self.SETTLE:
            self._settle(tokens, text)
        return text

    def _settle(self, tokens: Sequence[int], text: str) -> None:
        """Move the cut to SETTLE tokens before the end, if the parts add up to ``text``."""
        s = len(tokens) - self.SETTLE
        w = next((i for i in range(s - 1, max(s - 16, 0), -1) if self.plain(tokens[i])), None)
        if w is None:
            return
        head, context = self.decode(tokens[:s]), self.decode(tokens[w:s])
        if head.endswith(_UNFINISHED) or context.endswith(_UNFINISHED):
            return  # a character may go on past s
        window = self.decode(tokens[w:])
        if window.startswith(context) and head + window[len(context) :] == text:
            self.settled, self.head, self.start, self.context = s, head, w, context


class TextAssembler:
    """Turns one row's growing token list into text pieces.

    A piece never holds an unfinished UTF-8 character (SentencePiece's byte pieces decode
    to U+FFFD until the character is complete) nor a tail that could be the start of a
    stop string, since the finished text is cut there; both are sent once settled.
    """

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        stops: Sequence[str] = (),
        plain: Callable[[int], bool] | None = None,
    ):
        """``plain``: the tokenizer's :meth:`~codellama.Tokenizer.is_plain_piece`, to decode
        only the newest tokens (see :class:`IncrementalDecoder`)."""
        self.decode = decode if plain is None else IncrementalDecoder(decode, plain)
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
        return max((stop_overlap(text, stop) for stop in self.stops), default=0)
