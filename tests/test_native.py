"""The native decoding kernels: exact against float64 and oneDNN, optional, invisible in output."""

from __future__ import annotations

import ctypes
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from codellama import native
from codellama.errors import ConfigError
from codellama.model import linear

from .conftest import GQA_ARGS

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
LAYOUTS = ["plain", "packed", "packed-batch-1"]  # oneDNN packs for any batch, or batch 1


@pytest.fixture
def native_off(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """CODELLAMA_NATIVE_KERNELS=0 for the test, with load()'s cache reset around it."""
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    native.load.cache_clear()
    yield
    monkeypatch.delenv(native.ENV_SWITCH)
    native.load.cache_clear()


def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN can keep ``dtype`` weights in its packed layout on this CPU (bf16 needs
    AVX-512 at least: on AVX2 bf16 weights stay plain)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (
        dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def _weight(n: int, k: int, dtype: torch.dtype, layout: str, seed: int = 0):
    """A random weight and its stored form; None when this CPU cannot pack ``dtype``."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if layout == "plain":
        return w, w, None
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN cannot pack bf16 on this CPU")
    hint = 1 if layout == "packed-batch-1" else None
    return w, torch.ops.mkldnn._reorder_linear_weight(w, hint), hint


def _check(kernel: native.NativeLinear, dtype, layout, m: int, n: int, k: int) -> None:
    w, stored, hint = _weight(n, k, dtype, layout, seed=m * 1000 + n + k)
    plan = kernel.plan(stored, hint)
    if plan is None and dtype == torch.bfloat16 and not kernel.bf16_dot_product:
        return  # without bf16 dot products oneDNN's packed bf16 stays with oneDNN
    assert plan is not None
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    got = plan(x)
    assert got.dtype == dtype and got.shape == (m, n)
    want = x.double() @ w.double().T  # bf16 outputs carry one bf16 rounding (2^-8)
    torch.testing.assert_close(got.double(), want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize(("n", "k"), [(64, 128), (100, 70), (5, 33), (1, 1)])
def test_kernel_matches_float64_reference(kernel, layout, dtype, m, n, k):
    _check(kernel, dtype, layout, m, n, k)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("layout", ["packed", "packed-batch-1"])
def test_packed_bf16_results_equal_onednn_but_rare_one_ulp_roundings(kernel, layout, seed):
    """Same products in nearly the same order: over 200 random draws, at most 2 of 1200
    outputs differed, each by one bf16 step (the fp32 sums round the other way). The data
    are seeded: drawn from the global generator, the case failed one run in ~30."""
    if not kernel.bf16_dot_product:
        pytest.skip("this CPU has no AVX512-BF16: packed bf16 stays with oneDNN")
    torch.manual_seed(seed)
    _, stored, hint = _weight(300, 1000, torch.bfloat16, layout)
    x = torch.randn(4, 1000).bfloat16()
    plan = kernel.plan(stored, hint)
    assert plan is not None
    onednn = torch.ops.mkldnn._linear_pointwise(x, stored, None, "none", [], "")
    ours = plan(x)
    assert (ours == onednn).float().mean().item() >= 0.995
    _, exponent = torch.frexp(onednn.float())  # |v| in [2^(e-1), 2^e): bf16 step 2^(e-8)
    step = torch.ldexp(torch.ones_like(onednn, dtype=torch.float32), exponent - 8)
    assert ((ours.float() - onednn.float()).abs() <= step).all()


def test_layout_is_checked_against_onednn_not_assumed(kernel):
    """fp32 packed for batch 1 is row-major and, at this shape, exactly as big as the
    64-row blocked layout: only multiplying tells them apart."""
    w, stored, _ = _weight(64, 96, torch.float32, "packed-batch-1")
    fresh = native.NativeLinear(ctypes.CDLL(str(kernel.path)), kernel.path)  # empty cache
    plan = fresh.plan(stored, pack_hint=None)  # a wrong claim: the check finds row-major
    assert plan is not None and plan.padded_k == 0
    x = torch.randn(2, 96)
    torch.testing.assert_close(plan(x), x @ w.T, rtol=1e-4, atol=1e-4)


def test_no_plan_when_torch_lacks_the_packed_buffer_ops(kernel, monkeypatch):
    _, stored, hint = _weight(64, 96, torch.float32, "packed")
    fresh = native.NativeLinear(ctypes.CDLL(str(kernel.path)), kernel.path)

    def missing(*args):
        raise RuntimeError("No such operator mkldnn::_nbytes")

    monkeypatch.setattr(torch.ops.mkldnn, "_nbytes", missing)
    assert fresh.plan(stored, hint) is None  # oneDNN keeps the layer


def test_kernel_keeps_leading_dimensions(kernel):
    w = torch.randn(12, 16)
    x = torch.randn(2, 1, 16)
    out = kernel.plan(w)(x)
    assert out.shape == (2, 1, 12)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w))


def test_portable_code_matches_reference(portable_kernel, kernel):
    """CPUs without AVX512-BF16 get the portable code: build it here and check it too."""
    portable = portable_kernel
    assert not portable.bf16_dot_product and not portable.avx2 and not portable.avx512
    for layout in LAYOUTS:
        for m in (1, 3, 8):
            _check(portable, torch.float32, layout, m, 100, 70)
            if layout == "plain" or onednn_packs(torch.bfloat16):  # else _weight would skip
                _check(portable, torch.bfloat16, layout, m, 100, 70)


def test_plans_only_small_batches_of_the_planned_weight(kernel):
    w = torch.randn(8, 16)
    plan = kernel.plan(w)
    assert plan.accepts(torch.randn(8, 16), w)
    assert plan.accepts(torch.randn(2, 4, 16), w)
    assert not plan.accepts(torch.randn(9, 16), w)  # a GEMM is faster there
    assert not plan.accepts(torch.randn(1, 16).bfloat16(), w)
    assert not plan.accepts(torch.randn(1, 16), torch.randn(8, 16))  # a replaced weight


def test_refuses_inputs_of_the_wrong_width(kernel):
    with pytest.raises(ValueError, match="16 features"):
        kernel.plan(torch.randn(8, 16))(torch.randn(1, 12))


def test_no_plan_for_what_it_cannot_read(kernel):
    assert kernel.plan(torch.randn(8, 16).half()) is None
    assert kernel.plan(torch.randn(16, 8).T) is None  # not contiguous
    assert kernel.plan(torch.randn(2, 8, 16)) is None


def test_environment_switch_turns_the_kernel_off(native_off):
    assert native.load() is None
    assert native.ENV_SWITCH in (native.last_error() or "")


@pytest.mark.parametrize("value", ["disabled", "2", "none"])
def test_an_unknown_environment_switch_value_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv(native.ENV_SWITCH, value)
    native.load.cache_clear()
    try:
        with pytest.raises(
            ConfigError, match=f"CODELLAMA_NATIVE_KERNELS='{value}' is not a switch"
        ):
            native.load()
    finally:
        native.load.cache_clear()


def test_a_failing_compiler_is_reported_not_raised(tmp_path: Path, monkeypatch):
    with pytest.raises(RuntimeError, match="failed"):
        native.build(compiler="false", cache_dir=tmp_path)
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("CODELLAMA_CACHE", str(tmp_path))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # no kernels built there yet
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    native.load.cache_clear()
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        with pytest.warns(RuntimeWarning, match="native CPU kernels could not be built.*false"):
            assert native.load() is None
        assert "failed" in (native.last_error() or "")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.load() is None  # once a process: no second warning
    finally:
        native.load.cache_clear()
        tempfile.tempdir = None


def test_only_a_machines_first_process_warns_that_the_kernels_are_missing(
    tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("CODELLAMA_CACHE", str(tmp_path))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setenv("LOCAL_RANK", "1")  # a machine's second process: the first says it
    native.load.cache_clear()
    tempfile.tempdir = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.load() is None
    finally:
        native.load.cache_clear()
        tempfile.tempdir = None


def _cached_flags(kernel: native.NativeLinear, monkeypatch) -> tuple[str, ...]:
    """The flags ``kernel`` was built with, found by loading it from the cache with no
    compiler on the PATH (which must work)."""
    monkeypatch.setenv("PATH", "/nonexistent")
    for flags in (native.FLAGS, native.PORTABLE_FLAGS):
        try:
            if native.build(flags=flags).path == kernel.path:
                return flags
        except (OSError, RuntimeError):
            continue
    raise AssertionError(f"{kernel.path} was not found in the cache without a compiler")


def test_a_cached_kernel_is_used_without_a_compiler(kernel, monkeypatch):
    # the kernel fixture built (or found) the library in the cache this test run uses
    assert _cached_flags(kernel, monkeypatch) in (native.FLAGS, native.PORTABLE_FLAGS)


# Quick to compile (~2 s, against ~15 s at -O3): for the tests of building and caching
QUICK_FLAGS = tuple("-O1" if f == "-O3" else f for f in native.PORTABLE_FLAGS)


def test_a_broken_cached_library_is_compiled_again(kernel, tmp_path: Path):
    # a broken copy in another cache: truncating the library this process has loaded would
    # pull its mapped pages away (SIGBUS)
    built = native.build(flags=QUICK_FLAGS, cache_dir=tmp_path / "a")
    broken = tmp_path / "b" / built.path.parent.name / built.path.name
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"")  # e.g. a copy cut short
    rebuilt = native.build(flags=QUICK_FLAGS, cache_dir=tmp_path / "b")
    assert rebuilt.path == broken and broken.stat().st_size > 0


def test_a_compiler_given_with_arguments_builds_its_own_library(kernel, tmp_path: Path):
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc is not None
    plain = native.build(flags=QUICK_FLAGS, cache_dir=tmp_path)
    got = native.build(compiler=f"{cc} -pipe", flags=QUICK_FLAGS, cache_dir=tmp_path)
    assert got.path.is_file() and got.path.parent.parent == tmp_path
    assert got.path.parent.name != plain.path.parent.name  # keyed by the command asked for


@pytest.mark.parametrize(
    ("dtype", "max_batch_size"), [("float32", 4), ("bfloat16", 4), ("float32", 1)]
)
def test_built_cpu_model_keeps_packed_weights_and_plans_every_linear(
    kernel, make_checkpoint, build, dtype, max_batch_size
):
    model = build(make_checkpoint(GQA_ARGS), dtype=dtype, max_batch_size=max_batch_size).model
    linears = list(model.linear_layers())
    assert len(linears) == 7 * GQA_ARGS.n_layers + 1
    assert all(m.native_plan is not None for m in linears)
    if dtype == "bfloat16" and not kernel.bf16_products:
        # read by oneDNN's GEMM for prefill where it packs bf16; plain weights where not (AVX2)
        assert all(m.weight.is_mkldnn == onednn_packs(torch.bfloat16) for m in linears)
        return
    assert all(m.native_plan.owned_layout and m.weight.dim() > 2 for m in linears)


@pytest.mark.parametrize(
    ("vector", "switch", "used"),
    [(True, None, True), (False, None, False), (False, "1", True), (True, "0", False)],
)
def test_models_use_the_kernels_where_built_with_vector_code_or_asked(
    monkeypatch, make_checkpoint, build, vector, switch, used
):
    """The portable build's products are scalar loops (prefill ~13x slower than oneDNN's):
    models use the kernels where built with AVX-512 or AVX2, else only when
    CODELLAMA_NATIVE_KERNELS=1 asks."""
    if switch is None:
        monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    else:
        monkeypatch.setenv(native.ENV_SWITCH, switch)
    native.load.cache_clear()  # load() reads the switch once a process
    try:
        loaded = native.load()  # what Llama.build gets from the cache
        if loaded is not None:
            monkeypatch.setattr(loaded, "avx512", vector)
            monkeypatch.setattr(loaded, "avx2", vector)
        model = build(make_checkpoint(GQA_ARGS)).model
    finally:
        native.load.cache_clear()
    assert (model.native_kernel is not None) is used
    assert all(m.weight.is_mkldnn is not used for m in model.linear_layers())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_without_the_kernel_the_model_keeps_onednn_weights(
    native_off, make_checkpoint, build, dtype
):
    model = build(make_checkpoint(GQA_ARGS), dtype=dtype).model
    assert model.native_kernel is None
    linears = list(model.linear_layers())
    assert all(m.weight.is_mkldnn == onednn_packs(getattr(torch, dtype)) for m in linears)
    assert all(m.__dict__.get("native_plan") is None for m in linears)


def test_compiled_model_does_not_use_the_kernel(kernel, make_checkpoint, build):
    model = build(make_checkpoint(GQA_ARGS), compile=True).model
    assert model.native_kernel is None
    assert all(m.__dict__.get("native_plan") is None for m in list(model.linear_layers()))


def test_a_replaced_weight_is_not_read_through_a_stale_plan(kernel, make_checkpoint, build):
    model = build(make_checkpoint(GQA_ARGS)).model
    layer = model.layers[0].attention.wq
    new = torch.randn(layer.native_plan.n, layer.native_plan.k)  # weight.shape is packed
    layer.weight = torch.nn.Parameter(new, requires_grad=False)
    x = torch.randn(1, 1, new.shape[1])
    torch.testing.assert_close(linear(layer, x), x @ new.T)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lens", [(3, 7, 5, 9, 4), (9,)])
def test_native_and_onednn_models_agree_on_greedy_tokens(
    kernel, make_checkpoint, build, monkeypatch, dtype, lens
):
    ckpt = make_checkpoint(GQA_ARGS, std=1.0)  # peaky: greedy choices are far from ties
    with_kernel = build(ckpt, dtype=dtype, max_batch_size=8)
    assert with_kernel.model.native_kernel is not None
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    native.load.cache_clear()
    try:
        onednn = build(ckpt, dtype=dtype, max_batch_size=8)
    finally:
        monkeypatch.delenv(native.ENV_SWITCH)
        native.load.cache_clear()
    assert onednn.model.native_kernel is None  # and prefill runs on oneDNN's GEMM
    vocab = onednn.model.params.vocab_size
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lens]
    want = onednn.generate(prompts, 6, temperature=0, stop_token=-1, logprobs=True)
    got = with_kernel.generate(prompts, 6, temperature=0, stop_token=-1, logprobs=True)
    assert got[0] == want[0]
    tol = 1e-4 if dtype == "float32" else 0.1
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=tol, rtol=tol)


def test_greedy_pick_equals_torch_argmax_and_isfinite(kernel):
    gen = torch.Generator().manual_seed(0)
    for trial in range(120):
        rows, vocab = trial % 8 + 1, [1, 15, 16, 17, 100, 32016][trial % 6]
        x = torch.randn(rows, vocab, generator=gen)
        if trial % 3 == 0:
            x = x.round()  # ties: the first maximum wins
        for value, every in ((float("nan"), 5), (float("inf"), 7), (float("-inf"), 4)):
            if trial % every == 0:
                x[trial % rows, (trial * 7) % vocab] = value
        index, finite = kernel.greedy(x)
        assert index == torch.argmax(x, dim=-1).tolist(), trial
        assert finite == torch.isfinite(x).all(dim=-1).tolist(), trial


def test_greedy_pick_declines_what_it_does_not_take(kernel):
    assert kernel.greedy(torch.randn(2, 8, dtype=torch.bfloat16)) is None
    assert kernel.greedy(torch.randn(8, 2).T) is None
    assert kernel.greedy(torch.randn(8)) is None
