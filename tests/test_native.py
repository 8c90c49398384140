"""The native small-batch linear kernel: exact against float64, optional, and invisible in output."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

from codellama import Llama, ModelArgs, Tokenizer, native
from codellama.checkpoint import load_weights, read_params, shard_paths
from codellama.model import build_empty

from .conftest import GQA_ARGS


@pytest.fixture(scope="module")
def kernel() -> native.NativeLinear:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: the native kernel cannot be built")
    got = native.load()
    assert got is not None, f"the native kernel failed to build: {native.last_error()}"
    return got


def _linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _check_against_float64(kernel: native.NativeLinear, dtype: torch.dtype, m: int, n: int, k: int):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    want = x.double() @ w.double().T
    got = kernel(x, w)
    assert got.dtype == dtype and got.shape == (m, n)
    # bf16 outputs carry bf16 rounding (relative 2^-8); sums are fp32 either way.
    torch.testing.assert_close(got.double(), want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize(("n", "k"), [(64, 128), (37, 70), (5, 33), (1, 1)])
def test_kernel_matches_float64_reference(kernel, dtype, m, n, k):
    _check_against_float64(kernel, dtype, m, n, k)


def test_kernel_keeps_leading_dimensions(kernel):
    w = torch.randn(12, 16)
    x = torch.randn(2, 1, 16)
    out = kernel(x, w)
    assert out.shape == (2, 1, 12)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w))


def test_kernel_rounds_bf16_like_torch(kernel):
    w = torch.randn(256, 512).bfloat16()
    x = torch.randn(1, 512).bfloat16()
    exact = (x.float() @ w.float().T).bfloat16()  # fp32 sum, then one rounding to bf16
    mismatched = (kernel(x, w) != exact).float().mean().item()
    assert mismatched < 0.05  # only ties between fp32 summation orders may differ


def test_portable_bf16_path_matches_reference(tmp_path: Path, kernel):
    """CPUs without AVX512-BF16 get the portable code: build it here and check it too."""
    flags = tuple(f for f in native.FLAGS if f != "-march=native")
    portable = native.build(flags=flags, cache_dir=tmp_path)
    assert not portable.bf16_dot_product
    for m in (1, 3, 8):
        _check_against_float64(portable, torch.bfloat16, m, 37, 70)
        _check_against_float64(portable, torch.float32, m, 37, 70)


def test_accepts_only_small_batches_of_matching_dtype(kernel):
    w = torch.randn(8, 16)
    assert kernel.accepts(torch.randn(8, 16), w)
    assert kernel.accepts(torch.randn(2, 4, 16), w)
    assert not kernel.accepts(torch.randn(9, 16), w)  # a GEMM is faster there
    assert not kernel.accepts(torch.randn(1, 16).bfloat16(), w)


def test_refuses_a_weight_of_the_wrong_width(kernel):
    with pytest.raises(ValueError, match="16 columns"):
        kernel(torch.randn(1, 16), torch.randn(8, 12))


def test_environment_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    native.load.cache_clear()
    try:
        assert native.load() is None
        assert native.ENV_SWITCH in (native.last_error() or "")
    finally:
        monkeypatch.delenv(native.ENV_SWITCH)
        native.load.cache_clear()


def test_a_failing_compiler_is_reported_not_raised(tmp_path: Path, monkeypatch):
    with pytest.raises(RuntimeError, match="failed"):
        native.build(compiler="false", cache_dir=tmp_path)
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("CODELLAMA_CACHE", str(tmp_path))
    native.load.cache_clear()
    try:
        assert native.load() is None
        assert "failed" in (native.last_error() or "")
    finally:
        native.load.cache_clear()


def test_bf16_model_for_small_batches_keeps_plain_weights_for_the_kernel(
    kernel, make_checkpoint, build
):
    model = build(make_checkpoint(GQA_ARGS), dtype="bfloat16", max_batch_size=1).model
    assert isinstance(model.native_kernel, native.NativeLinear)
    linears = _linears(model)
    assert len(linears) == 7 * GQA_ARGS.n_layers + 1
    assert all(m.native_kernel is model.native_kernel for m in linears)
    assert not any(p.is_mkldnn for p in model.parameters())
    assert not model.prepack_cpu_weights()  # plain weights stay plain


@pytest.mark.parametrize(("dtype", "max_batch_size"), [("bfloat16", 4), ("float32", 1)])
def test_other_cpu_models_use_onednn(kernel, make_checkpoint, build, dtype, max_batch_size):
    """Where oneDNN's prepacked GEMM is faster overall (see native.worth_using)."""
    model = build(make_checkpoint(GQA_ARGS), dtype=dtype, max_batch_size=max_batch_size).model
    assert model.native_kernel is None
    assert all(m.weight.is_mkldnn for m in _linears(model))


def test_compiled_model_does_not_use_the_kernel(kernel, make_checkpoint, build):
    ckpt = make_checkpoint(GQA_ARGS)
    assert build(ckpt, dtype="bfloat16", max_batch_size=1, compile=True).model.native_kernel is None


def _build_with_kernel(ckpt: Path, dtype: torch.dtype, kernel: native.NativeLinear) -> Llama:
    """A Llama whose linear layers use ``kernel`` whatever the build policy would choose."""
    args = ModelArgs.from_params(read_params(ckpt), max_seq_len=128, max_batch_size=8)
    tokenizer = Tokenizer(str(ckpt / "tokenizer.model"))
    args.vocab_size = tokenizer.n_words
    model = build_empty(args, "cpu", dtype)
    assert model.use_native_kernel(kernel)
    load_weights(model, shard_paths(ckpt))
    model.setup_cache(dtype=dtype, device="cpu")
    assert not model.prepack_cpu_weights()
    return Llama(model.eval(), tokenizer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_and_onednn_models_agree_on_greedy_tokens(kernel, make_checkpoint, build, dtype):
    ckpt = make_checkpoint(GQA_ARGS, std=1.0)  # peaky: greedy choices are far from ties
    onednn = build(ckpt, dtype=str(dtype).removeprefix("torch."), max_batch_size=8)
    assert onednn.model.native_kernel is None
    with_kernel = _build_with_kernel(ckpt, dtype, kernel)
    vocab = onednn.model.params.vocab_size
    gen = torch.Generator().manual_seed(3)
    # five rows: decoding runs the kernel on 5 rows, then fewer as none stop early (all 5)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (3, 7, 5, 9, 4)]
    want = onednn.generate(prompts, 6, temperature=0, stop_token=-1, logprobs=True)
    got = with_kernel.generate(prompts, 6, temperature=0, stop_token=-1, logprobs=True)
    assert got[0] == want[0]
    tol = 1e-4 if dtype == torch.float32 else 0.1
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=tol, rtol=tol)


def test_single_row_decoding_with_the_kernel_equals_onednn(kernel, make_checkpoint, build):
    ckpt = make_checkpoint(GQA_ARGS, std=1.0)
    onednn = build(ckpt, dtype="float32", max_batch_size=1)
    with_kernel = _build_with_kernel(ckpt, torch.float32, kernel)
    prompt = [list(range(3, 12))]
    want = onednn.generate(prompt, 8, temperature=0, stop_token=-1)[0]
    assert with_kernel.generate(prompt, 8, temperature=0, stop_token=-1)[0] == want
