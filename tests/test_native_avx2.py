"""The native kernels' AVX2 + FMA code (CPUs without AVX-512): products in every stored form
and at every number of rows, a row's result independent of the batch, and whole decoding
steps. Built with explicit flags, so AVX-512 machines check this path as well."""

from __future__ import annotations

import pytest
import torch

from codellama import native

from .conftest import GQA_ARGS
from .test_native_decoder import ODD_ARGS, _step, _tokens
from .test_native_packed import _reference_layout

SHAPES = [(64, 128), (100, 70), (5, 33), (1, 1), (130, 301), (70, 2100)]  # K > 2048: chunks
ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 64, 200]  # decoding's groups, and prefill's panels
# (model dtype, stored dtype): fp32, fp32 on bf16 weights ("w16"), bf16
FORMS = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
]


def _plan(kernel: native.NativeLinear, w: torch.Tensor, dtype, stored) -> native.LinearPlan:
    n, k = w.shape
    return kernel.plan_packed(kernel.pack(w, stored), n, k, dtype)


def _bf16_valued(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g).bfloat16().float()


def test_avx2_build_has_vector_paths_for_fp32_and_bf16(avx2_kernel):
    assert avx2_kernel.avx2 and not avx2_kernel.avx512
    assert avx2_kernel.bf16_products and not avx2_kernel.bf16_dot_product
    assert avx2_kernel.can_pack(torch.float32) and avx2_kernel.can_pack(torch.bfloat16)
    assert native.preferred(avx2_kernel)


@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(192, 64), (130, 301), (64, 17), (200, 2100)])
def test_avx2_packing_writes_the_documented_layout(avx2_kernel, source, stored, n, k):
    """Whole blocks go through 8 x 8 transposes and streaming stores, the rest (the last
    block, the units past the last group of 8) through the tile: both in the same layout,
    from a slice of a wider shard too (rows ``ld`` apart)."""
    w = torch.randn(n, k + 6, generator=torch.Generator().manual_seed(n + k)).to(source)
    for piece in (w[:, :k].contiguous(), w[:, 6:]):
        assert torch.equal(avx2_kernel.pack(piece, stored), _reference_layout(piece.to(stored)))


@pytest.mark.parametrize(("dtype", "stored"), FORMS)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_avx2_products_match_float64(avx2_kernel, dtype, stored, m, n, k):
    w = _bf16_valued(n, k, seed=n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    got = _plan(avx2_kernel, w, dtype, stored)(x)
    assert got.dtype == dtype and got.shape == (m, n)
    want = x.double() @ w.double().T
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16 outputs: one rounding
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * k**0.5)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [3, 8, 13, 64])
def test_avx2_row_results_do_not_depend_on_the_other_rows(avx2_kernel, stored, m):
    """Each output is one multiply-add chain over k in order whatever the row grouping, the
    tile width or the chunking: a prompt's logits do not change with the batch."""
    w = _bf16_valued(150, 2100, seed=1)
    plan = _plan(avx2_kernel, w, torch.float32, stored)
    x = torch.randn(m, 2100, generator=torch.Generator().manual_seed(2))
    together = plan(x)
    for i in range(m):
        assert torch.equal(together[i : i + 1], plan(x[i : i + 1])), f"row {i} of {m}"


@pytest.mark.parametrize("m", [1, 3, 8, 64])
def test_avx2_bf16_kept_weights_give_the_fp32_weights_results_exactly(avx2_kernel, m):
    w = _bf16_valued(100, 301, seed=3)
    x = torch.randn(m, 301, generator=torch.Generator().manual_seed(m))
    fp32 = _plan(avx2_kernel, w, torch.float32, torch.float32)(x)
    w16 = _plan(avx2_kernel, w, torch.float32, torch.bfloat16)(x)
    assert torch.equal(fp32, w16)


def test_avx2_bf16_products_round_once_like_torch(avx2_kernel):
    """bf16 outputs are the fp32 sums rounded to nearest even: within one bf16 step of
    torch's bf16 product (which sums in another order)."""
    w = _bf16_valued(300, 1000, seed=4).bfloat16()
    x = torch.randn(64, 1000, generator=torch.Generator().manual_seed(5)).bfloat16()
    ours = _plan(avx2_kernel, w, torch.bfloat16, torch.bfloat16)(x).float()
    exact = (x.double() @ w.double().T).float()
    assert (
        torch.equal(ours, exact.bfloat16().float())
        or ((ours - exact.bfloat16().float()).abs() <= exact.abs() * 2**-7).all()
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("args", [GQA_ARGS, ODD_ARGS], ids=["gqa", "odd"])
def test_avx2_decoding_step_matches_the_torch_layers(
    avx2_kernel, make_checkpoint, build, dtype, args
):
    model = build(make_checkpoint(args), dtype=dtype, max_seq_len=256).model
    model.use_native_kernel(avx2_kernel)
    assert model.native_decoder is not None
    vocab = model.params.vocab_size
    prompt, token = _tokens(vocab, 2, 40), _tokens(vocab, 2, 1, seed=1)
    got = _step(model, prompt, token, native_step=True)
    want = _step(model, prompt, token, native_step=False)
    tol = (1e-4 if dtype == "float32" else 5e-2) * want.abs().max().item()  # as for -march=native
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
