"""Meta's ``llama.model`` names, taken from :mod:`codellama.model`, and its rotary and
key/value helpers as functions, for code written against Meta's module."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from codellama.distributed import resolve_device
from codellama.model import (
    Attention,
    FeedForward,
    ModelArgs,
    RMSNorm,
    Transformer,
    TransformerBlock,
    rope_tables,
)


def device_getattr(module: str) -> Callable[[str], str]:
    """A module ``__getattr__`` that gives Meta's module-level ``device`` ("cuda", else
    "mps", else "cpu"), looked up when it is read instead of at import."""

    def __getattr__(name: str) -> str:
        if name == "device":
            return resolve_device(None).type
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


if TYPE_CHECKING:
    device: str  # Meta's module-level device name, looked up when read
else:
    __getattr__ = device_getattr(__name__)


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """The rotary angles of positions ``0..end-1`` as unit complex numbers, (end, dim // 2)
    complex64: Meta's table, from the same angles the model uses."""
    cos, sin = rope_tables(dim, end, theta)
    return torch.complex(cos, sin)


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``freqs_cis`` (T, D/2) viewed as (1, T, 1, ..., D/2) to broadcast against ``x``
    (B, T, H, D/2), as complex pairs of a (B, T, H, D) tensor are."""
    if x.dim() < 2 or freqs_cis.shape != (x.shape[1], x.shape[-1]):
        raise ValueError(
            f"freqs_cis {tuple(freqs_cis.shape)} does not match x {tuple(x.shape)}: expected "
            f"(seqlen, pairs) = ({x.shape[1] if x.dim() > 1 else '?'}, {x.shape[-1]})"
        )
    shape = [d if i in (1, x.dim() - 1) else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def apply_rotary_emb(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the interleaved pairs of queries and keys (B, T, H, D) by ``freqs_cis``
    (T, D/2, complex), computed in fp32 and returned in the inputs' dtypes."""

    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        turned = pairs * reshape_for_broadcast(freqs_cis, pairs)
        return torch.view_as_real(turned).flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Keys or values (B, T, Hkv, D) with each head repeated ``n_rep`` times, (B, T, Hkv *
    n_rep, D): grouped-query attention as plain multi-head (codellama's own attention
    needs no copy)."""
    if n_rep == 1:
        return x
    b, t, h, d = x.shape
    return x[:, :, :, None, :].expand(b, t, h, n_rep, d).reshape(b, t, h * n_rep, d)


__all__ = [
    "Attention",
    "FeedForward",
    "ModelArgs",
    "RMSNorm",
    "Transformer",
    "TransformerBlock",
    "apply_rotary_emb",
    "precompute_freqs_cis",
    "repeat_kv",
    "reshape_for_broadcast",
]
