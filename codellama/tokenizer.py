"""SentencePiece tokenizer with Code Llama's infilling and dialog-step pieces."""

from __future__ import annotations

import functools
import operator
import os
from collections.abc import Iterable, Sequence

from sentencepiece import SentencePieceProcessor

from .errors import CheckpointError, CheckpointNotFoundError, ConfigError, PromptError, is_flag

# Text, or its bytes: never a list of token ids (a bytearray is a Sequence of ints).
TEXTLIKE = (str, bytes, bytearray, memoryview)
_SMILEY = "☺"  # a piece that encodes on its own, used to drop SentencePiece's leading space


class Tokenizer:
    """Meta's Code Llama tokenizer interface over a SentencePiece model file.

    ``prefix_id``/``middle_id``/``suffix_id``/``eot_id`` are None for vocabularies without
    infilling pieces (Code Llama - Python, 34B, 70B); ``step_id`` is set only for the 70B
    Instruct vocabulary.
    """

    def __init__(self, model_path: str | os.PathLike[str]):
        if not isinstance(model_path, (str, os.PathLike)):
            raise ConfigError(
                f"tokenizer path must be a str or os.PathLike, got "
                f"{type(model_path).__name__}: {model_path!r:.60}"
            )
        path = os.fspath(model_path)
        if os.path.isdir(path):
            raise CheckpointNotFoundError(
                f"tokenizer path {path!r} is a directory, not a file; pass the tokenizer.model "
                f"file itself (e.g. {os.path.join(path, 'tokenizer.model')!r})"
            )
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(
                f"tokenizer file {path!r} does not exist; pass the tokenizer.model that came "
                "with the checkpoint (e.g. CodeLlama-7b/tokenizer.model)"
            )
        self.model_path = path
        try:
            self.sp_model = SentencePieceProcessor(model_file=path)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError variants
            raise CheckpointError(
                f"{path!r} is not a SentencePiece model ({exc}); pass tokenizer.model"
            ) from exc
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        if self.bos_id < 0 or self.eos_id < 0:  # encode(bos=True) would prepend -1
            raise CheckpointError(
                f"{path!r} has no BOS/EOS pieces (bos_id {self.bos_id}, eos_id {self.eos_id}); "
                "Code Llama's tokenizer.model has <s>=1 and </s>=2: pass the tokenizer that "
                "came with the checkpoint"
            )
        self.prefix_id: int | None = self._piece_id("▁<PRE>")
        self.middle_id: int | None = self._piece_id("▁<MID>")
        self.suffix_id: int | None = self._piece_id("▁<SUF>")
        self.eot_id: int | None = self._piece_id("▁<EOT>")
        self.step_id: int | None = self._piece_id("<step>")
        self._smiley_id = self._piece_id(_SMILEY)

    def _piece_id(self, piece: str) -> int | None:
        """Id of ``piece``, or None when the vocabulary lacks it (it maps to unk)."""
        idx = self.sp_model.piece_to_id(piece)
        if idx == self.sp_model.unk_id() or idx == 0:
            return None
        return int(idx)

    @property
    def supports_infilling(self) -> bool:
        """Whether the vocabulary has the infilling pieces (Code Llama 7B/13B, base and
        Instruct)."""
        return None not in (self.prefix_id, self.middle_id, self.suffix_id, self.eot_id)

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of ``s``, optionally framed by BOS/EOS."""
        check_text(s)
        for name, flag in (("bos", bos), ("eos", eos)):
            if not is_flag(flag):
                raise PromptError(f"{name} must be True or False, got {flag!r:.40}")
        t: list[int] = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: Sequence[int]) -> str:
        """Text of ``t`` (ids of -1, Meta's padding, are dropped)."""
        return self.sp_model.decode(self._ids(t))

    def is_plain_piece(self, t: int) -> bool:
        """Whether id ``t`` is a piece of text: not a byte, control, unknown or unused one
        (see :class:`~codellama.streaming.IncrementalDecoder`)."""
        sp = self.sp_model
        if not _is_index(t) or not 0 <= t < self.n_words:
            return False
        return not (sp.is_byte(t) or sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t))

    def unfinished_bytes(self, tokens: Sequence[int]) -> int:
        """How many byte pieces at the end of ``tokens`` begin a UTF-8 character that is not
        complete yet (0 if none): ``decode`` spells each as U+FFFD until the rest comes."""
        values = self._byte_values
        tail: list[int] = []
        for t in reversed(tokens[-3:]):
            if t not in values:
                break
            tail.insert(0, values[t])
        for n in range(1, len(tail) + 1):  # the lead byte, n bytes from the end
            lead = tail[-n]
            if lead & 0xC0 == 0x80:  # a continuation byte: look further back
                continue
            need = 2 if lead & 0xE0 == 0xC0 else 3 if lead & 0xF0 == 0xE0 else 4
            return n if lead >= 0xC0 and lead < 0xF8 and n < need else 0
        return 0

    @functools.cached_property
    def _byte_values(self) -> dict[int, int]:
        """The byte each byte piece (``<0xE2>``) stands for, by id."""
        sp = self.sp_model
        return {i: int(sp.id_to_piece(i)[3:5], 16) for i in range(self.n_words) if sp.is_byte(i)}

    def token_piece(self, t: int) -> str:
        """The SentencePiece piece of id ``t`` (e.g. ``'▁def'``)."""
        ids = self._ids([t])
        if not ids:  # -1, Meta's padding, is no piece
            raise PromptError(f"token id {t} is outside the vocabulary [0, {self.n_words})")
        return self.sp_model.id_to_piece(ids[0])

    def encode_infilling(self, s: str) -> list[int]:
        """Encode without SentencePiece's implicit leading space (Meta's ☺ trick)."""
        check_text(s)
        return self.sp_model.encode(_SMILEY + s)[2:]

    def decode_infilling(self, t: Sequence[int]) -> str:
        """Decode without SentencePiece's implicit leading space."""
        smiley = self.sp_model.piece_to_id(_SMILEY)
        return self.sp_model.decode([smiley] + self._ids(t))[1:]

    def _ids(self, t: Sequence[int]) -> list[int]:
        """``t`` as ints without Meta's -1 padding; an id outside the vocabulary, or one
        that is not an integer (a float would be truncated), is refused."""
        if isinstance(t, TEXTLIKE) or not isinstance(t, Iterable):
            raise PromptError(f"expected a list of token ids, got {type(t).__name__}: {t!r:.60}")
        try:
            ids = [operator.index(x) for x in t]
        except TypeError:
            bad_type = next(x for x in t if not _is_index(x))
            raise PromptError(
                f"token ids must be integers, got {type(bad_type).__name__}: {bad_type!r:.40}"
            ) from None
        ids = [x for x in ids if x != -1]
        bad = [x for x in ids if not 0 <= x < self.n_words]
        if bad:
            raise PromptError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.n_words}) of "
                f"{self.model_path!r}"
            )
        return ids


def _is_index(x: object) -> bool:
    """Whether ``x`` is an integer (Python's, numpy's, a 0-d integer tensor)."""
    try:
        operator.index(x)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def check_text(s: object, where: str = "text") -> None:
    """``s`` must be a str that UTF-8 can encode (no lone surrogates); ``where`` names it
    in the error (e.g. ``prompts[3]``)."""
    if not isinstance(s, str):
        raise PromptError(f"expected a str to encode, got {type(s).__name__}: {s!r:.80}")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(
            f"{where} holds {s[exc.start]!r} at offset {exc.start}, a lone surrogate that is not "
            "valid Unicode; remove it (text read with errors='surrogateescape' should be "
            "decoded with errors='replace')"
        ) from exc
