"""SentencePiece tokenizer with Code Llama's infilling and dialog-step pieces."""

from __future__ import annotations

import os
from collections.abc import Sequence

from sentencepiece import SentencePieceProcessor

from .errors import CheckpointError, CheckpointNotFoundError, ConfigError, PromptError

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
        return None not in (self.prefix_id, self.middle_id, self.suffix_id, self.eot_id)

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of ``s``, optionally framed by BOS/EOS."""
        _check_text(s)
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
        if not 0 <= t < self.n_words:
            return False
        return not (sp.is_byte(t) or sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t))

    def token_piece(self, t: int) -> str:
        return self.sp_model.id_to_piece(self._ids([t])[0])

    def encode_infilling(self, s: str) -> list[int]:
        """Encode without SentencePiece's implicit leading space (Meta's ☺ trick)."""
        _check_text(s)
        return self.sp_model.encode(_SMILEY + s)[2:]

    def decode_infilling(self, t: Sequence[int]) -> str:
        """Decode without SentencePiece's implicit leading space."""
        smiley = self.sp_model.piece_to_id(_SMILEY)
        return self.sp_model.decode([smiley] + self._ids(t))[1:]

    def _ids(self, t: Sequence[int]) -> list[int]:
        """``t`` as ints without Meta's -1 padding; an id outside the vocabulary is refused."""
        ids = [int(x) for x in t if x != -1]
        bad = [x for x in ids if not 0 <= x < self.n_words]
        if bad:
            raise PromptError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.n_words}) of "
                f"{self.model_path!r}"
            )
        return ids


def _check_text(s: object) -> None:
    """``s`` must be a str that UTF-8 can encode (no lone surrogates)."""
    if not isinstance(s, str):
        raise PromptError(f"expected a str to encode, got {type(s).__name__}: {s!r:.80}")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(
            f"text holds {s[exc.start]!r} at offset {exc.start}, a lone surrogate that is not "
            "valid Unicode; remove it (text read with errors='surrogateescape' should be "
            "decoded with errors='replace')"
        ) from exc
