"""Native CPU kernels for decoding, compiled for this CPU on first use.

Decoding reads every weight once per step for a handful of rows, so it runs at the speed of
a matrix-vector product, which is bound by memory bandwidth. ``native_linear.c`` has:

- its own blocked weight layout (:meth:`NativeLinear.pack`): blocks of 64 output rows, as
  oneDNN prepacks them, written in one pass from the checkpoint's tensors, so that loading
  costs one copy (oneDNN's reorder costs about two, after a conversion);
- fp32 products on weights kept in bf16: an fp32 model keeps a bf16 checkpoint's weights
  (Meta's are bf16) in bf16, which holds them exactly, for half the memory and half the
  bytes per decoding step, with results bit-identical to fp32 weights;
- products for any number of rows on it: 1.1-1.5x faster than oneDNN for the 1-8 rows of
  decoding (2-core AVX512-BF16 EPYC, see the README) and about its speed for prefill's
  hundreds, with AVX-512 or with AVX2 + FMA (its own 8-wide tiles; bf16 widened to fp32);
  they also read plain weights and oneDNN's prepacked ones;
- a whole decoding step (:class:`DecoderPlan`): embedding, every layer and the logits in
  one call, because between torch ops the caches go cold after each pass over the weights
  and a step of ~25 small ops per layer spends 2.5-3.5 ms of 13 on dispatch alone;
- greedy decoding's argmax and finiteness check in one call.

It is built with the system C compiler into a per-CPU cache and loaded with ctypes: no
build step at install time, and nothing changes where it cannot be built (no compiler, not
Linux, ``CODELLAMA_NATIVE_KERNELS=0``): the model then uses oneDNN or ``F.linear`` and its
torch layers. Prefill's attention stays with torch.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from . import paths
from .errors import ConfigError, PromptTooLongError

SOURCE = Path(__file__).with_name("native_linear.c")
LIBRARY = "libcodellama_linear.so"  # in the cache under a key of source, flags, CPU and CC
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
PORTABLE_FLAGS = tuple(f for f in FLAGS if f != "-march=native")
ENV_SWITCH = "CODELLAMA_NATIVE_KERNELS"
MAX_ROWS = 8  # beyond this many rows of x a blocked GEMM (oneDNN, BLAS) is faster
BLOCK = 64  # output rows per block in oneDNN's prepacked layout (see native_linear.c)

_last_error: str | None = None
_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16"}


PACKED = -1  # buffer_key of a oneDNN tensor: its buffer is reached through oneDNN's ops


def buffer_key(t: torch.Tensor) -> int:
    """What identifies ``t``'s storage for a plan that holds a pointer into it: the data
    pointer of a plain tensor, PACKED for a oneDNN one."""
    return PACKED if t.is_mkldnn else t.data_ptr()


def holds(t: torch.Tensor, key: int) -> bool:
    """Whether ``t`` still has the storage ``key`` was taken from: ``param.data = ...`` (as
    ``model.half()`` and ``.to()`` do) keeps the object but frees the old buffer."""
    return t.is_mkldnn if key == PACKED else t.data_ptr() == key


@dataclass(eq=False)
class LinearPlan:
    """How one weight is multiplied natively: its layout, data pointer and kernel."""

    weight: torch.Tensor  # kept so that the pointer stays valid; checked by identity
    fn: ctypes._CFuncPtr  # type: ignore[name-defined]
    ptr: int
    n: int
    k: int
    padded_k: int  # 0: row-major; else K rounded up inside the 64-row blocks
    # The weight is in codellama's own blocked layout (NativeLinear.pack): only these kernels
    # read it, so they take every number of rows; `unpack` gives it back as a plain matrix.
    owned_layout: bool = False
    unpack: Callable[[], torch.Tensor] | None = None
    # The dtype of inputs and outputs, when not the weight's: fp32 on a weight kept in bf16
    # (exact for values from a bf16 checkpoint; see NativeLinear.storage_dtype).
    compute: torch.dtype | None = None
    dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        self.dtype = self.compute or self.weight.dtype
        self._max_numel = None if self.owned_layout else MAX_ROWS * self.k
        self._buffer = buffer_key(self.weight)

    @property
    def w16(self) -> bool:
        """Whether an fp32 weight is kept as bf16 (bf16 pairs in the packed layout)."""
        return self.weight.dtype != self.dtype

    def holds_weight(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` is the planned tensor, still in the storage planned
        (``param.data = ...`` keeps the object but not the storage)."""
        return weight is self.weight and holds(weight, self._buffer)

    def accepts(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether :meth:`__call__` should handle ``x`` (else use oneDNN / F.linear): only
        for the planned weight, still in the storage planned."""
        return (
            self.holds_weight(weight)
            and (self._max_numel is None or x.numel() <= self._max_numel)
            and x.dtype == self.dtype
            and not torch.compiler.is_compiling()
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.k:
            raise ValueError(f"expected inputs with {self.k} features, got {tuple(x.shape)}")
        if not x.is_contiguous():
            x = x.contiguous()
        out = x.new_empty((*x.shape[:-1], self.n))
        rows, threads = x.numel() // self.k, torch.get_num_threads()
        status = self.fn(
            x.data_ptr(), self.ptr, out.data_ptr(), rows, self.n, self.k, self.padded_k, threads
        )
        if status != 0:
            raise MemoryError("native linear: out of memory for an fp32 copy of the input")
        return out


class NativeLinear:
    """The compiled library: plans per weight, each checked against torch before use."""

    def __init__(self, library: ctypes.CDLL, path: Path):
        self.path = path
        self.bf16_dot_product = bool(library.codellama_bf16_dot_product())
        self.avx512 = bool(library.codellama_avx512())  # see preferred()
        self.avx2 = bool(library.codellama_avx2())
        # bf16 products: AVX512-BF16 dot products, or AVX2 on bf16 widened to fp32
        self.bf16_products = self.bf16_dot_product or self.avx2
        self._row_major = {}
        self._blocked = {}
        for dtype, name in _NAMES.items():
            self._row_major[dtype] = self._function(library, f"codellama_linear_{name}")
            if dtype == torch.float32 or self.bf16_products:
                self._blocked[dtype] = self._function(library, f"codellama_linear_{name}_blocked")
        self._blocked_w16 = self._function(library, "codellama_linear_f32w16_blocked")
        self._layouts: dict[tuple, int | None] = {}
        # By the dtype stored: bf16 packing needs no bf16 arithmetic (fp32 models keep bf16
        # checkpoints' weights so), bf16 products do (can_pack).
        self._pack = {
            torch.float32: library.codellama_pack_f32,
            torch.bfloat16: library.codellama_pack_bf16,
        }
        for fn in self._pack.values():
            # src, src_bf16, ld, dst, N, K, dst_k, k_off, release_src, threads
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
            fn.argtypes += [ctypes.c_long] * 4 + [ctypes.c_int, ctypes.c_int]
            fn.restype = ctypes.c_int
        self._fill = library.codellama_fill  # dst, dst_f32, src, src_bf16, n, release, threads
        self._fill.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        self._fill.argtypes += [ctypes.c_long, ctypes.c_int, ctypes.c_int]
        self._fill.restype = ctypes.c_int
        self._populate = library.codellama_populate  # ptr, bytes, threads
        self._populate.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
        self._populate.restype = ctypes.c_int
        self._unpack = library.codellama_unpack  # src, bf16, dst, N, K, threads
        self._unpack.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        self._unpack.argtypes += [ctypes.c_long, ctypes.c_long, ctypes.c_int]
        self._unpack.restype = ctypes.c_int
        self._argmax = library.codellama_argmax_f32
        self._argmax.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long]
        self._argmax.argtypes += [ctypes.c_void_p, ctypes.c_void_p]
        self._argmax.restype = None
        self._attention = {}  # AVX2 builds: causal prefill attention (else SDPA)
        if self.avx2:
            for dtype, name in _NAMES.items():
                fn = getattr(library, f"codellama_prefill_attention_{name}")
                # q, q_sb, q_st, cache_k, cache_v, c_sb, c_sh, out, B, T, H, Hkv, D, start,
                # threads
                fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p]
                fn.argtypes += [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p]
                fn.argtypes += [ctypes.c_long] * 6 + [ctypes.c_int]
                fn.restype = ctypes.c_int
                self._attention[dtype] = fn
        self._decoders = {torch.float32: library.codellama_decode_step_f32}
        if self.bf16_products:
            self._decoders[torch.bfloat16] = library.codellama_decode_step_bf16
        for fn in self._decoders.values():
            # layers, n_layers, head, tokens, M, row0, pos, kv_len, rope, logits, picks,
            # finite, threads
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
            fn.argtypes += [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long]
            fn.argtypes += [ctypes.c_void_p] * 4 + [ctypes.c_int]
            fn.restype = ctypes.c_int

    @staticmethod
    def _function(library: ctypes.CDLL, name: str) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
        """(x, W, y, M, N, K, Kp, threads) -> status: the signature of every linear kernel."""
        fn = getattr(library, name)
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 4 + [ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn

    def _plan(self, weight: torch.Tensor, ptr: int, padded_k: int) -> LinearPlan:
        fn = self._blocked[weight.dtype] if padded_k else self._row_major[weight.dtype]
        return LinearPlan(weight, fn, ptr, weight.shape[0], weight.shape[1], padded_k)

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in self._row_major

    def can_pack(self, dtype: torch.dtype) -> bool:
        """Whether a model in ``dtype`` can keep its weights in the blocked layout
        (:meth:`pack`): this build multiplies ``dtype`` inputs by them."""
        return dtype in self._blocked

    @staticmethod
    def storage_dtype(dtype: torch.dtype, source: torch.dtype) -> torch.dtype:
        """The dtype to pack a weight of a ``dtype`` model in, from a checkpoint tensor of
        ``source`` dtype: bf16 for an fp32 model's bf16 weights, which bf16 holds exactly
        (half the memory and bytes read per step; products and sums stay fp32 and
        bit-identical, see native_linear.c's w16 kernels), else ``dtype``."""
        return torch.bfloat16 if (dtype, source) == (torch.float32, torch.bfloat16) else dtype

    def pack(self, weight: torch.Tensor, dtype: torch.dtype, mapped: bool = False) -> torch.Tensor:
        """``weight`` (N, K) in ``dtype``, in codellama's blocked layout: blocks of 64 output
        rows, fp32 as (ceil(N/64), K, 64) and bf16 as (ceil(N/64), ceil(K/2), 64, 2), zero
        padded; see native_linear.c. One pass over ``weight`` (any strides, converted on the
        way from fp32 or bf16), the threads writing disjoint blocks. ``mapped``: ``weight``
        is a view of a checkpoint file mapped by the loader, whose pages the threads drop
        from memory as they finish with them (never pass it for other memory: it would be
        zeroed)."""
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D weight, got {tuple(weight.shape)}")
        n, k = weight.shape
        packed = self.empty_packed(n, k, dtype)
        self.pack_piece(packed, n, k, weight, mapped=mapped)
        return packed

    def empty_packed(self, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
        """Room for an (n, k) weight in the blocked layout, to be filled by :meth:`pack_piece`."""
        if dtype not in self._pack:
            raise ValueError(f"the native kernels cannot pack {dtype} weights")
        blocks, padded_k = -(-n // BLOCK), _padded_k(k, dtype)
        if dtype == torch.float32:
            return torch.empty((blocks, padded_k, BLOCK), dtype=dtype, device="cpu")
        return torch.empty((blocks, padded_k // 2, BLOCK, 2), dtype=dtype, device="cpu")

    def pack_piece(
        self,
        packed: torch.Tensor,
        n: int,
        k: int,
        piece: torch.Tensor,
        row: int = 0,
        col: int = 0,
        mapped: bool = False,
    ) -> None:
        """Write ``piece`` into rows ``row..`` and columns ``col..`` of ``packed``, an (n, k)
        weight in the blocked layout: a checkpoint shard's part of a weight that several
        shards hold, in any order. In bf16 a piece starts on an even column and ends on one
        unless it ends the weight, since columns go in pairs; rows may be cut anywhere (the
        rows of a 64-row block that two pieces share are written without touching the
        other's). ``mapped``: as for :meth:`pack`."""
        dtype = packed.dtype
        self._check_packed(packed, n, k)
        if piece.dim() != 2 or piece.device.type != "cpu":
            raise ValueError(
                f"expected a 2-D CPU piece, got {tuple(piece.shape)} on {piece.device}"
            )
        rows, cols = piece.shape
        if not (row >= 0 and row + rows <= n and col >= 0 and col + cols <= k):
            raise ValueError(f"a ({rows}, {cols}) piece at ({row}, {col}) is outside ({n}, {k})")
        if dtype == torch.bfloat16 and (col % 2 or (cols % 2 and col + cols != k)):
            raise ValueError(
                f"a ({rows}, {cols}) bf16 piece at column {col} of a weight of {k} columns "
                "splits a pair of columns (the packed layout keeps columns 2i and 2i+1 together)"
            )
        if piece.dtype not in (torch.float32, torch.bfloat16) or piece.stride(1) != 1:
            piece, mapped = piece.to(dtype).contiguous(), False  # a copy: our own memory
        if rows == 0 or cols == 0:
            return
        end = row + rows
        head = min(-row % BLOCK, rows)  # rows before the first block boundary
        body_end = end if end == n else end - end % BLOCK  # the last block: zero padded
        if head:
            self._write_rows(packed, piece[:head], row, col)
        if body_end > row + head:
            block_bytes = packed[0].numel() * packed.element_size()
            body = piece[head : body_end - row]
            status = self._pack[dtype](
                body.data_ptr(), int(body.dtype == torch.bfloat16), body.stride(0),
                packed.data_ptr() + (row + head) // BLOCK * block_bytes, body.shape[0], cols,
                k, col, int(mapped), torch.get_num_threads(),
            )  # fmt: skip
            if status != 0:
                raise MemoryError("native pack: out of memory for a thread's tile")
        if end > max(body_end, row + head):
            start = max(body_end, row + head)
            self._write_rows(packed, piece[start - row :], start, col)
        if end == n and n % BLOCK and head == rows:  # the pad rows the C pass did not write
            pad = piece.new_zeros((-n % BLOCK, cols))
            self._write_rows(packed, pad, n, col)

    @staticmethod
    def _write_rows(packed: torch.Tensor, rows: torch.Tensor, row: int, col: int) -> None:
        """Rows ``row..`` (within one 64-row block) of columns ``col..``, written with torch
        and leaving the block's other rows as they are."""
        block, first, count = row // BLOCK, row % BLOCK, rows.shape[0]
        assert first + count <= BLOCK
        values = rows.to(packed.dtype)
        if packed.dtype == torch.float32:  # block: (K, 64)
            packed[block, col : col + values.shape[1], first : first + count] = values.T
            return
        if values.shape[1] % 2:  # the weight's last, odd column: its pair's pad is 0
            values = torch.nn.functional.pad(values, (0, 1))
        pairs = values.view(count, -1, 2).permute(1, 0, 2)  # block: (K/2, 64, 2)
        packed[block, col // 2 : col // 2 + pairs.shape[0], first : first + count] = pairs

    def _check_packed(self, packed: torch.Tensor, n: int, k: int) -> None:
        dtype = packed.dtype
        want = -(-n // BLOCK) * BLOCK * _padded_k(k, dtype)
        if dtype not in self._pack or packed.numel() != want or not packed.is_contiguous():
            raise ValueError(f"not a packed ({n}, {k}) {dtype} weight: {tuple(packed.shape)}")

    def fill(self, dst: torch.Tensor, src: torch.Tensor, mapped: bool = False) -> None:
        """``dst.copy_(src)``, with ``dst``'s memory mapped in first by the threads (one call
        each, see native_linear.c's populate): 1.3-1.5x faster into fresh memory.
        ``mapped``: as for :meth:`pack`."""
        kinds = (torch.float32, torch.bfloat16)
        if not (dst.is_contiguous() and dst.device.type == "cpu"):
            dst.copy_(src)
            return
        threads = torch.get_num_threads()
        if (
            src.is_contiguous()
            and src.device.type == "cpu"
            and src.shape == dst.shape
            and dst.dtype in kinds
            and src.dtype in kinds
        ):
            status = self._fill(
                dst.data_ptr(), int(dst.dtype == torch.float32), src.data_ptr(),
                int(src.dtype == torch.bfloat16), dst.numel(), int(mapped), threads,
            )  # fmt: skip
            if status == 0:
                return
        self._populate(dst.data_ptr(), dst.numel() * dst.element_size(), threads)
        from .checkpoint import copy_releasing  # imports nothing of this module

        copy_releasing(dst, src, release=mapped)  # a block of rows at a time

    def plan_packed(
        self, packed: torch.Tensor, n: int, k: int, dtype: torch.dtype | None = None
    ) -> LinearPlan:
        """The plan for an (n, k) weight that :meth:`pack` made, for inputs of ``dtype``
        (default: the weight's; fp32 also on bf16 weights): every number of rows."""
        stored = packed.dtype
        dtype = dtype or stored
        self._check_packed(packed, n, k)
        if dtype == stored and dtype in self._blocked:
            fn = self._blocked[dtype]
        elif (dtype, stored) == (torch.float32, torch.bfloat16):
            fn = self._blocked_w16
        else:
            raise ValueError(f"no native product of {dtype} inputs and {stored} packed weights")

        def unpack() -> torch.Tensor:
            """The plain (n, k) weight, in the dtype of the plan's inputs."""
            out = torch.empty((n, k), dtype=stored, device="cpu")
            bf16 = int(stored == torch.bfloat16)
            self._unpack(packed.data_ptr(), bf16, out.data_ptr(), n, k, torch.get_num_threads())
            return out.to(dtype)

        padded_k = _padded_k(k, stored)
        return LinearPlan(packed, fn, packed.data_ptr(), n, k, padded_k, True, unpack, dtype)

    def plan(self, weight: torch.Tensor, pack_hint: int | None = None) -> LinearPlan | None:
        """A plan for an (N, K) CPU weight, plain or prepacked by oneDNN with ``pack_hint``
        (the batch size given to ``_reorder_linear_weight``, which picks the layout); None
        if its layout is not one these kernels read. The first weight of each shape and
        hint is checked against oneDNN; the others of that shape share its layout."""
        if weight.dim() != 2 or weight.device.type != "cpu" or not self.supports(weight.dtype):
            return None
        if not weight.is_mkldnn:
            return self._plan(weight, weight.data_ptr(), 0) if weight.is_contiguous() else None
        try:  # private ops of torch's oneDNN integration: absent, they leave it to oneDNN
            nbytes = int(torch.ops.mkldnn._nbytes(weight))
            ptr = int(torch.ops.mkldnn.data_ptr(weight))
        except (AttributeError, RuntimeError):
            return None
        key = (weight.dtype, *weight.shape, nbytes, pack_hint)
        if key not in self._layouts:
            self._layouts[key] = self._find_layout(weight, ptr, nbytes)
        padded_k = self._layouts[key]
        return None if padded_k is None else self._plan(weight, ptr, padded_k)

    def prefill_attention(
        self, q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, start: int
    ) -> torch.Tensor | None:
        """Causal attention of ``q`` (B, T, H, D) at positions ``start ..`` over the keys and
        values 0 .. start+T-1 of ``cache_k``/``cache_v`` (B, Hkv, >= start+T, D; the rows of
        this batch, already written): (B, T, H * D), or None where this build or these
        tensors are not served (then SDPA runs). Flash attention's order in fp32 sums; a
        row's result does not depend on the other rows or on where the prompt was cut into
        chunks (see native_linear.c)."""
        fn = self._attention.get(q.dtype)
        bsz, seqlen, heads, dim = q.shape
        if (
            fn is None
            or q.device.type != "cpu"
            or cache_k.dtype != q.dtype
            or cache_v.dtype != q.dtype
            or cache_k.shape != cache_v.shape
            or cache_k.stride() != cache_v.stride()
            or cache_k.shape[0] != bsz
            or cache_k.shape[2] < start + seqlen
            or cache_k.shape[3] != dim
            or cache_k.stride()[2:] != (dim, 1)
            or q.stride()[2:] != (dim, 1)
            or dim % 8
            or dim > 256
            or heads % cache_k.shape[1]
        ):
            return None
        out = torch.empty((bsz, seqlen, heads * dim), dtype=q.dtype, device="cpu")
        status = fn(
            q.data_ptr(), q.stride(0), q.stride(1), cache_k.data_ptr(), cache_v.data_ptr(),
            cache_k.stride(0), cache_k.stride(1), out.data_ptr(), bsz, seqlen, heads,
            cache_k.shape[1], dim, start, torch.get_num_threads(),
        )  # fmt: skip
        if status == -1:
            raise MemoryError("native prefill attention: out of memory for a thread's buffers")
        return out if status == 0 else None

    def greedy(self, logits: torch.Tensor) -> tuple[list[int], list[bool]] | None:
        """Per row of CPU float32 ``logits`` (B, V): the argmax (torch.argmax's choice) and
        whether the row is all finite; None for logits it does not take."""
        if logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu":
            return None
        if not logits.is_contiguous():  # a (B, V) view of a wider buffer: torch takes it
            return None
        rows = logits.shape[0]
        index, finite = (ctypes.c_long * rows)(), (ctypes.c_int * rows)()
        self._argmax(logits.data_ptr(), rows, logits.shape[1], index, finite)
        return list(index), [bool(f) for f in finite]

    def decoder(
        self, layers: list[DecoderLayer], head: DecoderHead, rope: torch.Tensor
    ) -> DecoderPlan | None:
        """A plan that runs decoding steps natively, or None where it cannot: a dtype
        without a native step here (bf16 without AVX512-BF16 or AVX2; with AVX2 only, on
        weights in the blocked layout), or weights, norms or caches that are not plain,
        contiguous and of one dtype."""
        if not layers:
            return None
        dtype = layers[0].attn_norm.dtype
        if dtype not in self._decoders or rope.dtype != torch.float32 or not rope.is_contiguous():
            return None
        emb, dim = head.embedding, layers[0].linears[0].k
        if head.output.dtype != dtype or head.output.k != dim or head.norm.dtype != dtype:
            return None
        if emb.dtype != dtype or emb.dim() != 2 or emb.shape != (head.output.n, dim):
            return None
        if not (emb.is_contiguous() and head.norm.is_contiguous()) or emb.device.type != "cpu":
            return None
        shape = layers[0].cache_k.shape
        for layer in layers:
            tensors = (layer.attn_norm, layer.ffn_norm, layer.cache_k, layer.cache_v)
            if len(layer.linears) != len(LAYER_LINEARS) or any(
                p.dtype != dtype for p in layer.linears
            ):
                return None
            if any(
                t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() for t in tensors
            ):
                return None
            if layer.cache_k.shape != shape or layer.cache_v.shape != shape:
                return None
            kv_heads, head_dim = shape[1], shape[3]
            if layer.n_heads % kv_heads or layer.n_heads // kv_heads > 64 or head_dim % 2:
                return None
        if dtype == torch.bfloat16 and not self.bf16_dot_product:  # AVX2: blocked bf16 only
            plans = [head.output, *(p for layer in layers for p in layer.linears)]
            if any(not p.padded_k for p in plans):
                return None
        return DecoderPlan(self._decoders[dtype], layers, head, rope)

    def _find_layout(self, weight: torch.Tensor, ptr: int, nbytes: int) -> int | None:
        """oneDNN's layout of ``weight``: padded K of the 64-row blocks, 0 for row-major
        (fp32 packed for batch 1), None for anything else. Each candidate is checked by
        multiplying with the real weight against oneDNN itself."""
        n, k = weight.shape
        size = weight.element_size()
        candidates = []
        rows = -(-n // BLOCK) * BLOCK
        if weight.dtype in self._blocked and nbytes % (size * rows) == 0:
            padded_k = nbytes // (size * rows)
            if padded_k >= k and (weight.dtype != torch.bfloat16 or padded_k % 2 == 0):
                candidates.append(padded_k)
        if nbytes == n * k * size:
            candidates.append(0)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, k, generator=gen, dtype=torch.float32, device="cpu").to(weight.dtype)
        want = torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "").double()
        for padded_k in candidates:
            if _close(self._plan(weight, ptr, padded_k)(x).double(), want, weight.dtype):
                return padded_k
        return None


LAYER_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # cl_layer's order


class _CLinear(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("n", ctypes.c_long), ("k", ctypes.c_long)]
    _fields_ += [("kp", ctypes.c_long), ("w16", ctypes.c_long)]


class _CLayer(ctypes.Structure):
    """native_linear.c's cl_layer: one decoder layer's weights, norms and KV cache."""

    _fields_ = [(name, _CLinear) for name in LAYER_LINEARS]
    _fields_ += [
        (name, ctypes.c_void_p) for name in ("attn_norm", "ffn_norm", "cache_k", "cache_v")
    ]
    _fields_ += [
        (name, ctypes.c_long)
        for name in ("n_heads", "n_kv_heads", "head_dim", "dim", "hidden", "max_seq", "cache_rows")
    ]
    _fields_ += [("eps", ctypes.c_float)]


class _CHead(ctypes.Structure):
    """native_linear.c's cl_head: the embedding, final norm and output layer."""

    _fields_ = [("embedding", ctypes.c_void_p), ("norm", ctypes.c_void_p), ("output", _CLinear)]
    _fields_ += [("vocab", ctypes.c_long), ("eps", ctypes.c_float)]


@dataclass(eq=False)
class DecoderLayer:
    """What the native decoder reads of one transformer layer; the tensors are kept so that
    their pointers stay valid (the model checks that they are still its own)."""

    linears: tuple[LinearPlan, ...]  # LAYER_LINEARS, in that order
    attn_norm: torch.Tensor  # (dim,)
    ffn_norm: torch.Tensor
    cache_k: torch.Tensor  # (rows, n_kv_heads, max_seq_len, head_dim)
    cache_v: torch.Tensor
    n_heads: int
    eps: float


@dataclass(eq=False)
class DecoderHead:
    """What the native decoder reads around the layers: token embedding, final norm and
    output layer (kept, like :class:`DecoderLayer`'s tensors, for their pointers)."""

    embedding: torch.Tensor  # (vocab, dim)
    norm: torch.Tensor  # (dim,)
    output: LinearPlan  # (vocab, dim)
    eps: float


class DecoderPlan:
    """A whole decoding step in one native call (see native_linear.c): the embedding, then
    per layer RMSNorm, q/k/v, rotary embedding, KV-cache store, attention, output projection
    and the SwiGLU feed-forward with both residual adds, then the final norm and the logits,
    for 1-8 rows of one token each. Between torch ops the CPU caches go cold after each
    pass over the weights (a ~10-op RMSNorm then costs 0.3 ms), so the fewer the better."""

    def __init__(
        self,
        fn: ctypes._CFuncPtr,  # type: ignore[name-defined]
        layers: list[DecoderLayer],
        head: DecoderHead,
        rope: torch.Tensor,
    ):
        self.fn, self.layers, self.head, self.rope = fn, layers, head, rope
        self.dtype = layers[0].attn_norm.dtype
        self.vocab_size = head.output.n
        out = head.output
        self._head = _CHead(
            head.embedding.data_ptr(), head.norm.data_ptr(),
            _CLinear(out.ptr, out.n, out.k, out.padded_k, out.w16), out.n, head.eps,
        )  # fmt: skip
        self._structs = (_CLayer * len(layers))()
        for struct, layer in zip(self._structs, layers, strict=True):
            for name, plan in zip(LAYER_LINEARS, layer.linears, strict=True):
                c_linear = _CLinear(plan.ptr, plan.n, plan.k, plan.padded_k, plan.w16)
                setattr(struct, name, c_linear)
            rows, kv_heads, max_seq, head_dim = layer.cache_k.shape
            struct.attn_norm, struct.ffn_norm = (
                layer.attn_norm.data_ptr(),
                layer.ffn_norm.data_ptr(),
            )
            struct.cache_k, struct.cache_v = layer.cache_k.data_ptr(), layer.cache_v.data_ptr()
            struct.n_heads, struct.n_kv_heads, struct.head_dim = layer.n_heads, kv_heads, head_dim
            struct.dim, struct.hidden = layer.linears[0].k, layer.linears[4].n
            struct.max_seq, struct.cache_rows, struct.eps = max_seq, rows, layer.eps
        self._positions = (ctypes.c_long * MAX_ROWS)()
        self._finite = (ctypes.c_int * MAX_ROWS)()
        # the last step's logits and greedy picks (see picks): kept, so that no other
        # tensor can take the logits' memory while they are
        self._last: tuple[torch.Tensor, torch.Tensor, list[bool]] | None = None

    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | int,
        kv_len: int,
        row_offset: int = 0,
    ) -> torch.Tensor:
        """float32 logits (B, vocab) of ``tokens`` (B, 1), B <= 8, each written to the KV
        cache at its position: ``positions`` per row (a (B, 1) tensor) or shared (an int)."""
        rows = tokens.shape[0]
        if tokens.dim() != 2 or tokens.shape[1] != 1 or not 1 <= rows <= MAX_ROWS:
            raise ValueError(f"expected (1..{MAX_ROWS}, 1) tokens, got {tuple(tokens.shape)}")
        if tokens.dtype != torch.long or not tokens.is_contiguous():
            tokens = tokens.to(torch.long).contiguous()
        if isinstance(positions, int):
            for i in range(rows):
                self._positions[i] = positions
            pos_ptr: int | ctypes.Array = self._positions
        else:
            positions = positions.reshape(-1).to(torch.long).contiguous()
            if positions.numel() != rows:
                raise ValueError(f"expected {rows} positions, got {positions.numel()}")
            pos_ptr = positions.data_ptr()
        logits = torch.empty((rows, self.vocab_size), dtype=torch.float32, device="cpu")
        picks = torch.empty(rows, dtype=torch.long, device="cpu")
        self._run(
            tokens.data_ptr(), rows, row_offset, pos_ptr, kv_len, logits.data_ptr(),
            picks.data_ptr(), self._finite, torch.get_num_threads(), tokens.tolist,
        )  # fmt: skip
        self._last = (logits, picks, [bool(f) for f in self._finite[:rows]])
        return logits

    def _run(
        self, tokens: Any, rows: int, row_offset: int, positions: Any, kv_len: int, logits: int,
        picks: Any, finite: Any, threads: int, token_ids: Callable[[], list[Any]],
    ) -> None:  # fmt: skip
        """One native step (pointers or ctypes arrays for the buffers); a non-zero status
        raises its error (``token_ids`` gives the tokens for the message)."""
        self._last = None  # a forward call's logits are no longer the last step's
        status = self.fn(
            self._structs, len(self.layers), ctypes.byref(self._head), tokens, rows,
            row_offset, positions, kv_len, self.rope.data_ptr(), logits, picks, finite, threads,
        )  # fmt: skip
        if status != 0:
            self._raise(status, rows, row_offset, token_ids())

    def _raise(self, status: int, rows: int, row_offset: int, tokens: list[Any]) -> NoReturn:
        """The error for a step's non-zero ``status``."""
        if status == -3:
            raise PromptTooLongError(
                f"a position is outside the KV cache (max_seq_len={self._structs[0].max_seq}); "
                "build with a larger max_seq_len"
            )
        if status == -5:
            raise IndexError(
                f"a token id is outside the vocabulary (0..{self.vocab_size - 1}): {tokens}"
            )
        if status == -1:
            raise MemoryError("native decoder: out of memory for its scratch buffers")
        raise ValueError(
            f"native decoder: {rows} rows from cache row {row_offset} do not fit its plan "
            f"(status {status}); plan again with Transformer.use_native_kernel"
        )

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor whose memory a step reads or writes."""
        out: list[torch.Tensor] = [self.rope, self.head.embedding, self.head.norm]
        out.append(self.head.output.weight)
        for layer in self.layers:
            out += [plan.weight for plan in layer.linears]
            out += [layer.attn_norm, layer.ffn_norm, layer.cache_k, layer.cache_v]
        return out

    def greedy_steps(self) -> GreedySteps:
        """Greedy decoding steps for one generation: see :class:`GreedySteps`."""
        return GreedySteps(self)

    def picks(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[bool]] | None:
        """Greedy decoding's pick of each row of ``logits`` if they are the last step's
        (a view of all of them): the step took it (torch.argmax's choice) and whether each
        row is finite, while the logits were still in cache. None for any other logits."""
        last = self._last
        if last is None or logits.data_ptr() != last[0].data_ptr():
            return None
        if logits.dtype != torch.float32 or logits.device.type != "cpu":
            return None
        if logits.numel() != last[0].numel() or logits.shape[-1] != last[0].shape[-1]:
            return None
        return last[1], last[2]


class GreedySteps:
    """Greedy decoding steps of one generation through a :class:`DecoderPlan`, lean enough
    to cost little beside the step: token ids, positions and picks are plain lists, and
    the logits stay in a buffer of its own. After a step the CPU caches hold the weights
    that streamed through, not Python's objects, and each torch call or check of a module
    costs 10-100 us; these steps make neither. They keep every storage the plan reads
    alive, so a weight replaced while a stream is paused (``param.data = ...``) cannot
    leave a dangling pointer: the generation reads the weights it started with, the next
    call the new ones (the model checks them before each call plans its steps)."""

    def __init__(self, plan: DecoderPlan):
        self._plan = plan
        self._keep = [t.untyped_storage() for t in plan.tensors()]
        self._logits = torch.empty((MAX_ROWS, plan.vocab_size), dtype=torch.float32)
        self._tokens, self._positions = (ctypes.c_long * MAX_ROWS)(), (ctypes.c_long * MAX_ROWS)()
        self._picks, self._finite = (ctypes.c_long * MAX_ROWS)(), (ctypes.c_int * MAX_ROWS)()
        self._threads = torch.get_num_threads()

    def __call__(
        self, tokens: list[int], positions: list[int], kv_len: int, row_offset: int = 0
    ) -> tuple[list[int], list[bool]]:
        """Write ``tokens`` (one per row, 1-8 rows) to the KV cache at ``positions`` (per
        row, attending over the first ``kv_len`` cache positions) and return each row's
        greedy pick of the next token (torch.argmax's choice) and whether its logits are
        all finite."""
        rows = len(tokens)
        if not 1 <= rows <= MAX_ROWS or len(positions) != rows:
            raise ValueError(
                f"expected 1..{MAX_ROWS} tokens and as many positions, got {rows} and "
                f"{len(positions)}"
            )
        if kv_len < 1:
            raise ValueError(f"kv_len must be at least 1 (the token's own position), got {kv_len}")
        for i in range(rows):
            self._tokens[i], self._positions[i] = tokens[i], positions[i]
        self._plan._run(
            self._tokens, rows, row_offset, self._positions, kv_len, self._logits.data_ptr(),
            self._picks, self._finite, self._threads, lambda: list(tokens),
        )  # fmt: skip
        return self._picks[:rows], [f != 0 for f in self._finite[:rows]]


def _padded_k(k: int, dtype: torch.dtype) -> int:
    """Columns per row of the packed layout: bf16 keeps them in pairs."""
    return k + k % 2 if dtype == torch.bfloat16 else k


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    scale = max(want.abs().max().item(), 1e-30)
    return bool(torch.isfinite(got).all()) and (got - want).abs().max().item() <= tol * scale


def _switch() -> bool | None:
    """``CODELLAMA_NATIVE_KERNELS``: False when turned off, True when asked for, else None."""
    raw = os.environ.get(ENV_SWITCH, "")
    value = raw.strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    if value:
        raise ConfigError(
            f"{ENV_SWITCH}={raw!r} is not a switch: use 0 (off: oneDNN and torch's layers), "
            "1 (on, even where the build has no vector code) or leave it unset (on where the "
            "CPU has AVX2 or AVX-512)"
        )
    return None


def enabled_by_environment() -> bool:
    return _switch() is not False


def preferred(kernel: NativeLinear) -> bool:
    """Whether a model should run on ``kernel`` by default: where it was built with vector
    code for the CPU (AVX-512, or AVX2 with FMA). The portable build's products are scalar
    loops (prefill ~13x and batch-8 decoding ~3.5x slower than oneDNN's on a 2-core AMD
    EPYC, fp32 ``small``), so there oneDNN and torch run unless
    ``CODELLAMA_NATIVE_KERNELS=1`` asks for the kernels."""
    return kernel.avx512 or kernel.avx2 or _switch() is True


def last_error() -> str | None:
    """Why the most recent :func:`load` attempt returned None (for diagnostics)."""
    return _last_error


@functools.cache
def load() -> NativeLinear | None:
    """The kernels for this CPU, compiled on first use; None where they cannot be had (with
    one warning from each machine's first process where they were expected: on Linux, not
    disabled)."""
    global _last_error
    if not enabled_by_environment():
        _last_error = f"disabled by {ENV_SWITCH}"
        return None
    errors = []
    for flags in (FLAGS, PORTABLE_FLAGS):  # some compilers (or CPUs) know no -march=native
        try:
            return build(flags=flags)
        except (OSError, RuntimeError, subprocess.SubprocessError, ValueError) as exc:
            errors.append(str(exc))
    _last_error = "; ".join(dict.fromkeys(errors))
    if sys.platform.startswith("linux") and os.environ.get("LOCAL_RANK", "0") == "0":
        warnings.warn(
            f"codellama: the native CPU kernels could not be built ({_last_error[:300]}). "
            "Generation works, through oneDNN and torch, but decodes about 2x slower, and an "
            "fp32 model keeps fp32 copies of a bf16 checkpoint's weights (2x the memory). "
            f"Without a C compiler, install one or set CC; {ENV_SWITCH}=0 turns them off "
            "without this warning.",
            RuntimeWarning,
            stacklevel=2,
        )
    return None


def build(
    compiler: str | None = None, flags: tuple[str, ...] = FLAGS, cache_dir: Path | None = None
) -> NativeLinear:
    """Load the kernels built for this CPU and ``flags`` from the cache, else compile them
    there; raises if no step succeeds.

    A library already in the cache is used without a compiler (a read-only, pre-filled
    cache too); one that cannot be loaded or fails the self-test is compiled again. The
    row-major kernels are checked against float64 on small products before they are
    returned, so a miscompiled library is refused rather than used. ``compiler`` (or
    ``$CC``) may carry arguments, e.g. ``"gcc -pipe"``.
    """
    if not sys.platform.startswith("linux"):
        raise RuntimeError("native kernels are built only on Linux")
    key = hashlib.sha256()
    given = compiler or os.environ.get("CC") or ""  # a compiler asked for: its own library
    for part in (SOURCE.read_bytes(), " ".join(flags).encode(), _cpu_signature().encode(),
                 given.encode()):  # fmt: skip
        key.update(part)
        key.update(b"\0")
    name = key.hexdigest()[:16]
    roots = [cache_dir] if cache_dir is not None else _cache_roots()
    for root in roots:
        path = root / name / LIBRARY
        if path.is_file():
            try:
                return _load_checked(path)
            except (OSError, RuntimeError):
                continue  # unloadable or wrong: look on, else compile it again
    cc = _compiler_command(compiler)
    folder = _writable_folder(roots, name)
    path = folder / LIBRARY
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # a first Llama.build waits for it
        print(
            f"codellama: compiling the native CPU kernels into {folder} (once for this CPU; "
            "about 15 s on 2 cores)",
            file=sys.stderr,
            flush=True,
        )
    try:
        done = subprocess.run(
            [*cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cc)} failed: {done.stderr.strip()[:500]}")
        # Loaded and checked under its own name: a library of ``path``'s name that this
        # process already loaded (and refused) would be handed back by dlopen instead.
        kernel = _load_checked(Path(tmp), path)
        os.replace(tmp, path)  # atomic: ranks compiling at once do not clash
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return kernel


def _load_checked(path: Path, name: Path | None = None) -> NativeLinear:
    """The library at ``path`` (known as ``name``, its place in the cache), self-tested."""
    kernel = NativeLinear(ctypes.CDLL(str(path)), name or path)
    _self_test(kernel)
    return kernel


def _compiler_command(compiler: str | None) -> list[str]:
    """The C compiler's command line: ``compiler``, else ``$CC`` (split as a shell would),
    else ``cc`` or ``gcc`` on the PATH."""
    given = compiler or os.environ.get("CC")
    if given:
        try:
            command = shlex.split(given)
        except ValueError as exc:
            raise RuntimeError(f"cannot read the compiler command {given!r}: {exc}") from None
        if command:
            return command
    found = shutil.which("cc") or shutil.which("gcc")
    if not found:
        raise RuntimeError("no C compiler found (set CC)")
    return [found]


def _self_test(kernel: NativeLinear) -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype in _NAMES:
        # bf16 values: fp32 models also keep them as bf16 (storage_dtype)
        w = torch.randn(77, 71, generator=gen, dtype=torch.float32, device="cpu")
        w = w.bfloat16().to(dtype)
        want = {}
        for rows in (3, 13):
            x = torch.randn(rows, 71, generator=gen, dtype=torch.float32, device="cpu").to(dtype)
            want[rows] = x, x.double() @ w.double().T
        plans = [kernel.plan(w)]
        if kernel.can_pack(dtype):
            stored = kernel.storage_dtype(dtype, torch.bfloat16)
            n, k = w.shape
            for keep in {dtype, stored}:
                plans.append(kernel.plan_packed(kernel.pack(w, keep), n, k, dtype))
        for plan in plans:
            for x, ref in want.values():
                if plan is None or not _close(plan(x).double(), ref, dtype):
                    raise RuntimeError(f"native kernel failed its {dtype} self-test")


def _cache_roots() -> list[Path]:
    """Where built kernels are kept, in order: codellama's cache (see
    :func:`paths.cache_dir`), then this user's folder in the temp folder, if usable."""
    roots = [paths.cache_dir() / "kernels"]
    shared = _private_temp_folder()
    if shared is not None:
        roots.append(shared)
    return roots


def _private_temp_folder() -> Path | None:
    """``$TMPDIR/codellama-kernels-<uid>``, only if it is ours and closed to others: a
    library that another user could plant there would run in this process."""
    shared = Path(tempfile.gettempdir()) / f"codellama-kernels-{os.getuid()}"
    try:
        shared.mkdir(mode=0o700, exist_ok=True)
        st = shared.stat()
    except OSError:
        return None
    return shared if st.st_uid == os.getuid() and not st.st_mode & 0o022 else None


def _writable_folder(roots: list[Path], name: str) -> Path:
    """``root / name`` in the first root that can be written; else a fresh temp folder,
    removed when the process exits (a loaded library needs no file)."""
    for root in roots:
        try:
            (root / name).mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(root / name, os.W_OK):
            return root / name
    folder = Path(tempfile.mkdtemp(prefix="codellama-kernels-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _cpu_signature() -> str:
    """What -march=native depends on, so a shared cache never hands a CPU foreign code."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += line
                if line.strip() == "":
                    break  # the first processor describes them all
    except OSError:
        pass
    return text
