"""Matrix products of decoding on CUDA: Triton kernels that stream each weight once.

Decoding multiplies 1-16 rows by every weight matrix; the time is the time to read the
weights. cuBLAS's kernels read an H200's memory at about 70% of what a plain read reaches
for these shapes (73% over a 7B model's products, one row). Replayed in a CUDA graph, these
kernels made 7B-shaped compiled decoding 7% faster at batch 1 and 3% at batch 8 (same
machine, same run); launched from Python they are slower than cuBLAS, so they are used only
while torch.compile traces (see :func:`applies`). They are registered as the torch custom op
``codellama::small_matmul`` (one opaque kernel to torch.compile and CUDA graphs) by
:func:`enable`, which :meth:`codellama.Llama.build` calls on CUDA; nothing is registered at
import. ``CODELLAMA_TRITON_MATMUL=0`` turns them off.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import torch

MAX_ROWS = 16  # rows (batch x tokens) up to which the kernels are used
_DTYPES = (torch.bfloat16, torch.float16)
_enabled = False
_failed: Exception | None = None  # the first failure of the kernels; then F.linear runs


def enable() -> bool:
    """Register the custom op (once) if Triton is importable and CUDA is there; returns
    whether :func:`applies` can be true."""
    global _enabled
    if os.environ.get("CODELLAMA_TRITON_MATMUL", "1") == "0" or not torch.cuda.is_available():
        return False
    try:
        _register()
    except ImportError:  # no Triton (a CPU build of torch)
        return False
    _enabled = True
    return True


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


@functools.cache
def _register() -> None:
    kernels = _kernels()

    @torch.library.custom_op("codellama::small_matmul", mutates_args=())  # type: ignore[misc]
    def _op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        global _failed
        if _failed is None:
            try:
                return launch(x, weight, kernels)
            except Exception as exc:  # a Triton that cannot build or run them here
                _failed = exc
                warnings.warn(
                    f"codellama: the Triton matrix products failed ({exc!r:.200}); using "
                    "F.linear instead (set CODELLAMA_TRITON_MATMUL=0 to skip them)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return torch.nn.functional.linear(x, weight)

    @_op.register_fake  # type: ignore[misc]
    def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    kernels: tuple[Any, Any],
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Run ``x @ weight.T`` (x: (..., K), weight: (N, K), rows of K contiguous) through
    the one-row kernel or the few-rows kernel; ``config`` fixes the tile sizes (for tests
    under ``TRITON_INTERPRET=1``, where nothing can be autotuned)."""
    import triton

    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    one_row, few_rows = kernels
    kernel = one_row if m == 1 else few_rows
    if config is None and os.environ.get("TRITON_INTERPRET") == "1":
        config = {"BLOCK_N": 16, "BLOCK_K": 64}  # interpreted kernels are not autotuned
    extra = {} if config is None else dict(config)
    block_n = extra.get("BLOCK_N")

    def grid(meta: dict[str, int]) -> tuple[int]:
        return (triton.cdiv(n, block_n or meta["BLOCK_N"]),)

    kernel[grid](x2, weight, y, m, n, k, x2.stride(0), weight.stride(0), y.stride(0), **extra)
    return y.view(*x.shape[:-1], n)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """(one-row kernel, few-rows kernel); autotuned per (N, K) unless interpreted."""
    import triton
    import triton.language as tl

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"

    @triton.jit  # type: ignore[misc]
    def one_row(x_ptr, w_ptr, y_ptr, M, N, K, sxm, swn, sym,  # noqa: N803
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        # y[n] = sum_k x[k] w[n, k]: each program owns BLOCK_N rows of w, read along K.
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk0 = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + rk0
            w = tl.load(
                w_ptr + rn[:, None] * swn + rk[None, :],
                mask=(rn[:, None] < N) & (rk[None, :] < K),
                other=0.0,
            )
            x = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)

    @triton.jit  # type: ignore[misc]
    def few_rows(x_ptr, w_ptr, y_ptr, M, N, K, sxm, swn, sym,  # noqa: N803
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        # Up to 16 rows: one tensor-core product per tile, rows beyond M read as zeros.
        rm = tl.arange(0, 16)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk0 = tl.arange(0, BLOCK_K)
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + rk0
            w = tl.load(
                w_ptr + rn[None, :] * swn + rk[:, None],
                mask=(rn[None, :] < N) & (rk[:, None] < K),
                other=0.0,
            )
            x = tl.load(
                x_ptr + rm[:, None] * sxm + rk[None, :],
                mask=(rm[:, None] < M) & (rk[None, :] < K),
                other=0.0,
            )
            acc += tl.dot(x, w)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)

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
    return (
        triton.autotune(configs=one, key=["N", "K"])(one_row),
        triton.autotune(configs=few, key=["N", "K"])(few_rows),
    )
