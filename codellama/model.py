"""The Code Llama transformer: RMSNorm, SwiGLU, RoPE, grouped-query attention, KV cache.

Parameter names and shard layouts are Meta's, so ``consolidated.NN.pth`` files load unchanged.
Linear layers are fairscale model-parallel layers; with one process they are plain linears.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import mmap
import numbers
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import fairscale.nn.model_parallel.initialize as fs_init
import fairscale.nn.model_parallel.layers as fs_layers
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ParallelEmbedding
from fairscale.nn.model_parallel.mappings import (
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
)
from torch import nn

from . import distributed, gpu_kernels
from .checkpoint import REQUIRED_PARAMS  # in every params.json; the defaults are only 7B's
from .errors import (
    ConfigError,
    PromptError,
    PromptTooLongError,
    StreamInterruptedError,
    UnsupportedError,
)
from .native import (
    LAYER_LINEARS,
    MAX_ROWS,
    DecoderHead,
    DecoderLayer,
    DecoderPlan,
    GreedySteps,
    LinearPlan,
    NativeLinear,
    buffer_key,
    holds,
)


def swiglu_hidden_dim(
    hidden_dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None
) -> int:
    """Meta's SwiGLU width from ``hidden_dim`` (4 * dim): 2/3 of it, times the multiplier,
    rounded up to a multiple of ``multiple_of``."""
    hidden = int(2 * hidden_dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelArgs:
    """Model hyper-parameters: the fields of Meta's params.json plus the cache size."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1  # -1: taken from the tokenizer
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    max_batch_size: int = 32
    max_seq_len: int = 2048

    @classmethod
    def from_params(cls, params: dict[str, Any], **overrides: Any) -> ModelArgs:
        """Build from a params.json dict; unknown keys, or a missing ``dim``, ``n_layers``
        or ``n_heads`` (whose defaults are only the 7B's), are a :class:`ConfigError`.

        ``vocab_size`` -1 (or absent) means "from the tokenizer", as in Meta's files.
        """
        if not isinstance(params, dict):
            raise ConfigError(f"params.json must hold a JSON object, got {type(params).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(
                f"params.json has unknown keys {unknown}; the known keys are {sorted(known)}"
            )
        clash = sorted(
            k for k in ("max_seq_len", "max_batch_size")
            if k in params and k in overrides and params[k] != overrides[k]
        )  # fmt: skip
        if clash:
            given = ", ".join(f"{k}={params[k]!r}" for k in clash)
            asked = ", ".join(f"{k}={overrides[k]!r}" for k in clash)
            raise ConfigError(
                f"params.json has {given}, but the build asks for {asked}: these are build "
                "arguments, not model parameters (Meta's params.json has neither); remove them "
                "from params.json and pass them to Llama.build"
            )
        merged = {**params, **overrides}
        missing = [k for k in REQUIRED_PARAMS if k not in merged]
        if missing:
            raise ConfigError(
                f"params.json is missing {', '.join(missing)} (needed: "
                f"{', '.join(REQUIRED_PARAMS)}); without them the model's size is unknown. "
                "Use the params.json that came with the checkpoint"
            )
        if merged.get("n_kv_heads") is None:
            merged["n_kv_heads"] = None
        args = cls(**merged)
        args.validate()
        return args

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (== n_heads without grouped-query attention)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's SwiGLU hidden size: 2/3 of 4*dim, times the multiplier, rounded up."""
        return swiglu_hidden_dim(4 * self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def to_params(self) -> dict[str, Any]:
        """The params.json dict (without the cache sizes)."""
        d = asdict(self)
        d.pop("max_batch_size")
        d.pop("max_seq_len")
        if d["n_kv_heads"] is None:
            d.pop("n_kv_heads")
        if d["ffn_dim_multiplier"] is None:
            d.pop("ffn_dim_multiplier")
        return d

    def validate(self, model_parallel_size: int = 1) -> None:
        """Raise :class:`ConfigError` naming the first inconsistent field and the fix."""
        ints = (
            "dim",
            "n_layers",
            "n_heads",
            "multiple_of",
            "max_batch_size",
            "max_seq_len",
        )
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must divide dim={self.dim}; "
                f"choose n_heads among the divisors of {self.dim}"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"head_dim = dim/n_heads = {self.head_dim} must be even for rotary embeddings"
            )
        kv = self.kv_heads
        if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or self.n_heads % kv:
            raise ConfigError(
                f"n_kv_heads={self.n_kv_heads!r} must be a positive divisor of "
                f"n_heads={self.n_heads} (or omitted for multi-head attention)"
            )
        vocab = self.vocab_size
        if isinstance(vocab, bool) or not isinstance(vocab, int) or (vocab < 1 and vocab != -1):
            raise ConfigError(f"vocab_size must be a positive integer (or -1), got {vocab!r}")
        for name in ("ffn_dim_multiplier", "norm_eps", "rope_theta"):
            value = getattr(self, name)
            if name == "ffn_dim_multiplier" and value is None:
                continue  # optional: omitted in most params.json files
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 < value < float("inf")
            ):
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        if self.rope_theta <= 1:  # a base <= 1 makes rotary frequencies grow, then overflow
            raise ConfigError(
                f"rope_theta must be a finite number > 1 (Code Llama's is 1000000, Llama 2's "
                f"10000), got {self.rope_theta!r}"
            )
        if self.ffn_hidden_dim < 1:
            raise ConfigError(
                f"ffn_dim_multiplier={self.ffn_dim_multiplier!r} makes the feed-forward size "
                f"{self.ffn_hidden_dim}; use the params.json that came with the checkpoint"
            )
        mp = model_parallel_size
        if kv % mp:
            raise ConfigError(
                f"model_parallel_size={mp} must divide n_kv_heads={kv}; "
                f"use one of {[d for d in range(1, kv + 1) if kv % d == 0]}"
            )
        if self.vocab_size > 0 and self.vocab_size % mp:
            raise ConfigError(f"model_parallel_size={mp} must divide vocab_size={self.vocab_size}")


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 as in Meta's reference."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """Meta's helper: ``x`` scaled to unit root mean square, in ``x``'s dtype."""
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm's arithmetic: normalised in fp32, rounded to x's dtype, then scaled."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rope_tables(
    head_dim: int,
    max_seq_len: int,
    theta: float,
    device: torch.device | str | None = None,
    start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles of positions ``start .. start + max_seq_len - 1``,
    float32, shape (max_seq_len, head_dim // 2)."""
    exponents = torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    t = torch.arange(start, start + max_seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(t, inv_freq)
    return torch.cos(angles), torch.sin(angles)


def rope_table(
    head_dim: int,
    max_seq_len: int,
    theta: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(cos, sin) pairs of the rotary angles, float32, shape (max_seq_len, head_dim // 2, 2):
    the layout of a complex tensor, so :func:`apply_rotary` views it as one for free.

    Filled ROPE_CHUNK positions at a time, so that building it takes no memory beyond the
    table (at millions of positions its temporaries were twice its size); the values are
    those of the whole computation, element by element."""
    table = torch.empty((max_seq_len, head_dim // 2, 2), dtype=torch.float32, device=device)
    for start in range(0, max_seq_len, ROPE_CHUNK):
        n = min(ROPE_CHUNK, max_seq_len - start)
        cos, sin = rope_tables(head_dim, n, theta, device, start)
        table[start : start + n, :, 0] = cos
        table[start : start + n, :, 1] = sin
    return table


ROPE_CHUNK = 1 << 16  # positions of the rotary table computed at once


def rope_table_bytes(args: ModelArgs) -> int:
    """Bytes of the model's rotary table (every process holds it whole)."""
    return args.max_seq_len * (args.head_dim // 2) * 2 * 4


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, D) by the angles in ``rotation``.

    ``rotation`` holds (cos, sin) pairs, (B|1, T, 1, D/2, 2) (see :func:`rope_table`). Meta's
    layout (complex pairs), in fp32. Eagerly on CPU/CUDA one complex multiply is 3-20x faster
    than the real formula; torch.compile (which cannot generate complex code) and MPS use the
    real formula, which gives the same numbers.
    """
    if x.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling():
        return rotate_complex(x, rotation)
    return rotate_real(x, rotation)


def rotate_complex(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary` as one complex multiply."""
    xc = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * torch.view_as_complex(rotation)).flatten(-2).type_as(x)


def rotate_real(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary` with real arithmetic only."""
    xf = x.float()
    cos, sin = rotation[..., 0], rotation[..., 1]
    x0, x1 = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


# The most a prefill chunk's attention mask may take past position 0 where PyTorch's CPU
# flash attention is not used (see Attention._attend_past).
ATTENTION_MASK_BYTES = 16 * 2**20


@dataclass
class StepInputs:
    """Where one forward pass reads and writes: shared by every layer of that pass.

    ``positions`` is None when every row covers ``start_pos .. start_pos+T-1`` (then the
    cache is written with a slice), else a (B, T) tensor of per-row positions.
    ``mask`` is a boolean (B|1, 1, T, kv_len) mask or None; ``causal`` means the query at
    ``start_pos + i`` attends keys ``0 .. start_pos + i`` (from position 0, SDPA's own causal
    mask; past it, no (T, kv_len) mask is built: see ``Attention._attend_past``). The pass
    reads and writes cache rows
    ``row_offset .. row_offset+B-1``.
    """

    rotation: torch.Tensor  # (cos, sin) pairs, (B|1, T, 1, head_dim/2, 2): apply_rotary's
    start_pos: int
    kv_len: int
    positions: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    causal: bool = False
    row_offset: int = 0


def start_position(start_pos: object) -> int:
    """``start_pos`` of a public forward call, checked: an integer >= 0."""
    if isinstance(start_pos, bool) or not isinstance(start_pos, numbers.Integral):
        raise PromptError(f"start_pos must be an integer >= 0, got {start_pos!r:.40}")
    if start_pos < 0:
        raise PromptError(f"start_pos must be >= 0, got {start_pos}")
    return int(start_pos)


def meta_step_inputs(
    start_pos: object, freqs_cis: torch.Tensor | None, mask: torch.Tensor | None, seqlen: int,
    head_dim: int, cache: KVCache | None,
) -> StepInputs:  # fmt: skip
    """The StepInputs of a layer called as Meta's code calls it: ``layer(h, start_pos,
    freqs_cis, mask)``, with ``freqs_cis`` the (T, head_dim/2) complex rows of
    :attr:`Transformer.freqs_cis` for positions ``start_pos ..``; a ``mask`` means causal
    attention (the one Meta's Transformer builds), None attention to every cached key."""
    start = start_position(start_pos)
    pairs = head_dim // 2
    if not isinstance(freqs_cis, torch.Tensor) or tuple(freqs_cis.shape) != (seqlen, pairs):
        got = tuple(freqs_cis.shape) if isinstance(freqs_cis, torch.Tensor) else freqs_cis
        raise PromptError(
            f"freqs_cis must be the ({seqlen}, {pairs}) rows of model.freqs_cis for the "
            f"input's {seqlen} positions, got {got!r:.60}"
        )
    rotation = torch.view_as_real(freqs_cis.to(torch.complex64)).view(1, seqlen, 1, pairs, 2)
    if cache is not None and start + seqlen > cache.k.shape[2]:
        raise PromptTooLongError(
            f"positions {start}..{start + seqlen - 1} exceed the KV cache's "
            f"{cache.k.shape[2]} positions (max_seq_len); build with a larger max_seq_len"
        )
    return StepInputs(rotation, start, start + seqlen, causal=mask is not None and seqlen > 1)


def zeros(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None
) -> torch.Tensor:
    """``torch.zeros``; on the CPU an anonymous memory map, which the OS fills with zeros a
    page at a time as it is first touched. A cache for 100K positions then costs no time and
    no memory at build, only as positions are used (torch.zeros writes every page: 0.03-0.07
    s and all the memory for the 136 MiB cache of `small` at 8 x 1088)."""
    if torch.device(device or "cpu").type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device="cpu")
    # frombuffer keeps the map alive as long as the tensor; unmapped when both are gone
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=numel).view(shape)


class KVCache(nn.Module):
    """Preallocated keys and values, (max_batch_size, n_kv_heads, max_seq_len, head_dim)."""

    def __init__(
        self,
        max_batch_size: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", zeros(shape, dtype, device), persistent=False)
        self.register_buffer("v", zeros(shape, dtype, device), persistent=False)
        self.k: torch.Tensor
        self.v: torch.Tensor

    def update(
        self, k: torch.Tensor, v: torch.Tensor, step: StepInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) and return the cached (B, Hkv, kv_len, D) views."""
        bsz, n_heads, seqlen, _ = k.shape
        lo, hi = step.row_offset, step.row_offset + bsz
        if step.positions is None:
            end = step.start_pos + seqlen
            self.k[lo:hi, :, step.start_pos : end] = k
            self.v[lo:hi, :, step.start_pos : end] = v
        else:
            # Indexing the whole buffer, not the view self.k[lo:hi]: torch.compile turns an
            # index_put_ into a view into a copy of all those rows' cache and back (an H100
            # spent 53% of a compiled batch-8 decoding step copying caches so).
            rows = torch.arange(lo, hi, device=k.device).view(bsz, 1, 1)
            heads = torch.arange(n_heads, device=k.device).view(1, n_heads, 1)
            pos = step.positions.view(bsz, 1, seqlen)
            self.k.index_put_((rows, heads, pos), k)
            self.v.index_put_((rows, heads, pos), v)
        return self.k[lo:hi, :, : step.kv_len], self.v[lo:hi, :, : step.kv_len]


class ColumnParallelLinear(fs_layers.ColumnParallelLinear):
    """fairscale's column-parallel linear layer, callable however its weight is kept (packed
    for the CPU kernels, prepacked for oneDNN, or a view of a fused matrix): see :func:`linear`."""

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:  # not in Code Llama: fairscale's own product adds it
            return super().forward(input_)
        return linear(self, input_)


class RowParallelLinear(fs_layers.RowParallelLinear):
    """fairscale's row-parallel linear layer (input split across ranks), callable however its
    weight is kept: see :func:`linear`."""

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if self.bias is not None or not self.input_is_parallel:  # not in Code Llama
            return super().forward(input_)
        return linear(self, input_)


class CacheGuard:
    """Who may use one model's KV cache, shared by everything that calls the model (every
    Llama made over it, and direct calls): ``lock`` is held while a generation step
    computes; ``owner`` is the generation whose prefill wrote the cache last (None after a
    direct call wrote it)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: object = None

    def check(self, owner: object) -> None:
        """Refuse to read the cache for ``owner`` if anything else wrote it since."""
        if self.owner is not owner:
            raise StreamInterruptedError(
                "another call used this model's KV cache while this generation was paused (a "
                "stream not run to its end); finish (or close) a stream before starting "
                "another call, or build a second Llama"
            )

    def refuse_if_busy(self) -> None:
        if self.lock.locked():
            raise StreamInterruptedError(
                "this model is generating in another thread; its KV cache serves one "
                "generation at a time: use one Llama (and model) per thread, or a lock"
            )


_GUARDS: weakref.WeakKeyDictionary[nn.Module, CacheGuard] = weakref.WeakKeyDictionary()
_GUARDS_LOCK = threading.Lock()


def cache_guard(model: nn.Module) -> CacheGuard:
    """The :class:`CacheGuard` of ``model`` (kept beside it, so the model stays picklable)."""
    with _GUARDS_LOCK:
        guard = _GUARDS.get(model)
        if guard is None:
            guard = _GUARDS[model] = CacheGuard()
        return guard


class Attention(nn.Module):
    """Multi-head / grouped-query attention with rotary embeddings and a KV cache."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        mp = fs_init.get_model_parallel_world_size()
        self.n_kv_heads = args.kv_heads
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = args.kv_heads // mp
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.head_dim
        self.wq = ColumnParallelLinear(
            args.dim, args.n_heads * self.head_dim, bias=False, gather_output=False,
            init_method=_keep,
        )  # fmt: skip
        self.wk = ColumnParallelLinear(
            args.dim, args.kv_heads * self.head_dim, bias=False, gather_output=False,
            init_method=_keep,
        )  # fmt: skip
        self.wv = ColumnParallelLinear(
            args.dim, args.kv_heads * self.head_dim, bias=False, gather_output=False,
            init_method=_keep,
        )  # fmt: skip
        self.wo = RowParallelLinear(
            args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True,
            init_method=_keep,
        )  # fmt: skip
        self.cache: KVCache | None = None
        self.wqkv: torch.Tensor | None = None  # wq, wk, wv as one matrix: see fuse_rows
        # The native kernels' causal prefill attention, where the model uses them (AVX2).
        self.native_attention: NativeLinear | None = None

    @property
    def cache_k(self) -> torch.Tensor:
        """Meta's name and layout for the cached keys: a (max_batch_size, max_seq_len,
        n_local_kv_heads, head_dim) view of the cache, for code that reaches into layers."""
        return self._cache_buffer("k")

    @property
    def cache_v(self) -> torch.Tensor:
        """Meta's name and layout for the cached values (see :attr:`cache_k`)."""
        return self._cache_buffer("v")

    def step_inputs(
        self,
        step: StepInputs | int,
        freqs_cis: torch.Tensor | None,
        mask: torch.Tensor | None,
        seqlen: int,
    ) -> StepInputs:
        """``step`` as is, or the StepInputs of Meta's ``(start_pos, freqs_cis, mask)``."""
        if isinstance(step, StepInputs):
            return step
        return meta_step_inputs(step, freqs_cis, mask, seqlen, self.head_dim, self.cache)

    def _cache_buffer(self, name: str) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError(
                f"cache_{name}: the KV cache is not allocated yet; it is allocated by the first "
                "forward pass, or call Transformer.setup_cache() first"
            )
        buffer: torch.Tensor = getattr(self.cache, name)
        return buffer.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: StepInputs | int,
        freqs_cis: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``x`` (B, T, dim) over the cache, at the positions a
        :class:`StepInputs` gives; also takes Meta's arguments ``(x, start_pos, freqs_cis,
        mask)``, by position or by name (see :func:`meta_step_inputs`)."""
        step = self.step_inputs(start_pos, freqs_cis, mask, x.shape[1])
        if self.wqkv is not None:
            return linear(self.wo, self.attend(matmul(x, self.wqkv), step))
        bsz, seqlen, _ = x.shape
        q = linear(self.wq, x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        k = linear(self.wk, x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        v = linear(self.wv, x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rotary(q, step.rotation), apply_rotary(k, step.rotation)
        return linear(self.wo, self._attend(q, k, v, step))

    def attend(self, qkv: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """Attention of the (B, T, (H + 2 Hkv) D) product with ``wqkv``, before ``wo``."""
        bsz, seqlen, _ = qkv.shape
        heads, kv_heads = self.n_local_heads, self.n_local_kv_heads
        positions, cache = step.positions, self.cache
        if positions is not None and cache is not None and gpu_kernels.attends(qkv, positions, self.head_dim):  # fmt: skip
            return gpu_kernels.decode_attention(
                qkv, step.rotation, positions, cache.k, cache.v, step.row_offset, heads,
                kv_heads, step.kv_len,
            )  # fmt: skip
        qkv = qkv.view(bsz, seqlen, heads + 2 * kv_heads, self.head_dim)
        qk = apply_rotary(qkv[:, :, : heads + kv_heads], step.rotation)  # adjacent: one go
        q, k = qk.split([heads, kv_heads], dim=2)
        return self._attend(q, k, qkv[:, :, heads + kv_heads :], step)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepInputs
    ) -> torch.Tensor:
        """Store rotated k and v (B, T, Hkv, D) in the cache; attend with rotated q."""
        if self.cache is None:
            raise RuntimeError("KV cache not allocated: call Transformer.setup_cache() first")
        bsz, seqlen = q.shape[:2]
        by_position = q
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        keys, values = self.cache.update(k, v.transpose(1, 2), step)
        native_attention = self.native_attention
        if step.causal and native_attention is not None and not torch.compiler.is_compiling():
            rows = slice(step.row_offset, step.row_offset + bsz)
            out = native_attention.prefill_attention(
                by_position, self.cache.k[rows], self.cache.v[rows], step.start_pos
            )
            if out is not None:
                return out

        if step.causal and step.start_pos > 0:
            return self._attend_past(q, keys, values, step.start_pos)
        if self.n_rep > 1 and seqlen == 1:
            # GQA decode: the n_rep query heads of a group attend to the same K/V, so stack
            # them along the query axis instead of repeating K/V.
            qg = q.reshape(bsz, self.n_local_kv_heads, self.n_rep, self.head_dim)
            out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=step.mask)
            return out.reshape(bsz, 1, self.n_local_heads * self.head_dim)
        out = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=step.mask,
            is_causal=step.causal,
            enable_gqa=self.n_rep > 1,
        )
        return out.transpose(1, 2).reshape(bsz, seqlen, self.n_local_heads * self.head_dim)

    def _attend_past(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Causal attention of T queries at ``start ..`` (a prefill chunk past position 0)
        over the cached keys, without a (T, start + T) mask: SDPA takes that as a tensor,
        which its CPU kernels widen to floats (400 MB for a 1024-token chunk at 100K
        positions). Peak memory then does not grow with the context."""
        bsz, _, seqlen, dim = q.shape
        heads, kv_heads, rep = self.n_local_heads, self.n_local_kv_heads, self.n_rep
        flash = _cpu_flash_attention() if q.device.type == "cpu" else None
        if flash is not None:
            # Keys before the chunk are seen by every query: no mask, and a group's query
            # heads stacked along the query axis share their K/V. The chunk's own keys are
            # a square causal block. The two parts merge by their log-sum-exps.
            qg = q.reshape(bsz, kv_heads, rep * seqlen, dim)
            past, past_lse = flash(qg, keys[:, :, :start], values[:, :, :start])
            past = past.reshape(bsz, heads, seqlen, dim)
            past_lse = past_lse.reshape(bsz, heads, seqlen, 1)
            k_new, v_new = keys[:, :, start : start + seqlen], values[:, :, start : start + seqlen]
            if rep > 1:  # (T, Hkv, D) only: the chunk's keys, not the context's
                k_new, v_new = k_new.repeat_interleave(rep, 1), v_new.repeat_interleave(rep, 1)
            new, new_lse = flash(q, k_new, v_new, is_causal=True)
            new_lse = new_lse.view(bsz, heads, seqlen, 1)
            lse = torch.logaddexp(past_lse, new_lse)
            out = past.float() * (past_lse - lse).exp() + new.float() * (new_lse - lse).exp()
            out = out.to(q.dtype)
        else:  # blocks of query rows, each under a mask of at most ATTENTION_MASK_BYTES
            rows = max(1, min(seqlen, ATTENTION_MASK_BYTES // (4 * (start + seqlen))))
            outs = []
            for a in range(0, seqlen, rows):
                b = min(seqlen, a + rows)
                n_keys = start + b
                key_pos = torch.arange(n_keys, device=q.device).view(1, -1)
                q_pos = torch.arange(start + a, start + b, device=q.device).view(-1, 1)
                outs.append(
                    F.scaled_dot_product_attention(
                        q[:, :, a:b],
                        keys[:, :, :n_keys],
                        values[:, :, :n_keys],
                        attn_mask=key_pos <= q_pos,
                        enable_gqa=rep > 1,
                    )
                )
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out.transpose(1, 2).reshape(bsz, seqlen, heads * dim)


def _cpu_flash_attention() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """PyTorch's CPU flash attention, which also returns each query's log-sum-exp (the
    kernel public SDPA runs on the CPU); None if this torch lacks it."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        multiple_of: int | None = None,
        ffn_dim_multiplier: float | None = None,
    ):
        """``FeedForward(dim, hidden)`` has ``hidden`` units. Meta's four arguments
        ``(dim, 4 * dim, multiple_of, ffn_dim_multiplier)`` size it by Meta's rule (as
        :attr:`ModelArgs.ffn_hidden_dim`): 2/3 of ``hidden_dim``, times the multiplier,
        rounded up to a multiple of ``multiple_of``."""
        super().__init__()
        if multiple_of is not None:
            hidden_dim = swiglu_hidden_dim(hidden_dim, multiple_of, ffn_dim_multiplier)
        elif ffn_dim_multiplier is not None:
            raise ConfigError(
                "FeedForward got ffn_dim_multiplier without multiple_of: pass both (Meta's "
                "sizing rule) or neither (hidden_dim units exactly)"
            )
        self.w1 = ColumnParallelLinear(
            dim, hidden_dim, bias=False, gather_output=False, init_method=_keep
        )
        self.w2 = RowParallelLinear(
            hidden_dim, dim, bias=False, input_is_parallel=True, init_method=_keep
        )
        self.w3 = ColumnParallelLinear(
            dim, hidden_dim, bias=False, gather_output=False, init_method=_keep
        )
        self.w13: torch.Tensor | None = None  # w1 and w3 as one matrix: see fuse_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = matmul(x, self.w13).chunk(2, dim=-1)
            return linear(self.w2, F.silu(gate) * up)
        return linear(self.w2, F.silu(linear(self.w1, x)) * linear(self.w3, x))


class TransformerBlock(nn.Module):
    """One decoder layer: ``h = x + attention(norm(x))``, then ``h + feed_forward(norm(h))``."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.n_heads, self.dim, self.head_dim = args.n_heads, args.dim, args.head_dim
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: StepInputs | int,
        freqs_cis: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pre-norm decoder layer at the positions a :class:`StepInputs` gives; also
        takes Meta's arguments ``(x, start_pos, freqs_cis, mask)``, by position or by name."""
        step = self.attention.step_inputs(start_pos, freqs_cis, mask, x.shape[1])
        attn, ffn = self.attention, self.feed_forward
        wqkv, w13 = attn.wqkv, ffn.w13
        if wqkv is not None and w13 is not None and self._fuses(x, wqkv, w13):
            # Decoding one row on CUDA under torch.compile: the norms, SwiGLU and residual
            # adds run inside the matrix products (three kernels fewer a layer; see
            # gpu_kernels). H100, 7B dims, 8 layers: 1393 us a step against 1436.
            an, fn = self.attention_norm, self.ffn_norm
            qkv = gpu_kernels.rms_matmul(x, an.weight, an.eps, wqkv)
            h = gpu_kernels.matmul_add(attn.attend(qkv, step), _weight(attn.wo), x)
            gate_up = gpu_kernels.rms_matmul(h, fn.weight, fn.eps, w13)
            return gpu_kernels.swiglu_matmul_add(gate_up, _weight(ffn.w2), h)
        h = x + attn(self.attention_norm(x), step)
        return h + ffn(self.ffn_norm(h))

    def _fuses(self, x: torch.Tensor, wqkv: torch.Tensor, w13: torch.Tensor) -> bool:
        """One row (at 8 rows the fused products ran 2x slower than the plain ones: their
        prologues are redone for every tile), one process, plain CUDA weights."""
        wo, w2 = _weight(self.attention.wo), _weight(self.feed_forward.w2)
        return (
            x.shape[0] * x.shape[1] == 1
            and fs_init.get_model_parallel_world_size() == 1
            and gpu_kernels.fuses(x, wqkv, wo, w13, w2)
        )


class Transformer(nn.Module):
    """The decoder. ``forward(tokens, start_pos)`` returns float logits, as Meta's does."""

    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.vocab_size < 1:
            raise ConfigError("vocab_size must be set (from the tokenizer) before building")
        if not fs_init.model_parallel_is_initialized():
            # Made directly, as Meta's code makes it (whose Llama.build set up model
            # parallelism first): one process, or torchrun's processes.
            cuda = torch.cuda.is_available()
            distributed.setup_model_parallel(None, torch.device("cuda" if cuda else "cpu"))
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim, init_method=_keep)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(
            params.dim, params.vocab_size, bias=False, init_method=_keep
        )
        self.rope: torch.Tensor | None = None  # rope_table(): (max_seq_len, head_dim/2, 2)
        self.key_positions = torch.zeros(0, dtype=torch.long)  # (arange on meta imports sympy)
        self._pack_buffer: torch.Tensor | None = None
        self.native_kernel: NativeLinear | None = None
        self.native_decoder: DecoderPlan | None = None
        self._decoder_owns: list[tuple[dict[str, Any], str, Any, int | None]] = []
        self._fused_owns: list[tuple[dict[str, Any], str, Any, int | None]] = []
        self._repack_after_load = False
        # state_dict() gives plain (N, K) linear weights in the model's dtype, as Meta's
        # checkpoints hold them, however they are kept; load_state_dict() takes them so.
        self.register_state_dict_post_hook(_plain_linear_weights)
        self.register_load_state_dict_pre_hook(_unpack_for_loading)
        self.register_load_state_dict_post_hook(_pack_after_loading)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def freqs_cis(self) -> torch.Tensor:
        """Meta's rotary table: the angles of positions 0 .. max_seq_len-1 as unit complex
        numbers, (max_seq_len, head_dim/2), to call layers as Meta's forward does. Reading it
        means the layers are about to be called directly: a paused generation (a stream)
        then refuses to go on, as their calls write the KV cache."""
        self.ensure_cache()
        cache_guard(self).owner = None
        assert self.rope is not None
        return torch.view_as_complex(self.rope.float().contiguous())

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def store_prepacked(
        self,
        name: str,
        weight: torch.Tensor,
        dim: int = 0,
        offset: int = 0,
        cuts: tuple[int, ...] | None = None,
        mapped: bool = False,
    ) -> bool:
        """Store ``weight`` (a checkpoint slice, placed at ``offset`` along ``dim``; ``cuts``:
        where all of this parameter's pieces start and end) as parameter ``name``: a linear
        weight packed straight into the native kernel's layout (else oneDNN's, when whole),
        another large one (the embedding) copied in with its memory mapped in first.

        For :func:`codellama.checkpoint.load_weights`: the plain weight is never written,
        so loading reads the file once and allocates each weight once, also when several
        shards hold pieces of it. ``weight`` is only read; ``mapped`` says it is a view of a
        checkpoint file mapped by the loader, whose pages are then dropped from memory as
        they are packed (:meth:`NativeLinear.pack`). An fp32 model keeps a bf16 checkpoint's
        linear weights in bf16, which holds them exactly (:meth:`NativeLinear.storage_dtype`).
        Returns False where the loader should copy it itself (small parameters, no kernel,
        not on the CPU).
        """
        module_name, _, attr = name.rpartition(".")
        module = self.get_submodule(module_name) if module_name else self
        param = getattr(module, attr, None)
        if not isinstance(param, torch.Tensor) or self.device.type != "cpu":
            return False
        kernel = self.native_kernel
        linear = attr == "weight" and isinstance(module, (ColumnParallelLinear, RowParallelLinear))
        plan = _packed_plan(module) if linear else None  # set by an earlier piece
        started = plan is not None
        shape = (plan.n, plan.k) if plan is not None else tuple(param.shape)
        if len(shape) != 2:
            return False
        n, k = shape
        size = shape[dim]
        whole = offset == 0 and weight.shape[dim] == size
        other = [s for i, s in enumerate(weight.shape) if i != dim]
        if other != [s for i, s in enumerate(shape) if i != dim]:
            return False
        if not linear:
            if not whole or param.numel() * param.element_size() < 1 << 20:
                return False
            if mapped and weight.dtype == param.dtype and weight.is_contiguous():
                # The embedding as the checkpoint holds it: its pages stay in the file
                # mapping (a token reads one row) instead of being copied into fresh memory,
                # which costs as much as packing the output matrix (torch's mmap+assign).
                setattr(module, attr, nn.Parameter(weight, requires_grad=False))
                return True
            if kernel is None:
                return False
            with torch.no_grad():
                kernel.fill(param, weight, mapped)  # the embedding: fresh memory, mapped in first
            return True
        if kernel is not None and kernel.can_pack(self.dtype):
            stored = kernel.storage_dtype(self.dtype, weight.dtype)
            cuts = cuts or (offset, offset + weight.shape[dim])
            if plan is not None and plan.weight.dtype != stored:  # a piece of another dtype
                stored = self.dtype
                if plan.weight.dtype != stored:  # widen what earlier pieces stored
                    assert plan.unpack is not None
                    self._store_packed(module, kernel.pack(plan.unpack(), stored), kernel, n, k)
            if whole:
                self._store_packed(module, kernel.pack(weight, stored, mapped), kernel, n, k)
            else:
                if plan is None and not _cuts_packable(cuts, dim, size, stored):
                    stored = self.dtype  # bf16 keeps columns in pairs that the cuts split
                if not _cuts_packable(cuts, dim, size, stored):
                    return False  # the loader copies the pieces; prepack_cpu_weights packs
                if not started:
                    packed = kernel.empty_packed(n, k, stored)
                    self._store_packed(module, packed, kernel, n, k)
                row, col = (offset, 0) if dim == 0 else (0, offset)
                kernel.pack_piece(_weight(module), n, k, weight, row, col, mapped)
            return True
        if not whole or not _can_prepack(self.device, self.dtype):
            return False
        if weight.dtype == self.dtype and weight.is_contiguous():
            plain = weight
        else:  # convert into one reused buffer: fresh memory costs a page fault per 4 KiB
            plain = self._scratch(weight.numel()).view(weight.shape).copy_(weight)
        packed = torch.ops.mkldnn._reorder_linear_weight(plain, self._pack_hint())
        module.weight = nn.Parameter(packed, requires_grad=False)
        return True

    def _store_packed(
        self, module: nn.Module, packed: torch.Tensor, kernel: NativeLinear, n: int, k: int
    ) -> None:
        """Make ``packed`` (:meth:`NativeLinear.pack`'s, of an (n, k) weight, in the model's
        dtype or kept in bf16) the weight of linear ``module``."""
        module.weight = nn.Parameter(packed, requires_grad=False)
        module.__dict__["native_plan"] = kernel.plan_packed(_weight(module), n, k, self.dtype)

    def _scratch(self, numel: int) -> torch.Tensor:
        """A flat buffer for ``numel`` elements. Up to the size of a layer's largest weight
        one buffer is reused until prepacking ends; bigger ones (the output matrix) are
        temporary, so that they do not add to the memory peak while the rest loads."""
        p = self.params
        mp = fs_init.get_model_parallel_world_size()
        reuse = p.dim * max(p.n_heads * p.head_dim, p.ffn_hidden_dim) // mp
        if numel > reuse:
            return torch.empty(numel, dtype=self.dtype, device=self.device)
        if self._pack_buffer is None:
            self._pack_buffer = torch.empty(reuse, dtype=self.dtype, device=self.device)
        return self._pack_buffer[:numel]

    def _pack_hint(self) -> int | None:
        """Batch size oneDNN tunes the packed layout for (None: any). Measured on a 2-core
        AVX-512 CPU: the batch-1 layout is 10% faster at batch 1 in fp32 but 1.5x slower at
        batch 8; the general layout matches a batch-8 one at batches 1-8 and packs 2-2.5x
        faster. So: batch 1 when the model only ever decodes one row, else the general one."""
        return 1 if self.params.max_batch_size == 1 else None

    def use_native_kernel(self, kernel: NativeLinear | None) -> int:
        """Run the linear layers through ``kernel`` where it can read their weights: weights
        in its packed layout for every number of rows (plain weights of the model's dtype
        are packed so), oneDNN-prepacked ones for the few rows of decoding. Call after
        loading, and again if weights are replaced. ``None`` turns it off: packed weights
        are then unpacked (and prepacked for oneDNN where it can). Returns the layers it
        serves."""
        self.native_kernel = kernel
        for layer in self.layers:  # causal prefill attention too, where the build has it
            assert isinstance(layer, TransformerBlock)
            layer.attention.native_attention = kernel
        served, hint, unpacked = 0, self._pack_hint(), False
        for module in self.linear_layers():
            old, weight = _packed_plan(module), _weight(module)
            if old is not None:
                if kernel is not None and kernel.can_pack(old.dtype):
                    module.native_plan = kernel.plan_packed(weight, old.n, old.k, old.dtype)
                    served += 1
                    continue
                assert old.unpack is not None
                module.weight = nn.Parameter(old.unpack(), requires_grad=False)
                unpacked = True
            elif kernel is not None and self._packs_plain(weight, kernel):
                n, k = weight.shape
                self._store_packed(module, kernel.pack(weight, self.dtype), kernel, n, k)
                served += 1
                continue
            plan = kernel.plan(_weight(module), hint) if kernel is not None else None
            module.native_plan = plan
            served += plan is not None
        if unpacked:  # oneDNN's layout, where it has one, for the weights just unpacked
            self.prepack_cpu_weights(pack_natively=False)
            if kernel is not None:
                return self.use_native_kernel(kernel)  # plans for oneDNN's layout
        self._plan_native_decoder()
        return served

    def _packs_plain(self, weight: torch.Tensor, kernel: NativeLinear) -> bool:
        """Whether ``use_native_kernel`` packs a plain weight (one oneDNN could not pack, or
        one given after loading) into ``kernel``'s layout, as loading would have."""
        return (
            not weight.is_mkldnn
            and weight.dim() == 2
            and weight.device.type == "cpu"
            and weight.dtype == self.dtype
            and kernel.can_pack(self.dtype)
        )

    def _plan_native_decoder(self) -> None:
        """Plan whole decoding steps natively (:class:`codellama.native.DecoderPlan`) where
        every linear of every layer has a native plan; one process only (model parallel
        layers reduce across processes inside a layer)."""
        self.native_decoder, self._decoder_owns = None, []
        kernel = self.native_kernel
        if kernel is None or self.rope is None or fs_init.get_model_parallel_world_size() != 1:
            return
        layers, owns = [], []
        for block in self.layers:
            assert isinstance(block, TransformerBlock)
            attn, ffn = block.attention, block.feed_forward
            modules = [getattr(attn if n[1] in "qkvo" else ffn, n) for n in LAYER_LINEARS]
            plans = [m.__dict__.get("native_plan") for m in modules]
            if attn.cache is None or any(p is None for p in plans):
                return
            norms = (block.attention_norm, block.ffn_norm)
            layers.append(
                DecoderLayer(
                    tuple(plans),
                    norms[0].weight,
                    norms[1].weight,
                    attn.cache.k,
                    attn.cache.v,
                    attn.n_local_heads,
                    norms[0].eps,
                )  # fmt: skip
            )
            # What the plan holds pointers into: checked before every use (_decoder_is_current).
            owns += [
                _owned(m._parameters, "weight", p.weight)
                for m, p in zip(modules, plans, strict=True)
            ]
            owns += [_owned(n._parameters, "weight", n.weight) for n in norms]
            owns += [_owned(attn._modules, "cache", attn.cache)]
            owns += [_owned(attn.cache._buffers, b, getattr(attn.cache, b)) for b in ("k", "v")]
        out_plan = self.output.__dict__.get("native_plan")
        emb = self.tok_embeddings.weight
        if out_plan is None or emb.is_mkldnn:
            return
        head = DecoderHead(emb, self.norm.weight, out_plan, self.norm.eps)
        self.native_decoder = kernel.decoder(layers, head, self.rope)
        owns += [_owned(self.tok_embeddings._parameters, "weight", emb)]
        owns += [_owned(self.norm._parameters, "weight", self.norm.weight)]
        owns += [_owned(self.output._parameters, "weight", out_plan.weight)]
        self._decoder_owns = owns + [_owned(self.__dict__, "rope", self.rope)]

    def _decoder_is_current(self) -> bool:
        """Whether every tensor the native decoder reads is still the model's, with the same
        storage: a replaced parameter, or one whose ``.data`` was swapped (``model.half()``,
        ``.to()``), must not be read through a stale pointer."""
        return _still_owned(self._decoder_owns)

    def _native_decode(
        self,
        tokens: torch.Tensor,
        start_pos: int,
        positions: torch.Tensor | None,
        kv_len: int | None,
        row_offset: int,
    ) -> torch.Tensor | None:
        """float32 logits (B, V) of one decoding step through the native decoder, or None
        where it does not apply (then the torch layers run)."""
        decoder = self.native_decoder
        bsz, seqlen = tokens.shape
        if decoder is None or seqlen != 1 or bsz > MAX_ROWS or torch.compiler.is_compiling():
            return None
        if tokens.device.type != "cpu" or torch.is_grad_enabled():
            return None
        if not self._decoder_is_current():
            return None  # a weight, norm or cache was replaced: plan again to use it
        if positions is None:
            self._check_span(start_pos, seqlen)
            return decoder(tokens, start_pos, start_pos + seqlen, row_offset)
        kv_len = self.params.max_seq_len if kv_len is None else kv_len
        return decoder(tokens, positions, kv_len, row_offset)

    def native_greedy_steps(self, rows: int) -> GreedySteps | None:
        """Lean greedy decoding steps through the native decoder for a generation of
        ``rows`` rows (:class:`codellama.native.GreedySteps`), or None where the native
        decoder does not run (no plan, too many rows, or a weight, norm or cache replaced
        since it was planned)."""
        decoder = self.native_decoder
        if decoder is None or not 1 <= rows <= MAX_ROWS or not self._decoder_is_current():
            return None
        return decoder.greedy_steps()

    def fuse_projections(self) -> bool:
        """Run q/k/v and w1/w3 as one matrix product each (the weights become views of one
        matrix per layer; names, values and state_dict are unchanged). On a GPU this saves
        three kernel launches per layer and each product reads more rows at once. Call it
        before loading (then nothing is copied) or after; False where weights are not plain
        tensors (CPU prepacked weights: CPU decoding runs each weight natively instead)."""
        if not all(_fusable(group) for _, _, group in self._fusion_groups()):
            return False
        for owner, attr, group in self._fusion_groups():
            setattr(owner, attr, fuse_rows(group))
        self._note_fused()
        return True

    def _note_fused(self) -> None:
        """Remember each fused weight's object and address: checking them before every
        forward pass must be cheap (~0.5 us a weight; the full check costs 1 ms a step)."""
        self._fused_owns = [
            _owned(m._parameters, "weight", _weight(m))
            for _, _, group in self._fusion_groups()
            for m in group
        ]

    def _fusion_groups(self) -> Iterator[tuple[nn.Module, str, list[nn.Module]]]:
        for layer in self.layers:
            assert isinstance(layer, TransformerBlock)
            attn, ffn = layer.attention, layer.feed_forward
            yield attn, "wqkv", [attn.wq, attn.wk, attn.wv]
            yield ffn, "w13", [ffn.w1, ffn.w3]

    def _check_fused(self) -> None:
        """Fuse again the groups whose weights were replaced or moved since they were fused
        (a stale fused matrix would be a silent wrong answer); unfuse where they cannot be."""
        if _still_owned(self._fused_owns):
            return
        for owner, attr, group in self._fusion_groups():
            fused = getattr(owner, attr)
            if fused is None or not is_fused(group, fused):
                setattr(owner, attr, fuse_rows(group) if _fusable(group) else None)
        self._note_fused()

    def linear_layers(self) -> Iterator[ColumnParallelLinear | RowParallelLinear]:
        """Every fairscale linear layer (attention, feed-forward, output)."""
        for module in self.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                yield module

    def prepack_cpu_weights(self, pack_natively: bool = True) -> bool:
        """Store every plain linear weight in a blocked layout (CPU only, in place): the
        native kernel's (:meth:`NativeLinear.pack`) where it has one for this dtype and
        ``pack_natively``, else oneDNN's.

        An fp32 weight whose values bf16 holds exactly is kept in bf16, as at load
        (:meth:`NativeLinear.storage_dtype`). Products on blocked weights read one sequential
        stream per 64 outputs: 1.5-4x faster than ``F.linear`` on CPU for the small batches of
        decoding, and somewhat faster for prefill. The plain weight is freed, so memory does not grow. Returns False (and
        changes nothing) where neither can: not on CPU, fp16, no oneDNN and no kernel.
        """
        self._pack_buffer = None  # store_prepacked's conversion buffer: loading is over
        kernel = self.native_kernel if pack_natively else None
        native = kernel is not None and kernel.can_pack(self.dtype)
        if self.device.type != "cpu" or not (native or _can_prepack(self.device, self.dtype)):
            _return_freed_memory()
            return False
        hint = self._pack_hint()
        for module in self.linear_layers():
            weight = _weight(module)
            if weight.is_mkldnn or _packed_plan(module) is not None:
                continue
            if native:
                assert kernel is not None
                plain = weight.detach()
                stored = kernel.storage_dtype(self.dtype, torch.bfloat16)
                if stored != self.dtype and not torch.equal(plain, plain.to(stored).to(self.dtype)):
                    stored = self.dtype  # kept in bf16 only where bf16 holds every value
                n, k = plain.shape
                self._store_packed(module, kernel.pack(plain, stored), kernel, n, k)
            else:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), hint)
                module.weight = nn.Parameter(packed, requires_grad=False)
            _return_freed_memory()  # else the freed plain weights stay in the heap
        if not native:
            _return_freed_memory()  # the conversion buffer of oneDNN's packing
        return True

    def setup_cache(
        self,
        max_batch_size: int | None = None,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """(Re)allocate the KV cache and rotary tables; defaults come from ``params``."""
        cache_guard(self).owner = None  # what a paused generation wrote is gone
        p = self.params
        if max_batch_size is not None:
            p.max_batch_size = max_batch_size
        if max_seq_len is not None:
            p.max_seq_len = max_seq_len
        dtype = dtype or self.dtype
        device = device or self.device
        for layer in self.layers:
            assert isinstance(layer, TransformerBlock)
            attn = layer.attention
            attn.cache = None  # free the old cache before allocating the new one
            attn.cache = KVCache(
                p.max_batch_size, p.max_seq_len, attn.n_local_kv_heads, attn.head_dim,
                dtype, device,
            )  # fmt: skip
        self.rope = rope_table(p.head_dim, p.max_seq_len, p.rope_theta, device)
        self.key_positions = torch.arange(p.max_seq_len, device=device)  # sliced by masks
        self._plan_native_decoder()  # the caches moved

    def ensure_cache(self) -> None:
        """Allocate the KV cache and rotary tables if they are missing or on another device
        than the weights (a model made as Meta's code makes it: ``Transformer(params)``,
        ``load_state_dict``, ``.to(device)``)."""
        if self.rope is None or self.rope.device != self.device:
            self.setup_cache()

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Logits (float32) for every position of ``tokens`` (batch, seqlen) placed at
        ``start_pos`` (Meta's signature; the inputs are checked, as it is public)."""
        self._check_tokens(tokens)
        self.ensure_cache()
        start = start_position(start_pos)
        guard = cache_guard(self)
        guard.refuse_if_busy()
        with guard.lock, torch.inference_mode():
            guard.owner = None  # a paused generation can no longer trust the cache
            return self.forward_tokens(tokens, start_pos=start)

    def _check_tokens(self, tokens: object) -> None:
        """``tokens`` must be a (batch <= max_batch_size, seqlen >= 1) tensor of ids in the
        vocabulary."""
        p = self.params
        if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point:
            kind = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise PromptError(f"tokens must be an integer tensor (torch.long), got {kind}")
        if tokens.dim() != 2 or tokens.shape[1] == 0 or tokens.dtype in (torch.bool,):
            raise PromptError(
                f"tokens must be a (batch, seqlen) integer tensor with seqlen >= 1, got shape "
                f"{tuple(tokens.shape)} {tokens.dtype}; e.g. torch.tensor([ids])"
            )
        if tokens.device != self.device:
            raise PromptError(
                f"tokens are on {tokens.device} but the model is on {self.device}; make them "
                "with torch.tensor(ids, device=model.device)"
            )
        if not 1 <= tokens.shape[0] <= p.max_batch_size:
            raise PromptError(
                f"tokens has {tokens.shape[0]} rows but max_batch_size is {p.max_batch_size}"
            )
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= p.vocab_size:
            bad = low if low < 0 else high
            raise PromptError(f"token id {bad} is outside the vocabulary [0, {p.vocab_size})")

    def step_inputs(
        self,
        seqlen: int,
        start_pos: int = 0,
        positions: torch.Tensor | None = None,
        kv_len: int | None = None,
        row_offset: int = 0,
    ) -> StepInputs:
        """Rotary angles, cache indices and attention mask for one forward pass."""
        step = self._step_inputs(seqlen, start_pos, positions, kv_len)
        step.row_offset = row_offset
        return step

    def _step_inputs(
        self, seqlen: int, start_pos: int, positions: torch.Tensor | None, kv_len: int | None
    ) -> StepInputs:
        if self.rope is None:
            raise RuntimeError("rotary tables not allocated: call Transformer.setup_cache() first")
        max_len = self.params.max_seq_len
        if positions is None:
            end = start_pos + seqlen
            self._check_span(start_pos, seqlen)
            rot = self.rope[start_pos:end].view(1, seqlen, 1, -1, 2)
            if seqlen == 1:
                return StepInputs(rot, start_pos, end)
            return StepInputs(rot, start_pos, end, causal=True)
        kv_len = max_len if kv_len is None else kv_len
        bsz = positions.shape[0]
        rot = self.rope[positions].view(bsz, seqlen, 1, -1, 2)
        keys = self.key_positions[:kv_len].view(1, 1, kv_len)
        mask = (keys <= positions.unsqueeze(-1)).unsqueeze(1)
        return StepInputs(rot, 0, kv_len, positions=positions, mask=mask)

    def _check_span(self, start_pos: int, seqlen: int) -> None:
        max_len = self.params.max_seq_len
        if start_pos < 0:
            raise PromptError(f"start_pos must be >= 0, got {start_pos}")
        if start_pos + seqlen > max_len:
            raise PromptTooLongError(
                f"positions {start_pos}..{start_pos + seqlen - 1} exceed max_seq_len={max_len}; "
                "build with a larger max_seq_len"
            )

    def _hidden(self, tokens: torch.Tensor, step: StepInputs) -> torch.Tensor:
        h = F.embedding(tokens, self.tok_embeddings.weight)  # fairscale's forward, traceable
        if fs_init.get_model_parallel_world_size() > 1:
            h = gather_across_ranks(h)  # each rank holds a slice of the embedding dimension
        for layer in self.layers:
            h = layer(h, step)
        return h

    def fill_cache(self, tokens: torch.Tensor, start_pos: int = 0, row_offset: int = 0) -> None:
        """Run ``tokens`` through the layers only to store their keys and values."""
        self._hidden(tokens, self.step_inputs(tokens.shape[1], start_pos, row_offset=row_offset))

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        *,
        positions: torch.Tensor | None = None,
        kv_len: int | None = None,
        logits_index: torch.Tensor | None = None,
        row_offset: int = 0,
    ) -> torch.Tensor:
        """Run the decoder and return float32 logits.

        Args:
            tokens: (B, T) token ids.
            start_pos: position of ``tokens[:, 0]`` when all rows share positions.
            positions: optional (B, T) per-row positions (overrides ``start_pos``); keys at
                positions greater than a query's are masked.
            kv_len: number of cache positions to attend over with ``positions`` (defaults to
                max_seq_len, a static shape for torch.compile).
            logits_index: optional (B,) index into T; then only those positions are projected
                to the vocabulary and (B, V) is returned, else (B, T, V).
            row_offset: first KV-cache row used by this batch (rows are independent).
        """
        bsz, seqlen = tokens.shape
        if row_offset < 0 or row_offset + bsz > self.params.max_batch_size:
            raise ConfigError(
                f"cache rows {row_offset}..{row_offset + bsz - 1} exceed max_batch_size="
                f"{self.params.max_batch_size}"
            )
        if self._fused_owns and not torch.compiler.is_compiling():  # fused: see fuse_projections
            self._check_fused()  # compiled steps run after an eager prefill has checked
        logits = self._native_decode(tokens, start_pos, positions, kv_len, row_offset)
        if logits is not None:  # seqlen is 1: logits_index can only pick position 0
            return logits if logits_index is not None else logits.unsqueeze(1)
        h = self._hidden(tokens, self.step_inputs(seqlen, start_pos, positions, kv_len, row_offset))
        if logits_index is not None:
            h = h[torch.arange(bsz, device=h.device), logits_index].unsqueeze(1)
            return linear(self.output, self.norm(h)).float().squeeze(1)
        return linear(self.output, self.norm(h)).float()


def _owned(d: dict[str, Any], key: str, obj: Any) -> tuple[dict[str, Any], str, Any, int | None]:
    """An entry of Transformer._decoder_owns or _fused_owns: where ``obj`` lives and, for a
    tensor, its :func:`codellama.native.buffer_key`."""
    return d, key, obj, buffer_key(obj) if isinstance(obj, torch.Tensor) else None


def _still_owned(entries: list[tuple[dict[str, Any], str, Any, int | None]]) -> bool:
    """Whether every :func:`_owned` entry still holds the same object with the same storage:
    a replaced parameter, or one whose ``.data`` was swapped (``model.half()``, ``.to()``)."""
    return all(
        (buffer is None or holds(obj, buffer)) and d.get(key) is obj
        for d, key, obj, buffer in entries
    )


def _weight(m: nn.Module) -> torch.Tensor:
    w = m.weight
    assert isinstance(w, torch.Tensor)
    return w


def _named_linears(model: Transformer) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            yield name, module


def _logical_shape(module: nn.Module) -> tuple[int, int] | None:
    """(N, K) of a linear weight kept packed (ours or oneDNN's); None for a plain one."""
    plan = _packed_plan(module)
    if plan is not None:
        return plan.n, plan.k
    weight = _weight(module)
    return (int(weight.shape[0]), int(weight.shape[1])) if weight.is_mkldnn else None


def _plain_linear_weights(
    model: Transformer, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """state_dict post-hook: packed linear weights as plain (N, K) tensors."""
    for name, module in _named_linears(model):
        key = f"{prefix}{name}.weight"
        if key not in state_dict or _logical_shape(module) is None:
            continue
        plan = _packed_plan(module)
        state_dict[key] = (
            plan.unpack() if plan is not None and plan.unpack else _weight(module).to_dense()
        )


def _unpack_for_loading(
    model: Transformer, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """load_state_dict pre-hook: a packed linear weight that the state dict replaces with a
    plain one of its logical shape becomes a plain tensor to copy into (packed again after)."""
    for name, module in _named_linears(model):
        key = f"{prefix}{name}.weight"
        shape = _logical_shape(module)
        new = state_dict.get(key)
        if shape is None or not isinstance(new, torch.Tensor) or tuple(new.shape) != shape:
            continue  # kept; a wrong shape is reported by torch
        plain = torch.empty(shape, dtype=model.dtype, device=model.device)
        module.weight = nn.Parameter(plain, requires_grad=False)
        module.__dict__["native_plan"] = None
        model._repack_after_load = True


def _pack_after_loading(model: Transformer, incompatible_keys: Any) -> None:
    """load_state_dict post-hook: pack the weights just loaded and plan the kernels again."""
    if not model._repack_after_load:
        return
    model._repack_after_load = False
    model.prepack_cpu_weights()
    if model.device.type == "cpu":
        model.use_native_kernel(model.native_kernel)


def _packed_plan(module: nn.Module) -> LinearPlan | None:
    """The plan of a linear ``module`` whose weight is (still) in the native packed layout."""
    plan: LinearPlan | None = module.__dict__.get("native_plan")
    if plan is not None and plan.owned_layout and plan.holds_weight(_weight(module)):
        return plan
    return None


def _cuts_packable(cuts: tuple[int, ...], dim: int, size: int, dtype: torch.dtype) -> bool:
    """Whether pieces cut at ``cuts`` along ``dim`` can be packed one by one: any rows, but
    bf16 columns only between the packed layout's pairs (the last cut: anywhere)."""
    step = 2 if dim == 1 and dtype == torch.bfloat16 else 1
    return all(c % step == 0 or c == size for c in cuts)


def _fusable(layers: list[nn.Module]) -> bool:
    ws = [_weight(m) for m in layers]
    return all(w.layout == torch.strided and not w.is_mkldnn and w.dim() == 2 for w in ws) and (
        len({(w.dtype, w.device, w.shape[1:]) for w in ws}) == 1
    )


def fuse_rows(layers: list[nn.Module]) -> torch.Tensor:
    """Stack the layers' weights (out, in) into one (sum of out, in) matrix and make each
    weight a view of its rows, so loading or updating a weight in place updates both."""
    fused = torch.cat([_weight(m).detach() for m in layers])
    row = 0
    for m in layers:
        n = _weight(m).shape[0]
        _weight(m).data = fused[row : row + n]
        row += n
    return fused


def is_fused(layers: list[nn.Module], fused: torch.Tensor) -> bool:
    """Whether each weight is still the view of ``fused`` that :func:`fuse_rows` made."""
    row, row_bytes = 0, fused.stride(0) * fused.element_size()
    for m in layers:
        w = _weight(m)
        if w.is_mkldnn or w.dtype != fused.dtype or w.device != fused.device:
            return False
        if w.shape[1:] != fused.shape[1:] or w.data_ptr() != fused.data_ptr() + row * row_bytes:
            return False
        row += w.shape[0]
    return row == fused.shape[0]


def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)``; a few rows on CUDA go through :mod:`codellama.gpu_kernels`."""
    if gpu_kernels.applies(x, weight):
        return gpu_kernels.small_matmul(x, weight)
    return F.linear(x, weight)


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a fairscale parallel linear layer: through the native kernel where it has a plan
    (:mod:`codellama.native`: every row count for weights in its packed layout, a few rows
    otherwise), through oneDNN if its weight is prepacked, else as a plain product; then the
    layer's all-reduce or gather across model-parallel ranks. fairscale's own forward is not
    called: its autograd Functions cannot be traced by torch.compile (a graph break, so a
    CUDA graph, per linear), and inference needs no autograd."""
    weight = layer.weight
    plan = layer.__dict__.get("native_plan")
    if plan is not None and plan.accepts(x, weight):
        out = plan(x)
    elif weight.is_mkldnn:
        out = torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    elif isinstance(weight, torch.Tensor) and weight.dim() != 2:
        raise UnsupportedError(_packed_weight_error(plan, x, weight))
    else:
        out = matmul(x, weight)  # type: ignore[arg-type]
    if fs_init.get_model_parallel_world_size() == 1:
        return out  # nothing to reduce or gather (and fairscale's wrappers cost ~2%)
    if isinstance(layer, fs_layers.RowParallelLinear):
        return reduce_across_ranks(out)  # sum the ranks' partial products
    if isinstance(layer, fs_layers.ColumnParallelLinear) and layer.gather_output:
        return gather_across_ranks(out)
    return out


def _packed_weight_error(plan: LinearPlan | None, x: torch.Tensor, weight: torch.Tensor) -> str:
    """Why a weight in the native packed layout (3-D or 4-D) cannot be multiplied here."""
    what = "a linear weight in codellama's packed CPU layout"
    if plan is None or not plan.holds_weight(weight):
        return (
            f"{what} ({tuple(weight.shape)}, {weight.dtype}) was changed in place (e.g. by "
            "model.to() or model.half()) and can no longer be read; build the model again "
            "with Llama.build(..., dtype=...), or call model.use_native_kernel(None) first to "
            "get plain weights"
        )
    if torch.compiler.is_compiling():
        return (
            f"{what} cannot be traced by torch.compile; use Llama.build(..., compile=True), "
            "which keeps plain weights, or call model.use_native_kernel(None) first"
        )
    return f"{what} ({plan.dtype}) cannot multiply {x.dtype} inputs; pass {plan.dtype} inputs"


def reduce_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the model-parallel ranks; traceable by torch.compile (functional
    collectives), fairscale's autograd-aware all-reduce otherwise."""
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol  # ~0.3 s to import

        return funcol.all_reduce(x, "sum", fs_init.get_model_parallel_group())
    return reduce_from_model_parallel_region(x)  # type: ignore[no-any-return]


def gather_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the ranks' ``x`` along the last dimension, in rank order."""
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol

        group = fs_init.get_model_parallel_group()
        return funcol.all_gather_tensor(x.contiguous(), x.dim() - 1, group)
    return gather_from_model_parallel_region(x)  # type: ignore[no-any-return]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, looked up on first use; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def _return_freed_memory() -> None:
    """Give free heap pages back to the OS (glibc), so RSS follows what is really in use."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def _keep(x: torch.Tensor) -> torch.Tensor:
    """fairscale init_method that leaves weights as allocated (they are loaded later)."""
    return x


@contextlib.contextmanager
def _no_fairscale_init() -> Iterator[None]:
    """Skip fairscale's weight initialisation, which builds a full-size "master" weight per
    layer on every rank (slow, memory-hungry, and impossible on the meta device)."""
    original = fs_layers._initialize_affine_weight
    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fs_layers._initialize_affine_weight = original


def build_empty(args: ModelArgs, device: torch.device | str, dtype: torch.dtype) -> Transformer:
    """A Transformer whose parameters are allocated, uninitialised, on ``device`` in ``dtype``.

    Nothing is allocated twice: fairscale's layers are created without initialisation and
    each parameter is replaced by one empty tensor (the loader fills them).
    """
    with _no_fairscale_init(), torch.device("meta"):
        model = Transformer(args)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            empty = torch.empty(param.shape, dtype=dtype, device=device)
            setattr(module, name, nn.Parameter(empty, requires_grad=False))
    return model


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters (prepacked ones included)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def weight_bytes(
    args: ModelArgs,
    dtype: torch.dtype,
    model_parallel_size: int = 1,
    linear_dtype: torch.dtype | None = None,
) -> int:
    """Bytes of the weights one process holds for ``args`` (vocab_size must be set); the
    linear layers' in ``linear_dtype`` where it differs (an fp32 model keeping bf16)."""
    q, kv, hid = args.n_heads * args.head_dim, args.kv_heads * args.head_dim, args.ffn_hidden_dim
    mp = model_parallel_size
    linear = args.n_layers * args.dim * (2 * q + 2 * kv + 3 * hid) // mp + args.vocab_size * (
        args.dim // mp
    )
    other = args.n_layers * 2 * args.dim + args.vocab_size * args.dim // mp + args.dim
    size = dtype.itemsize
    linear_size = (linear_dtype or dtype).itemsize
    return linear * linear_size + other * size


def kv_cache_bytes(args: ModelArgs, dtype: torch.dtype, model_parallel_size: int = 1) -> int:
    """Bytes of the KV cache per process for ``args``' batch and sequence sizes."""
    per_token = 2 * args.n_layers * (args.kv_heads // model_parallel_size) * args.head_dim
    elem = dtype.itemsize
    return per_token * args.max_batch_size * args.max_seq_len * elem


__all__ = [
    "Attention",
    "FeedForward",
    "KVCache",
    "ModelArgs",
    "RMSNorm",
    "StepInputs",
    "Transformer",
    "TransformerBlock",
    "apply_rotary",
    "kv_cache_bytes",
    "parameter_bytes",
    "rope_table",
    "rope_tables",
    "rotate_complex",
    "rotate_real",
    "weight_bytes",
]
