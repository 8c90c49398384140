"""Meta's ``llama.generation`` names, taken from :mod:`codellama`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from codellama.generation import ChatPrediction, CompletionPrediction, InfillingPrediction, Llama
from codellama.model import ModelArgs, Transformer
from codellama.prompt_formats import (
    B_INST,
    B_SYS,
    E_INST,
    E_SYS,
    SPECIAL_TAGS,
    UNSAFE_ERROR,
    Dialog,
    Message,
    Role,
    chat_prompt_tokens,
)
from codellama.prompt_formats import infilling_prompt_tokens as _infilling_prompt_tokens
from codellama.sampling import sample_top_p
from codellama.tokenizer import Tokenizer

from .model import device_getattr

if TYPE_CHECKING:
    device: str  # Meta's module-level device name, looked up when read
else:
    __getattr__ = device_getattr(__name__)


def infilling_prompt_tokens(
    tokenizer: Tokenizer, pre: str, suf: str, suffix_first: bool = False
) -> list[int]:
    """Meta's signature (``pre``, ``suf``) for :func:`codellama.infilling_prompt_tokens`."""
    return _infilling_prompt_tokens(tokenizer, pre, suf, suffix_first=suffix_first)


def dialog_prompt_tokens(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """Meta's name for :func:`codellama.chat_prompt_tokens`."""
    return chat_prompt_tokens(tokenizer, dialog)


__all__ = [
    "B_INST",
    "B_SYS",
    "E_INST",
    "E_SYS",
    "SPECIAL_TAGS",
    "UNSAFE_ERROR",
    "ChatPrediction",
    "CompletionPrediction",
    "Dialog",
    "InfillingPrediction",
    "Llama",
    "Message",
    "ModelArgs",
    "Role",
    "Transformer",
    "dialog_prompt_tokens",
    "infilling_prompt_tokens",
    "sample_top_p",
]
