"""Matrix products of decoding on CUDA: Triton kernels that stream each weight once.

Decoding multiplies 1-16 rows by every weight matrix; the time is the time to read the
weights. Over one token's 7B products, replayed in a CUDA graph, these kernels read an H100's
memory at 96% of what a plain read reaches at one row (cuBLAS: 84%) and 86% at 8 rows (83%).
Launched from Python they are slower than cuBLAS, so they are used only while torch.compile
traces (see :func:`applies`). For one row they also take in what surrounds each product in a
decoder layer: the RMSNorm before q/k/v and w1/w3, SwiGLU before w2, the residual adds after
wo and w2 (:func:`rms_matmul`, :func:`swiglu_matmul_add`, :func:`matmul_add`; three kernels
fewer a layer). They are registered as torch custom ops (``codellama::small_matmul`` and the
three fused ones: each one opaque kernel to torch.compile and CUDA graphs) by :func:`enable`,
which :meth:`codellama.Llama.build` calls on CUDA; nothing is registered at import.
``CODELLAMA_TRITON_MATMUL=0`` turns them all off, ``CODELLAMA_TRITON_FUSED=0`` the fused ones.
One kernel (and one that combines its parts) also runs a decoding token's rotary embedding,
cache store and attention (:func:`decode_attention`) in place of three. Its programs take
chunks of 32 keys each (flash-decoding), so a short context's keys no longer run one block
after another on a few of the GPU's multiprocessors: on an H200 a one-row step of the 7B
shape took 3776 us with it (265 tok/s), 3916 us when a program walked a KV head's keys
alone (which, on an H100, had been 5% faster than SDPA's three kernels). It is on for one-row
batches; at more rows it has not been timed, so there it is opt-in.
``CODELLAMA_TRITON_ATTENTION=1`` uses it for every batch size, ``=0`` never.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from typing import Any

import torch

from codellama.errors import ConfigError

MAX_ROWS = 16  # rows (batch x tokens) up to which the kernels are used
_DTYPES = (torch.bfloat16, torch.float16)
_enabled = False
_failed: Exception | None = None  # the first failure of the kernels; then torch runs
_fused = False  # whether decoder layers use the fused ops (see fuses)
# Up to how many rows one-token attention uses decode_attention (see attends): 0 never.
_attention_rows = 0
EVERY_BATCH = 1 << 30  # _attention_rows for CODELLAMA_TRITON_ATTENTION=1
# Cache positions up to which decode_attention's kernels run; SDPA beyond. At 4000 positions
# they took 124 us a 7B layer on an H200: a quarter of the unchunked kernel's time, but the
# layer's 66 MB of keys and values at an eighth of the bandwidth (each program waits on its
# few loads). SDPA's time there has not been measured, so the limit stays where it was.
ATTENTION_MAX_KEYS = 4096


def enable() -> bool:
    """Register the custom op (once) if Triton is importable and CUDA is there; returns
    whether :func:`applies` can be true."""
    global _enabled, _fused, _attention_rows
    if os.environ.get("CODELLAMA_TRITON_MATMUL", "1") == "0" or not torch.cuda.is_available():
        return False
    try:
        _register()
    except ImportError:  # no Triton (a CPU build of torch)
        return False
    _enabled = True
    _fused = os.environ.get("CODELLAMA_TRITON_FUSED", "1") != "0"
    _attention_rows = _attention_setting(os.environ.get("CODELLAMA_TRITON_ATTENTION", ""))
    return True


def _attention_setting(value: str) -> int:
    """Rows up to which decode_attention runs, from ``CODELLAMA_TRITON_ATTENTION``: unset,
    one row (timed faster on an H100); ``1``, every batch; ``0``, never."""
    value = value.strip()
    rows = {"": 1, "auto": 1, "1": EVERY_BATCH, "0": 0}.get(value)
    if rows is not None:
        return rows
    raise ConfigError(
        f"CODELLAMA_TRITON_ATTENTION must be 0 (off), 1 (every batch size) or unset (one-row "
        f"batches), got {value!r}"
    )


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` should run through ``codellama::small_matmul``: only while
    torch.compile traces (then CUDA graphs replay it); launched eagerly from Python, a Triton
    kernel costs more than the product itself (7B eager decoding: 40 tok/s against 51)."""
    return (
        _enabled
        and torch.compiler.is_compiling()
        and weight.is_cuda
        and weight.dtype in _DTYPES
        and x.dtype == weight.dtype
        and weight.dim() == 2
        and weight.stride(1) == 1
        and x.numel() <= MAX_ROWS * x.shape[-1]
    )


def small_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for a few rows, through the registered op."""
    return torch.ops.codellama.small_matmul(x, weight)  # type: ignore[no-any-return]


def fuses(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether a decoder layer can run as the fused products below: every weight as
    :func:`applies` needs, and fusion not turned off (``CODELLAMA_TRITON_FUSED=0``). The
    caller checks that one process holds the whole model (the residual is added in the
    products, before which model-parallel ranks would have to sum their parts)."""
    return _fused and all(applies(x, w) for w in weights)


def rms_matmul(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor
) -> torch.Tensor:
    """``F.linear(RMSNorm(x), weight)`` in one kernel: the norm's sum of squares is
    accumulated while the rows are read for the product, and applied to its result (fp32
    throughout, where the unfused path rounds the normed rows to the model's dtype)."""
    return torch.ops.codellama.rms_matmul(x, norm_weight, eps, weight)  # type: ignore[no-any-return]


def matmul_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + F.linear(x, weight)`` in one kernel (rounded as the two steps are)."""
    return torch.ops.codellama.matmul_add(x, weight, residual)  # type: ignore[no-any-return]


def swiglu_matmul_add(
    gate_up: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """``residual + F.linear(silu(gate) * up, weight)``, ``gate, up = gate_up.chunk(2, -1)``,
    in one kernel (rounded as the unfused steps are)."""
    return torch.ops.codellama.swiglu_matmul_add(gate_up, weight, residual)  # type: ignore[no-any-return]


def _reference(op: str, *args: Any) -> torch.Tensor:
    """What each op computes, in torch: run where the kernels cannot."""
    F = torch.nn.functional
    if op == "decode_attention":
        return attention_reference(*args)
    x, weight, *extra = args
    if op == "rms_matmul":
        from .model import rms_norm  # model imports this module

        norm_weight, eps = extra
        return F.linear(rms_norm(x, norm_weight, eps), weight)
    if op == "matmul_add":
        return extra[0] + F.linear(x, weight)
    if op == "swiglu_matmul_add":
        gate, up = x.chunk(2, dim=-1)
        return extra[0] + F.linear(F.silu(gate) * up, weight)
    return F.linear(x, weight)


def _launch(op: str, *args: Any) -> torch.Tensor:
    if op == "decode_attention":
        qkv, rotation, positions, k_cache, v_cache, row_offset, heads, kv_heads, kv_len = args
        if kv_len > ATTENTION_MAX_KEYS:  # see ATTENTION_MAX_KEYS
            return attention_reference(*args)
        return launch_attention(
            qkv, rotation, positions, k_cache, v_cache, row_offset, heads, kv_heads, kv_len,
            _attention_kernel(),
        )  # fmt: skip
    x, weight, *extra = args
    if op == "rms_matmul":
        return launch(x, weight, _kernels(), norm=(extra[0], extra[1]))
    if op == "matmul_add":
        return launch(x, weight, _kernels(), residual=extra[0])
    if op == "swiglu_matmul_add":
        return launch(x, weight, _kernels(), residual=extra[0], swiglu=True)
    return launch(x, weight, _kernels())


def _run(op: str, *args: Any) -> torch.Tensor:
    """The kernel for ``op``, or its torch reference after a kernel has failed once."""
    global _failed
    if _failed is None:
        try:
            return _launch(op, *args)
        except Exception as exc:  # a Triton that cannot build or run them here
            _failed = exc
            instead = "SDPA" if op == "decode_attention" else "F.linear"
            warnings.warn(
                f"codellama: the Triton kernels failed ({exc!r:.200}); using {instead} "
                "instead (set CODELLAMA_TRITON_MATMUL=0 to skip them)",
                RuntimeWarning,
                stacklevel=3,
            )
    return _reference(op, *args)


@functools.cache
def _register() -> None:
    _kernels()
    _attention_kernel()
    lib = "codellama::"

    @torch.library.custom_op(lib + "small_matmul", mutates_args=())  # type: ignore[misc]
    def _small(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _run("small_matmul", x, weight)

    @torch.library.custom_op(lib + "rms_matmul", mutates_args=())  # type: ignore[misc]
    def _rms(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return _run("rms_matmul", x, weight, norm_weight, eps)

    @torch.library.custom_op(lib + "matmul_add", mutates_args=())  # type: ignore[misc]
    def _add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return _run("matmul_add", x, weight, residual)

    @torch.library.custom_op(lib + "swiglu_matmul_add", mutates_args=())  # type: ignore[misc]
    def _swiglu(gate_up: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return _run("swiglu_matmul_add", gate_up, weight, residual)

    @torch.library.custom_op(lib + "decode_attention", mutates_args=("k_cache", "v_cache"))  # type: ignore[misc]
    def _attend(
        qkv: torch.Tensor, rotation: torch.Tensor, positions: torch.Tensor,
        k_cache: torch.Tensor, v_cache: torch.Tensor, row_offset: int, heads: int,
        kv_heads: int, kv_len: int,
    ) -> torch.Tensor:  # fmt: skip
        return _run("decode_attention", qkv, rotation, positions, k_cache, v_cache,
                    row_offset, heads, kv_heads, kv_len)  # fmt: skip

    @_attend.register_fake  # type: ignore[misc]
    def _(qkv: torch.Tensor, rotation: torch.Tensor, positions: torch.Tensor,
          k_cache: torch.Tensor, *rest: Any) -> torch.Tensor:  # fmt: skip
        heads = rest[-3]
        return qkv.new_empty((qkv.shape[0], 1, heads * k_cache.shape[-1]))

    def fake(x: torch.Tensor, weight: torch.Tensor, *_: Any) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    _small.register_fake(fake)
    _add.register_fake(fake)
    _swiglu.register_fake(fake)
    _rms.register_fake(lambda x, norm_weight, eps, weight: fake(x, weight))


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    kernels: tuple[Any, Any],
    config: dict[str, int] | None = None,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    residual: torch.Tensor | None = None,
    swiglu: bool = False,
) -> torch.Tensor:
    """Run ``x @ weight.T`` (x: (..., K), weight: (N, K), rows of K contiguous) through
    the one-row kernel or the few-rows kernel; ``config`` fixes the tile sizes (for tests
    under ``TRITON_INTERPRET=1``, where nothing can be autotuned). ``norm`` (weight, eps)
    RMS-normalises the rows first; ``swiglu`` reads x as (..., 2K) ``gate, up`` halves and
    multiplies by ``silu(gate) * up``; ``residual`` (..., N) is added to the result."""
    import triton

    k = x.shape[-1] // 2 if swiglu else x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    res = weight if residual is None else residual.reshape(m, n)
    if res.stride(-1) != 1:
        res = res.contiguous()
    g, eps = (weight, 0.0) if norm is None else norm
    one_row, few_rows = kernels
    kernel = one_row if m == 1 else few_rows
    if config is None and os.environ.get("TRITON_INTERPRET") == "1":
        config = {"BLOCK_N": 16, "BLOCK_K": 64}  # interpreted kernels are not autotuned
    extra = {} if config is None else dict(config)
    block_n = extra.get("BLOCK_N")

    def grid(meta: dict[str, int]) -> tuple[int]:
        return (triton.cdiv(n, block_n or meta["BLOCK_N"]),)

    kernel[grid](
        x2, weight, y, g, res, m, n, k, x2.stride(0), weight.stride(0), y.stride(0),
        res.stride(0), float(eps), NORM=norm is not None, SWIGLU=swiglu,
        ADD=residual is not None, **extra,
    )  # fmt: skip
    return y.view(*x.shape[:-1], n)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """(one-row kernel, few-rows kernel); autotuned per (N, K) unless interpreted.

    Both can fuse what surrounds a product in a decoder layer (constexpr switches, so each
    combination compiles to its own kernel): NORM, an RMSNorm of the input rows (its sum of
    squares accumulated as the rows are read, applied to the result); SWIGLU, input rows
    ``silu(gate) * up`` from halves of a (M, 2K) input; ADD, a residual added to the result.
    """
    import triton
    import triton.language as tl

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"

    @triton.jit  # type: ignore[misc]
    def one_row(x_ptr, w_ptr, y_ptr, g_ptr, r_ptr, M, N, K, sxm, swn, sym, srm, eps,  # noqa: N803
                NORM: tl.constexpr, SWIGLU: tl.constexpr, ADD: tl.constexpr,  # noqa: N803
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        # y[n] = sum_k x[k] w[n, k]: each program owns BLOCK_N rows of w, read along K.
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk0 = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + rk0
            w = tl.load(
                w_ptr + rn[:, None] * swn + rk[None, :],
                mask=(rn[:, None] < N) & (rk[None, :] < K),
                other=0.0,
            )
            x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
            if SWIGLU:  # silu(gate) and its product with up, each rounded as torch does
                up = tl.load(x_ptr + K + rk, mask=rk < K, other=0.0).to(tl.float32)
                x = (x / (1.0 + tl.exp(-x))).to(x_ptr.dtype.element_ty).to(tl.float32)
                x = (x * up).to(x_ptr.dtype.element_ty).to(tl.float32)
            if NORM:
                ss += x * x
                x = x * tl.load(g_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if NORM:
            acc = acc * tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
        out = acc.to(y_ptr.dtype.element_ty)
        if ADD:
            res = tl.load(r_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
            out = (out.to(tl.float32) + res).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rn, out, mask=rn < N)

    @triton.jit  # type: ignore[misc]
    def few_rows(x_ptr, w_ptr, y_ptr, g_ptr, r_ptr, M, N, K, sxm, swn, sym, srm, eps,  # noqa: N803
                 NORM: tl.constexpr, SWIGLU: tl.constexpr, ADD: tl.constexpr,  # noqa: N803
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        # Up to 16 rows: one tensor-core product per tile, rows beyond M read as zeros.
        rm = tl.arange(0, 16)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk0 = tl.arange(0, BLOCK_K)
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        ss = tl.zeros((16, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + rk0
            w = tl.load(
                w_ptr + rn[None, :] * swn + rk[:, None],
                mask=(rn[None, :] < N) & (rk[:, None] < K),
                other=0.0,
            )
            xmask = (rm[:, None] < M) & (rk[None, :] < K)
            x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=xmask, other=0.0)
            if SWIGLU:
                gate = x.to(tl.float32)
                up = tl.load(x_ptr + rm[:, None] * sxm + K + rk[None, :], mask=xmask, other=0.0)
                s = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
                x = (s * up.to(tl.float32)).to(x_ptr.dtype.element_ty)
            if NORM:
                xf = x.to(tl.float32)
                ss += xf * xf
                g = tl.load(g_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
                x = (xf * g[None, :]).to(w_ptr.dtype.element_ty)
            acc += tl.dot(x, w)
        if NORM:
            acc = acc * tl.rsqrt(tl.sum(ss, axis=1) / K + eps)[:, None]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        out = acc.to(y_ptr.dtype.element_ty)
        if ADD:
            res = tl.load(r_ptr + rm[:, None] * srm + rn[None, :], mask=mask, other=0.0)
            out = (out.to(tl.float32) + res.to(tl.float32)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :], out, mask=mask)

    if interpreted:
        return one_row, few_rows

    def configs(pairs: list[tuple[int, int, int, int]]) -> list[Any]:
        return [
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in pairs
        ]

    # The candidates that an H100 ranked in its top five for some 7B shape (2026-11-26;
    # benchmarks/results/h100-2026-11-26/matmul.log): fewer candidates, shorter autotuning.
    one = configs([(1, 4096, 8, 1), (4, 2048, 8, 2), (8, 1024, 8, 3), (2, 1024, 4, 2),
                   (16, 1024, 8, 1), (8, 512, 4, 4)])  # fmt: skip
    few = configs([(32, 128, 4, 4), (16, 256, 4, 4), (64, 128, 4, 4), (32, 256, 4, 3),
                   (16, 512, 4, 3)])  # fmt: skip
    key = ["N", "K", "NORM", "SWIGLU", "ADD"]
    # Choices kept on disk (Triton's cache) where this Triton can: later processes skip tuning.
    keep = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}  # fmt: skip
    return (
        triton.autotune(configs=one, key=key, **keep)(one_row),
        triton.autotune(configs=few, key=key, **keep)(few_rows),
    )


def attends(qkv: torch.Tensor, positions: torch.Tensor | None, head_dim: int) -> bool:
    """Whether one-token attention runs through :func:`decode_attention`: while torch.compile
    traces, for one token a row at per-row positions, with a power-of-two head size, in
    batches of as many rows as ``CODELLAMA_TRITON_ATTENTION`` allows (by default one)."""
    return (
        0 < qkv.shape[0] <= _attention_rows
        and torch.compiler.is_compiling()
        and qkv.is_cuda
        and qkv.dtype in _DTYPES
        and qkv.shape[1] == 1
        and positions is not None
        and head_dim >= 2
        and head_dim & (head_dim - 1) == 0
    )


def decode_attention(
    qkv: torch.Tensor,
    rotation: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row_offset: int,
    heads: int,
    kv_heads: int,
    kv_len: int,
) -> torch.Tensor:
    """One decoding token's attention, in one kernel, from its q/k/v product: rotate q and k
    (``rotation``: the (cos, sin) pairs at each row's position, (B, 1, 1, D/2, 2)), store k
    and v in the caches (max_batch, Hkv, max_seq_len, D) at row ``row_offset + b`` and
    position ``positions[b]`` (< ``kv_len``), attend over keys ``0..positions[b]``. qkv is
    (B, 1, (H + 2 Hkv) D); returns (B, 1, H D). A program a (row, KV head, chunk of keys)
    reads only that row's keys; past ATTENTION_MAX_KEYS positions the torch steps run
    instead (SDPA)."""
    return torch.ops.codellama.decode_attention(  # type: ignore[no-any-return]
        qkv, rotation, positions, k_cache, v_cache, row_offset, heads, kv_heads, kv_len
    )


def attention_reference(
    qkv: torch.Tensor,
    rotation: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row_offset: int,
    heads: int,
    kv_heads: int,
    kv_len: int,
) -> torch.Tensor:
    """:func:`decode_attention` in torch: the steps the unfused layer takes."""
    from .model import rotate_real  # model imports this module

    bsz, dim = qkv.shape[0], k_cache.shape[-1]
    x = qkv.view(bsz, 1, heads + 2 * kv_heads, dim)
    q, k = rotate_real(x[:, :, : heads + kv_heads], rotation).split([heads, kv_heads], dim=2)
    v = x[:, :, heads + kv_heads :]
    rows = torch.arange(row_offset, row_offset + bsz, device=qkv.device).view(bsz, 1, 1)
    kv = torch.arange(kv_heads, device=qkv.device).view(1, kv_heads, 1)
    pos = positions.reshape(bsz, 1, 1)
    k_cache.index_put_((rows, kv, pos), k.transpose(1, 2))
    v_cache.index_put_((rows, kv, pos), v.transpose(1, 2))
    rows_of = slice(row_offset, row_offset + bsz)
    keys, values = k_cache[rows_of, :, :kv_len], v_cache[rows_of, :, :kv_len]
    mask = torch.arange(kv_len, device=qkv.device).view(1, 1, 1, kv_len) <= pos.view(bsz, 1, 1, 1)
    # The query heads of a KV group stacked along the query axis, as the layer does: SDPA's
    # enable_gqa with a mask would take its unfused math path, repeating K and V.
    qg = q.reshape(bsz, kv_heads, heads // kv_heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
    return out.reshape(bsz, 1, heads * dim)


# How decode_attention's kernels are launched (see launch_attention): 0 or -1 = chosen by the
# group size, as timed on an H200 (benchmarks/bench_gpu_attention.py, 2026-11-27).
ATTENTION_CONFIG: dict[str, int] = {"chunk": 32, "dot": -1, "warps": 0, "block": 0}


def launch_attention(
    qkv: torch.Tensor,
    rotation: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row_offset: int,
    heads: int,
    kv_heads: int,
    kv_len: int,
    kernel: Any,
    block_l: int | None = None,
    *,
    chunk: int | None = None,
    dot: bool | None = None,
    warps: int | None = None,
) -> torch.Tensor:
    """Run :func:`decode_attention`'s kernels (``kernel`` from :func:`_attention_kernel`).

    ``chunk`` > 0 splits each row's keys into chunks of that many, one program each, whose
    partial softmax sums a second kernel combines (flash-decoding); 0 walks a row's keys in
    one program a KV head. ``dot`` computes q.k and p.V as matrix products (the group's query
    heads padded to 16 rows; head sizes of 32 or more). Keys are read ``block_l`` at a time.
    Unset, each comes from :data:`ATTENTION_CONFIG`, whose defaults are what ran fastest on
    an H200 (one row; 7B's 32 KV heads and a 70B-like 8 KV heads of 8 query heads; 64 to
    4000 positions): chunks of 32 keys; for single query heads, vector products with 8
    warps and 32-key blocks (7B at 100 positions: 8.3 us a layer, was 18.4 unsplit); for
    groups, ``tl.dot`` with 4 warps (9.0 us, was 52; at 4000 positions 42 us, was 1791)."""
    import triton

    attend, combine = kernel
    config = ATTENTION_CONFIG
    bsz, dim = qkv.shape[0], k_cache.shape[-1]
    rep = heads // kv_heads
    chunk = config["chunk"] if chunk is None else chunk
    if dot is None:
        dot = rep > 1 if config["dot"] < 0 else bool(config["dot"])
    dot = dot and dim >= 32
    warps = warps or config["warps"] or (4 if dot else 8)
    x = qkv.reshape(bsz, -1)
    rot = rotation.reshape(bsz, -1)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if rot.stride(-1) != 1:
        rot = rot.contiguous()
    pos = positions.reshape(bsz).contiguous()
    out = torch.empty((bsz, heads, dim), device=qkv.device, dtype=qkv.dtype)
    rep_p2 = 1 << (rep - 1).bit_length()
    # unspilled on sm_90 (Triton 3.9, ptxas -v): 8 warps with 32 keys for one head, 16 for
    # groups; tl.dot with 4 warps and 32 keys for any group size (147-168 registers)
    block = block_l or config["block"] or (32 if dot else max(16, 32 // rep_p2))
    if chunk:
        chunk = max(block, chunk // block * block)  # whole blocks
    splits = triton.cdiv(kv_len, chunk) if chunk else 1
    # partial (sum of p v, max, sum of p) per (row, head, chunk), fp32
    shape = (bsz, heads, splits, dim + 2) if chunk else (1,)
    part = torch.empty(shape, device=qkv.device, dtype=torch.float32)
    attend[(bsz, kv_heads, splits)](
        x, rot, pos, k_cache, v_cache, out, part, row_offset, x.stride(0), rot.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), v_cache.stride(2), out.stride(0), heads, kv_heads, rep, kv_len,
        dim**-0.5, REP=max(rep_p2, 16) if dot else rep_p2, D=dim, BLOCK_L=block, CHUNK=chunk,
        DOT=dot, num_warps=warps,
    )  # fmt: skip
    if chunk:
        combine[(bsz, heads)](
            part, pos, out, out.stride(0), heads, kv_len, splits, D=dim, CHUNK=chunk,
            BLOCK_S=min(16, 1 << (splits - 1).bit_length()), num_warps=4,
        )  # fmt: skip
    return out.view(bsz, 1, heads * dim)


@functools.cache
def _attention_kernel() -> tuple[Any, Any]:
    """Rotate, store, attend: one program a (row, KV head[, chunk of keys]), the group's
    n_rep query heads together. Rotary pairs (x[2i], x[2i+1]) are kept as even and odd halves
    (a dot product is the sum over both). Cached keys ``0..pos-1`` are read in blocks of
    BLOCK_L (a loop bound read from memory: a 100K-position cache costs nothing until used)
    with an online softmax; the new key and value join from registers, so nothing just
    stored is read. As with SDPA's mask, keys at ``kv_len`` and beyond are not attended to.
    With CHUNK > 0 a program takes keys ``[c CHUNK, (c + 1) CHUNK)`` (the first also the new
    key, which it stores) and writes its unnormalised sums for ``combine``."""
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[misc]
    def attend(x_ptr, rot_ptr, pos_ptr, kc_ptr, vc_ptr, o_ptr, part_ptr, row_offset, sxb,  # noqa: N803
               srb, skb, skh, skl, svb, svh, svl, sob, n_heads, n_kv, n_rep, kv_len, scale,  # noqa: N803
               REP: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr,  # noqa: N803
               CHUNK: tl.constexpr, DOT: tl.constexpr):  # fmt: skip  # noqa: N803
        b = tl.program_id(0)
        g = tl.program_id(1)
        c = tl.program_id(2)
        dt = x_ptr.dtype.element_ty
        rr = tl.arange(0, REP)
        ri = tl.arange(0, D // 2)
        rd = tl.arange(0, D)
        rl0 = tl.arange(0, BLOCK_L)
        live_q = rr < n_rep
        heads = g * n_rep + rr
        pos = tl.load(pos_ptr + b)
        n_old = tl.minimum(pos, kv_len)  # a row fed past kv_len attends to keys below it only
        lo = c * CHUNK
        hi = tl.minimum(lo + CHUNK, n_old) if CHUNK > 0 else n_old
        cos = tl.load(rot_ptr + b * srb + 2 * ri)
        sin = tl.load(rot_ptr + b * srb + 2 * ri + 1)
        # q and the new k, rotated in fp32 and rounded to the model's dtype (as the layer does)
        q_at = x_ptr + b * sxb + heads[:, None] * D + 2 * ri[None, :]
        qe = tl.load(q_at, mask=live_q[:, None], other=0.0).to(tl.float32)
        qo = tl.load(q_at + 1, mask=live_q[:, None], other=0.0).to(tl.float32)
        q_even = (qe * cos[None, :] - qo * sin[None, :]).to(dt)
        q_odd = (qe * sin[None, :] + qo * cos[None, :]).to(dt)
        k_at = x_ptr + b * sxb + (n_heads + g) * D + 2 * ri
        ke = tl.load(k_at).to(tl.float32)
        ko = tl.load(k_at + 1).to(tl.float32)
        k_even = (ke * cos - ko * sin).to(dt)
        k_odd = (ke * sin + ko * cos).to(dt)
        v_new = tl.load(x_ptr + b * sxb + (n_heads + n_kv + g) * D + rd)
        row = (row_offset + b).to(tl.int64)  # a cache's rows can pass 2**31 elements
        k_row = kc_ptr + row * skb + g * skh
        v_row = vc_ptr + row * svb + g * svh
        # the first chunk's program stores the new key and value (and attends to them)
        first_i = ri + c * D < D // 2  # all true there, else none
        tl.store(k_row + pos * skl + 2 * ri, k_even, mask=first_i)
        tl.store(k_row + pos * skl + 2 * ri + 1, k_odd, mask=first_i)
        tl.store(v_row + pos * svl + rd, v_new, mask=rd + c * D < D)
        qef = q_even.to(tl.float32)
        qof = q_odd.to(tl.float32)
        # the cached keys before this position (this chunk's)
        m = tl.full((REP,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((REP,), dtype=tl.float32)
        acc = tl.zeros((REP, D), dtype=tl.float32)
        for start in range(lo, hi, BLOCK_L):
            rl = start + rl0
            live = rl < hi
            at = k_row + rl[:, None] * skl + 2 * ri[None, :]
            ce = tl.load(at, mask=live[:, None], other=0.0)
            co = tl.load(at + 1, mask=live[:, None], other=0.0)
            v = tl.load(v_row + rl[:, None] * svl + rd[None, :], mask=live[:, None], other=0.0)
            if DOT:
                scores = tl.dot(q_even, tl.trans(ce)) + tl.dot(q_odd, tl.trans(co))
            else:
                scores = tl.sum(qef[:, None, :] * ce.to(tl.float32)[None, :, :], axis=2)
                scores += tl.sum(qof[:, None, :] * co.to(tl.float32)[None, :, :], axis=2)
            scores = tl.where(live[None, :], scores * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            s = s * alpha + tl.sum(p, axis=1)
            if DOT:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
            acc = acc * alpha[:, None] + pv
            m = m_new
        # the new key and value
        own = tl.sum(qef * k_even.to(tl.float32)[None, :], axis=1)
        own = (own + tl.sum(qof * k_odd.to(tl.float32)[None, :], axis=1)) * scale
        own = tl.where((pos < kv_len) & (c == 0), own, float("-inf"))
        m_new = tl.maximum(m, own)
        # a chunk with no key at all keeps m = -inf and s = 0 (combine gives it no weight)
        alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        p_own = tl.where(m_new == float("-inf"), 0.0, tl.exp(own - m_new))
        s = s * alpha + p_own
        acc = acc * alpha[:, None] + p_own[:, None] * v_new.to(tl.float32)[None, :]
        if CHUNK > 0:
            n_chunks = tl.num_programs(2)
            at = part_ptr + ((b * n_heads + heads) * n_chunks + c) * (D + 2)
            tl.store(at[:, None] + rd[None, :], acc, mask=live_q[:, None])
            tl.store(at + D, m_new, mask=live_q)
            tl.store(at + D + 1, s, mask=live_q)
        else:
            out = acc / s[:, None]
            o_at = o_ptr + b * sob + heads[:, None] * D + rd[None, :]
            tl.store(o_at, out.to(dt), mask=live_q[:, None])

    @triton.jit  # type: ignore[misc]
    def combine(part_ptr, pos_ptr, o_ptr, sob, n_heads, kv_len, n_chunks,  # noqa: N803
                D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip  # noqa: N803
        """One (row, query head): the chunks' partial sums, rescaled to a common max."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        rd = tl.arange(0, D)
        rs0 = tl.arange(0, BLOCK_S)
        pos = tl.load(pos_ptr + b)
        used = tl.cdiv(tl.minimum(pos, kv_len), CHUNK)  # chunks that took keys
        used = tl.maximum(used, 1)  # the first takes the new key
        base = part_ptr + (b * n_heads + h) * n_chunks * (D + 2)
        m = tl.full((), float("-inf"), dtype=tl.float32)
        s = tl.zeros((), dtype=tl.float32)
        acc = tl.zeros((D,), dtype=tl.float32)
        for start in range(0, tl.minimum(used, n_chunks), BLOCK_S):
            rs = start + rs0
            live = rs < tl.minimum(used, n_chunks)
            at = base + rs * (D + 2)
            mc = tl.load(at + D, mask=live, other=float("-inf"))
            sc = tl.load(at + D + 1, mask=live, other=0.0)
            ac = tl.load(at[:, None] + rd[None, :], mask=live[:, None], other=0.0)
            m_new = tl.maximum(m, tl.max(mc, axis=0))
            w = tl.where(mc == float("-inf"), 0.0, tl.exp(mc - m_new))
            alpha = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_new))
            s = s * alpha + tl.sum(sc * w, axis=0)
            acc = acc * alpha + tl.sum(ac * w[:, None], axis=0)
            m = m_new
        out = acc / s
        tl.store(o_ptr + b * sob + h * D + rd, out.to(o_ptr.dtype.element_ty))

    return attend, combine
