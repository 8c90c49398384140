"""fp32 models keep the weights of a bf16 checkpoint in bf16 (which holds them exactly) and
multiply them in fp32: half the memory, the same products bit for bit."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from pathlib import Path

import pytest
import torch

from codellama import native
from codellama.checkpoint import load_shard, split_dim, stored_dtypes
from codellama.errors import OutOfMemoryError
from codellama.model import ModelArgs, build_empty, kv_cache_bytes, parameter_bytes, weight_bytes

from .conftest import GQA_ARGS

SHAPES = [(64, 128), (100, 70), (5, 33), (1, 1), (130, 300), (70, 1100)]  # K > 1024: chunks
ROWS = [1, 2, 3, 5, 8, 9, 13, 64, 200]
PROMPTS = [[1, 5, 9, 14, 3, 7, 11, 2, 6, 8, 10], [1, 20, 4]]


def _bf16_values(n: int, k: int, seed: int) -> torch.Tensor:
    """An fp32 (n, k) weight whose values bf16 holds exactly, as a bf16 checkpoint's."""
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).bfloat16().float()


def _plans(kernel: native.NativeLinear, w: torch.Tensor) -> tuple[native.LinearPlan, ...]:
    """fp32-input plans of ``w`` kept in fp32 and kept in bf16."""
    n, k = w.shape
    kept = kernel.storage_dtype(torch.float32, torch.bfloat16)
    assert kept == torch.bfloat16
    fp32 = kernel.plan_packed(kernel.pack(w, torch.float32), n, k)
    bf16 = kernel.plan_packed(kernel.pack(w, kept), n, k, torch.float32)
    return fp32, bf16


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_fp32_products_on_bf16_kept_weights_equal_those_on_fp32_weights_bit_for_bit(
    kernel, m, n, k
):
    w = _bf16_values(n, k, n + k)
    fp32, bf16 = _plans(kernel, w)
    assert bf16.w16 and bf16.weight.dtype == torch.bfloat16 and bf16.dtype == torch.float32
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    got = bf16(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, fp32(x))
    want = x.double() @ w.double().T
    assert (got.double() - want).abs().max() <= 1e-4 * max(want.abs().max().item(), 1e-30)


def test_unpacking_a_bf16_kept_weight_gives_its_fp32_values(kernel):
    w = _bf16_values(130, 301, 3)
    _, bf16 = _plans(kernel, w)
    plain = bf16.unpack()
    assert plain.dtype == torch.float32 and torch.equal(plain, w)


def test_bf16_weights_need_no_other_dtype_for_fp32_inputs(kernel):
    """Products of bf16 inputs on bf16 weights, and fp32 ones on fp32 weights, are plans
    of their own; only fp32 inputs read bf16-kept weights."""
    packed = kernel.pack(_bf16_values(64, 64, 4), torch.float32)
    with pytest.raises(ValueError, match="no native product"):
        kernel.plan_packed(packed, 64, 64, torch.bfloat16)


def test_an_fp32_model_keeps_a_bf16_checkpoints_linear_weights_in_bf16(
    kernel, make_checkpoint, build
):
    model = build(make_checkpoint(GQA_ARGS, dtype=torch.bfloat16), dtype="float32").model
    assert model.dtype == torch.float32
    for layer in model.linear_layers():
        plan = layer.native_plan
        assert plan.w16 and layer.weight.dtype == torch.bfloat16 and plan.dtype == torch.float32
    assert model.tok_embeddings.weight.dtype == torch.float32
    assert model.native_decoder is not None
    linear_params = sum(m.native_plan.n * m.native_plan.k for m in model.linear_layers())
    all_fp32 = 4 * sum(p.numel() for p in model.parameters() if p.dim() < 3)
    assert parameter_bytes(model) < all_fp32 + 4 * linear_params * 0.6  # ~2 bytes each


def _as_fp32_checkpoint(src: Path, dst: Path) -> Path:
    """The same checkpoint with every tensor stored in fp32 (the same values)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name.startswith("consolidated."):
            torch.save({k: v.float() for k, v in load_shard(f).items()}, dst / f.name)
        else:
            shutil.copy(f, dst / f.name)
    return dst


def test_its_logits_and_tokens_equal_those_of_fp32_weights_bit_for_bit(
    kernel, make_checkpoint, build, tmp_path
):
    """Prefill (the GEMM), decoding (the whole native step) and greedy tokens with their
    logprobs: identical to the same values kept in fp32."""
    bf16_ckpt = make_checkpoint(GQA_ARGS, dtype=torch.bfloat16, std=0.5)
    kept = build(bf16_ckpt, dtype="float32")
    wide = build(_as_fp32_checkpoint(bf16_ckpt, tmp_path / "fp32"), dtype="float32")
    assert all(m.native_plan.w16 for m in kept.model.linear_layers())
    assert not any(m.native_plan.w16 for m in wide.model.linear_layers())
    assert kept.model.native_decoder is not None and wide.model.native_decoder is not None
    tokens = torch.tensor([PROMPTS[0]])
    assert torch.equal(kept.model.forward(tokens), wide.model.forward(tokens))
    a = kept.generate(PROMPTS, 12, temperature=0.0, logprobs=True)
    b = wide.generate(PROMPTS, 12, temperature=0.0, logprobs=True)
    assert a == b


SHARDED = dataclasses.replace(GQA_ARGS, dim=256, n_heads=4, n_kv_heads=1, multiple_of=128)


def test_a_shard_in_fp32_after_a_bf16_one_widens_the_weight(
    kernel, make_checkpoint, build, tmp_path
):
    """Pieces of one weight in different dtypes: what the bf16 pieces stored is widened to
    fp32 and the fp32 piece is kept exactly (its values are not bf16's)."""
    src = make_checkpoint(SHARDED, n_shards=2, dtype=torch.bfloat16)
    ckpt = tmp_path / "mixed"
    shutil.copytree(src, ckpt)
    g = torch.Generator().manual_seed(9)
    first = load_shard(ckpt / "consolidated.00.pth")
    second = {  # new split pieces; the replicated norms stay the same values, in fp32
        k: torch.randn(v.shape, generator=g) if split_dim(k) is not None else first[k].float()
        for k, v in load_shard(ckpt / "consolidated.01.pth").items()
    }
    torch.save(second, ckpt / "consolidated.01.pth")
    model = build(ckpt, dtype="float32").model
    for name, dim in (("layers.0.attention.wq", 0), ("layers.1.attention.wo", 1)):
        layer = model.get_submodule(name)
        assert not layer.native_plan.w16 and layer.weight.dtype == torch.float32
        whole = torch.cat([first[name + ".weight"].float(), second[name + ".weight"]], dim)
        assert torch.equal(layer.native_plan.unpack(), whole)


def test_bf16_pieces_whose_cuts_split_column_pairs_are_kept_in_fp32(kernel):
    """bf16 keeps columns 2i and 2i+1 together: cut at an odd column, the pieces are packed
    into an fp32 weight instead (exactly, one by one)."""
    args = ModelArgs(dim=128, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=64)
    model = build_empty(args, "cpu", torch.float32)
    model.native_kernel = kernel
    w = _bf16_values(128, 128, 5).bfloat16()
    cuts = (0, 63, 128)
    for lo, hi in itertools.pairwise(cuts):
        assert model.store_prepacked("layers.0.attention.wo.weight", w[:, lo:hi], 1, lo, cuts)
    layer = model.layers[0].attention.wo
    assert layer.weight.dtype == torch.float32 and not layer.native_plan.w16
    assert torch.equal(layer.native_plan.unpack(), w.float())


def test_the_portable_build_multiplies_bf16_kept_weights(portable_kernel, kernel):
    portable = portable_kernel
    w = _bf16_values(130, 301, 6)
    fp32, bf16 = _plans(portable, w)
    x = torch.randn(20, 301, generator=torch.Generator().manual_seed(7))
    assert torch.equal(bf16(x), fp32(x))


def test_stored_dtypes_reads_a_checkpoints_dtypes_from_its_pickle(tmp_path):
    torch.save({"a": torch.ones(3, dtype=torch.bfloat16)}, tmp_path / "bf16.pth")
    torch.save({"a": torch.ones(3), "b": torch.ones(2).half()}, tmp_path / "mixed.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a zip file")
    assert stored_dtypes(tmp_path / "bf16.pth") == {torch.bfloat16}
    assert stored_dtypes(tmp_path / "mixed.pth") == {torch.float32, torch.float16}
    assert stored_dtypes(tmp_path / "junk.pth") is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_bytes_predicts_what_an_fp32_model_holds(kernel, make_checkpoint, build, dtype):
    """The memory check before loading counts bf16 linear weights for a bf16 checkpoint."""
    model = build(make_checkpoint(SHARDED, dtype=dtype), dtype="float32").model
    linear = torch.bfloat16 if dtype == torch.bfloat16 else None
    predicted = weight_bytes(model.params, torch.float32, 1, linear)
    held = parameter_bytes(model)  # the packed layout pads rows to 64 (wk, wv: 64 of them)
    assert predicted <= held <= predicted * 1.1


def test_an_fp32_build_that_fits_only_with_bf16_weights_is_allowed(
    kernel, make_checkpoint, build, monkeypatch
):
    """The memory check refuses what cannot fit, and admits an fp32 model of a bf16
    checkpoint that fits because its linear weights stay bf16."""
    import codellama.distributed

    bf16_ckpt = make_checkpoint(SHARDED, dtype=torch.bfloat16)
    model = build(bf16_ckpt, dtype="float32").model
    args = dataclasses.replace(model.params)
    full = weight_bytes(args, torch.float32) + kv_cache_bytes(args, torch.float32)
    kept = weight_bytes(args, torch.float32, 1, torch.bfloat16) + kv_cache_bytes(
        args, torch.float32
    )
    free = (full + kept) // 2
    monkeypatch.setattr(codellama.distributed, "available_memory", lambda device: free)
    assert build(bf16_ckpt, dtype="float32").model.dtype == torch.float32
    with pytest.raises(OutOfMemoryError):
        build(make_checkpoint(SHARDED, dtype=torch.float32), dtype="float32")
