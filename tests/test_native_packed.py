"""Weights in the native kernels' own blocked layout: how they are packed, multiplied at any
number of rows, unpacked, and refused once changed behind the model's back."""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from codellama import native
from codellama.errors import UnsupportedError
from codellama.model import linear

from .conftest import GQA_ARGS

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
SHAPES = [(64, 128), (100, 70), (5, 33), (1, 1), (130, 300), (70, 1100)]  # K > 1024: chunks
ROWS = [1, 3, 8, 9, 13, 64, 200]  # decoding's few rows, and prefill's many


def _packable(kernel: native.NativeLinear, dtype: torch.dtype) -> None:
    if not kernel.can_pack(dtype):
        pytest.skip(f"this CPU's build keeps {dtype} weights in oneDNN's layout")


def _reference_layout(w: torch.Tensor) -> torch.Tensor:
    """The documented layout, built with torch: blocks of 64 rows (zero padded); fp32 as
    (N/64, K, 64), bf16 as (N/64, ceil(K/2), 64, 2) (pairs of k for the dot product)."""
    n, k = w.shape
    blocks = -(-n // 64)
    padded_k = k if w.dtype == torch.float32 else k + k % 2
    full = torch.zeros(blocks * 64, padded_k, dtype=w.dtype)
    full[:n, :k] = w
    if w.dtype == torch.float32:
        return full.view(blocks, 64, k).transpose(1, 2).contiguous()
    return full.view(blocks, 64, padded_k // 2, 2).permute(0, 2, 1, 3).contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), SHAPES + [(200, 64), (64, 17), (3, 1000)])
def test_pack_writes_the_documented_blocked_layout(kernel, dtype, n, k):
    _packable(kernel, dtype)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)).to(dtype)
    assert torch.equal(kernel.pack(w, dtype), _reference_layout(w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_converts_like_torch(kernel, dtype, source):
    _packable(kernel, dtype)
    w = torch.randn(70, 90, generator=torch.Generator().manual_seed(1)).to(source)
    assert torch.equal(kernel.pack(w, dtype), _reference_layout(w.to(dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_reads_slices_of_a_shard(kernel, dtype):
    """Model parallelism packs a rank's rows or columns straight from the checkpoint."""
    _packable(kernel, dtype)
    full = torch.randn(200, 160, generator=torch.Generator().manual_seed(2)).bfloat16()
    for piece in (full.narrow(1, 80, 80), full.narrow(0, 100, 100), full.narrow(1, 3, 67)):
        assert torch.equal(kernel.pack(piece, dtype), _reference_layout(piece.to(dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_unpack_returns_the_weight(kernel, dtype, n, k):
    _packable(kernel, dtype)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3)).to(dtype)
    plan = kernel.plan_packed(kernel.pack(w, dtype), n, k)
    assert plan.unpack is not None and torch.equal(plan.unpack(), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_packed_products_match_float64_at_every_row_count(kernel, dtype, m, n, k):
    _packable(kernel, dtype)
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    plan = kernel.plan_packed(kernel.pack(w, dtype), n, k)
    assert plan.accepts(x, plan.weight)  # no row limit: only these kernels read the layout
    got = plan(x)
    assert got.dtype == dtype and got.shape == (m, n)
    want = x.double() @ w.double().T
    torch.testing.assert_close(got.double(), want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_plan_packed_refuses_a_tensor_of_another_shape(kernel):
    packed = kernel.pack(torch.randn(100, 70), torch.float32)
    with pytest.raises(ValueError, match="not a packed"):
        kernel.plan_packed(packed, 100, 71)


def test_portable_build_packs_fp32_only(portable_kernel, kernel):
    portable = portable_kernel
    assert portable.can_pack(torch.float32) and not portable.can_pack(torch.bfloat16)
    w = torch.randn(130, 300, generator=torch.Generator().manual_seed(4))
    assert torch.equal(portable.pack(w, torch.float32), _reference_layout(w))
    plan = portable.plan_packed(portable.pack(w, torch.float32), 130, 300)
    x = torch.randn(20, 300, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(plan(x), x @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("dtype", "disk"),
    [("float32", torch.float32), ("bfloat16", torch.float32), ("float32", torch.bfloat16)],
)
def test_turning_the_kernel_off_unpacks_the_weights(kernel, make_checkpoint, build, dtype, disk):
    """Also for an fp32 model keeping a bf16 checkpoint's weights in bf16: fp32 comes back."""
    llama = build(make_checkpoint(GQA_ARGS, dtype=disk), dtype=dtype)
    model = llama.model
    if not kernel.can_pack(model.dtype):
        pytest.skip("this CPU's build does not pack this dtype")
    tokens = torch.tensor([[1, 5, 9, 14, 3, 7, 11, 2, 6, 8, 10]])
    for layer in model.layers:  # the weights are under test: one attention throughout
        layer.attention.native_attention = None
    want = model.forward(tokens)
    wq = model.layers[0].attention.wq
    packed_plan = wq.native_plan
    model.use_native_kernel(None)
    assert model.native_decoder is None
    for m in model.linear_layers():
        assert m.weight.dim() == 2 and m.__dict__.get("native_plan") is None
    assert wq.weight.dtype == model.dtype
    if not wq.weight.is_mkldnn:
        assert torch.equal(wq.weight, packed_plan.unpack())
    tol = 1e-4 if dtype == "float32" else 5e-2
    torch.testing.assert_close(model.forward(tokens), want, atol=tol, rtol=tol)
    model.use_native_kernel(kernel)  # oneDNN's layout now: planned for decoding's rows
    assert model.native_decoder is not None
    for layer in model.layers:
        layer.attention.native_attention = None
    torch.testing.assert_close(model.forward(tokens), want, atol=tol, rtol=tol)


def test_a_packed_weight_changed_in_place_is_a_clear_error(kernel, make_checkpoint, build):
    model = build(make_checkpoint(GQA_ARGS)).model
    layer = model.layers[0].attention.wq
    layer.weight.data = layer.weight.data.double()  # as model.double() would
    x = torch.randn(1, 2, GQA_ARGS.dim)
    with pytest.raises(UnsupportedError, match="changed in place"):
        linear(layer, x)


def test_a_replaced_packed_weight_is_used_as_given(kernel, make_checkpoint, build):
    model = build(make_checkpoint(GQA_ARGS)).model
    layer = model.layers[0].feed_forward.w2
    n, k = layer.native_plan.n, layer.native_plan.k
    new = torch.randn(n, k, generator=torch.Generator().manual_seed(6))
    layer.weight = torch.nn.Parameter(new, requires_grad=False)
    x = torch.randn(1, 12, k)
    torch.testing.assert_close(linear(layer, x), x @ new.T)


def test_the_kernel_is_built_for_this_cpu(kernel):
    """load() falls back to the portable build when the native one fails its self-test: on a
    CPU with AVX512-BF16 that fallback (slower, bf16 left to oneDNN) must not go unnoticed."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if "avx512_bf16" not in flags:
        pytest.skip("this CPU has no AVX512-BF16")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"
    probe = subprocess.run(
        [cc, "-march=native", "-dM", "-E", "-x", "c", "/dev/null"], capture_output=True, text=True
    )
    if "__AVX512BF16__" not in probe.stdout:
        pytest.skip("the C compiler cannot target this CPU's AVX512-BF16")
    assert kernel.bf16_dot_product and kernel.can_pack(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pieces_packed_one_by_one_equal_the_whole(kernel, dtype):
    """A weight that several checkpoint shards hold is packed piece by piece as they load."""
    _packable(kernel, dtype)
    w = torch.randn(200, 131, generator=torch.Generator().manual_seed(7)).bfloat16()
    want = kernel.pack(w, dtype)
    by_rows = kernel.empty_packed(200, 131, dtype)
    for lo, hi in ((0, 64), (64, 192), (192, 200)):  # the last piece ends the weight
        kernel.pack_piece(by_rows, 200, 131, w[lo:hi], row=lo)
    assert torch.equal(by_rows, want)
    by_cols = kernel.empty_packed(200, 131, dtype)
    for lo, hi in ((0, 66), (66, 100), (100, 131)):  # even starts; the odd one ends it
        kernel.pack_piece(by_cols, 200, 131, w[:, lo:hi], col=lo)
    assert torch.equal(by_cols, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "cuts", [(0, 72, 150, 200), (0, 3, 5, 70, 200), (0, 130, 200), (0, 195, 200), (0, 200)]
)
def test_rows_cut_anywhere_are_packed_in_any_order(kernel, dtype, cuts):
    """A vocabulary of 32016 splits into 16008-row halves: the block they share is written by
    both pieces, each leaving the other's rows alone."""
    _packable(kernel, dtype)
    w = torch.randn(200, 131, generator=torch.Generator().manual_seed(8)).bfloat16()
    packed = kernel.empty_packed(200, 131, dtype).fill_(float("nan"))
    for lo, hi in reversed(list(itertools.pairwise(cuts))):
        kernel.pack_piece(packed, 200, 131, w[lo:hi], row=lo)
    assert torch.equal(packed, kernel.pack(w, dtype))


@pytest.mark.parametrize(("col", "cols"), [(1, 130), (0, 65)])
def test_a_bf16_piece_that_splits_a_column_pair_is_refused(kernel, col, cols):
    _packable(kernel, torch.bfloat16)
    packed = kernel.empty_packed(200, 131, torch.bfloat16)
    with pytest.raises(ValueError, match="pair"):
        kernel.pack_piece(packed, 200, 131, torch.zeros(200, cols), col=col)


SHARDED_ARGS = dataclasses.replace(GQA_ARGS, dim=256, n_heads=4, n_kv_heads=1, multiple_of=128)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_sharded_checkpoint_is_packed_piece_by_piece(
    kernel, make_checkpoint, build, monkeypatch, dtype
):
    """Two shards loaded by one process: the rows of wq/wk/wv, w1/w3 and output (wk and
    wv's halves are 32 rows, inside one block) and the columns of wo/w2 go straight into the
    packed layout. Weights and logits equal a one-shard checkpoint's."""
    if not kernel.can_pack(getattr(torch, dtype)):
        pytest.skip("this CPU's build does not pack this dtype")
    pieces = []
    original = native.NativeLinear.pack_piece

    def spy(self, packed, n, k, piece, row=0, col=0, mapped=False):
        if tuple(piece.shape) != (n, k):  # a shard's piece, not a whole weight
            pieces.append((n, k, tuple(piece.shape)))
        return original(self, packed, n, k, piece, row, col, mapped)

    monkeypatch.setattr(native.NativeLinear, "pack_piece", spy)
    one = build(make_checkpoint(SHARDED_ARGS, n_shards=1), dtype=dtype).model
    pieces.clear()
    two = build(make_checkpoint(SHARDED_ARGS, n_shards=2), dtype=dtype).model
    assert any(p[2][1] < p[1] for p in pieces)  # wo, w2: halves of the columns
    assert {p[0] for p in pieces if p[2][0] < p[0]} >= {64, 256}  # wk/wv and wq: row halves
    for a, b in zip(one.linear_layers(), two.linear_layers(), strict=True):
        assert b.native_plan.owned_layout
        assert torch.equal(a.native_plan.unpack(), b.native_plan.unpack())
    tokens = torch.tensor([[1, 5, 9, 14, 3, 7, 11, 2, 6, 8, 10]])
    assert torch.equal(one.forward(tokens), two.forward(tokens))


def test_a_replaced_weight_is_packed_again_on_request(kernel, make_checkpoint, build):
    model = build(make_checkpoint(GQA_ARGS)).model
    layer = model.layers[0].attention.wq
    new = torch.randn(layer.native_plan.n, layer.native_plan.k)
    layer.weight = torch.nn.Parameter(new, requires_grad=False)
    model.prepack_cpu_weights()
    assert layer.weight.dim() == 3 and layer.native_plan.holds_weight(layer.weight)
    x = torch.randn(1, 12, new.shape[1])
    torch.testing.assert_close(linear(layer, x), x @ new.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_a_mapped_file_drops_its_pages_and_loses_nothing(kernel, dtype, tmp_path):
    """``mapped=True`` (the loader's checkpoint views): the threads drop the file's pages as
    they finish with them; the values are read again from the file if touched again."""
    _packable(kernel, dtype)
    w = torch.randn(300, 2048, generator=torch.Generator().manual_seed(10)).bfloat16()
    torch.save({"w": w, "e": w[:100]}, tmp_path / "shard.pth")
    sd = torch.load(tmp_path / "shard.pth", mmap=True, weights_only=True)
    assert torch.equal(kernel.pack(sd["w"], dtype, mapped=True), _reference_layout(w.to(dtype)))
    out = torch.empty(100, 2048, dtype=dtype)
    kernel.fill(out, sd["e"], mapped=True)
    assert torch.equal(out, w[:100].to(dtype))
    assert torch.equal(sd["w"], w) and torch.equal(sd["e"], w[:100])


@pytest.mark.parametrize("dst", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16, torch.float16])
def test_fill_copies_like_torch(kernel, dst, src):
    """The embedding's copy: in C where it converts exactly or not at all, else torch's."""
    w = torch.randn(333, 77, generator=torch.Generator().manual_seed(11)).to(src)
    out = torch.full((333, 77), float("nan"), dtype=dst)
    kernel.fill(out, w)
    assert torch.equal(out, w.to(dst))
