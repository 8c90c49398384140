"""The native causal prefill attention (AVX2 builds): right against float64, a row's result
independent of the other rows and of where a prompt is cut into chunks, shapes it does not
serve left to SDPA, and models using it for prefill."""

from __future__ import annotations

import pytest
import torch

from codellama import native

from .conftest import GQA_ARGS, MHA_ARGS

# (batch, positions, heads, KV heads, head size, start position)
SHAPES = [
    (1, 300, 16, 4, 64, 0),  # GQA, several blocks of keys and of positions
    (2, 37, 8, 8, 16, 0),  # MHA
    (2, 20, 8, 4, 8, 3),  # head size 8 (an 8-column tail only)
    (1, 70, 6, 2, 24, 0),  # 16 + 8 columns
    (3, 100, 8, 2, 128, 50),  # a chunk after the start, Code Llama's head size
    (1, 5, 4, 1, 32, 300),  # a short chunk after a long context
    (1, 1, 4, 4, 64, 10),  # one position
]


def _inputs(b, t, h, hkv, d, start, dtype, seed=0, spare=7):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g).to(dtype)
    ck = torch.randn(b, hkv, start + t + spare, d, generator=g).to(dtype)
    cv = torch.randn(b, hkv, start + t + spare, d, generator=g).to(dtype)
    return q, ck, cv


def _reference(q, ck, cv, start):
    """Causal attention in float64: query start + i sees keys 0 .. start + i."""
    b, t, h, d = q.shape
    rep = h // ck.shape[1]
    keys = ck[:, :, : start + t].double().repeat_interleave(rep, 1)
    vals = cv[:, :, : start + t].double().repeat_interleave(rep, 1)
    scores = q.transpose(1, 2).double() @ keys.transpose(-1, -2) / d**0.5
    later = torch.arange(start + t).view(1, -1) > torch.arange(start, start + t).view(-1, 1)
    probs = scores.masked_fill(later, float("-inf")).softmax(-1)
    return (probs @ vals).transpose(1, 2).reshape(b, t, h * d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_prefill_attention_matches_float64(avx2_kernel, dtype, shape):
    q, ck, cv = _inputs(*shape, dtype)
    got = avx2_kernel.prefill_attention(q, ck, cv, shape[-1])
    assert got is not None and got.dtype == dtype
    want = _reference(q, ck, cv, shape[-1])
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: the output rounded once
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cut", [1, 47, 64, 150])
def test_a_prompt_cut_into_chunks_gets_the_same_bits(avx2_kernel, dtype, cut):
    """Key blocks start at multiples of the block size whatever the chunk, and a block a row
    does not reach leaves it as it was: chunked prefill equals one pass, bit for bit."""
    q, ck, cv = _inputs(2, 200, 8, 2, 64, 0, dtype, seed=1)
    whole = avx2_kernel.prefill_attention(q, ck, cv, 0)
    first = avx2_kernel.prefill_attention(q[:, :cut], ck, cv, 0)
    rest = avx2_kernel.prefill_attention(q[:, cut:], ck, cv, cut)
    assert torch.equal(torch.cat([first, rest], dim=1), whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_the_other_rows(avx2_kernel, dtype):
    q, ck, cv = _inputs(3, 90, 8, 4, 32, 5, dtype, seed=2)
    together = avx2_kernel.prefill_attention(q, ck, cv, 5)
    for i in range(3):
        alone = avx2_kernel.prefill_attention(q[i : i + 1], ck[i : i + 1], cv[i : i + 1], 5)
        assert torch.equal(alone, together[i : i + 1]), f"row {i}"


def test_keys_past_the_prompt_are_never_read(avx2_kernel):
    """The cache beyond start + T holds other data (or NaN): it changes nothing."""
    q, ck, cv = _inputs(1, 40, 4, 2, 16, 10, torch.float32, seed=3, spare=30)
    clean = avx2_kernel.prefill_attention(q, ck, cv, 10)
    ck[:, :, 50:], cv[:, :, 50:] = float("nan"), float("nan")
    assert torch.equal(avx2_kernel.prefill_attention(q, ck, cv, 10), clean)


def test_shapes_it_does_not_serve_are_left_to_sdpa(avx2_kernel):
    q, ck, cv = _inputs(1, 10, 4, 2, 16, 0, torch.float32)
    attend = avx2_kernel.prefill_attention
    assert attend(*_inputs(1, 10, 4, 2, 12, 0, torch.float32), 0) is None  # head size 12
    assert attend(*_inputs(1, 10, 4, 2, 264, 0, torch.float32), 0) is None  # over 256
    assert attend(*_inputs(1, 10, 6, 4, 16, 0, torch.float32), 0) is None  # 6 heads on 4
    assert attend(q.half(), ck.half(), cv.half(), 0) is None  # no fp16 kernel
    assert attend(q, ck.bfloat16(), cv.bfloat16(), 0) is None  # mixed dtypes
    assert attend(q, ck, cv, 8) is None  # the cache holds 17 positions, not 8 + 10
    wide = torch.randn(1, 2, 17, 32)[..., :16]  # rows of the cache not contiguous
    assert attend(q, wide, wide, 0) is None
    assert attend(q, ck[:1, :, :, :], cv, 0) is not None


def _needs_avx2_attention(kernel: native.NativeLinear) -> None:
    if not kernel.avx2:
        pytest.skip("the native prefill attention is built for AVX2 (without AVX-512) only")


def _logits(model, tokens: torch.Tensor, native_attention: bool) -> torch.Tensor:
    for layer in model.layers:
        layer.attention.native_attention = model.native_kernel if native_attention else None
    with torch.inference_mode():
        return model.forward_tokens(tokens)


@pytest.mark.parametrize("args", [GQA_ARGS, MHA_ARGS], ids=["gqa", "mha"])
def test_models_prefill_with_it_and_match_sdpa(kernel, make_checkpoint, build, args):
    _needs_avx2_attention(kernel)
    model = build(make_checkpoint(args), max_seq_len=96).model
    assert all(layer.attention.native_attention is kernel for layer in model.layers)
    tokens = torch.randint(3, model.params.vocab_size, (2, 70), generator=torch.Generator())
    torch.testing.assert_close(
        _logits(model, tokens, True), _logits(model, tokens, False), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("args", [GQA_ARGS, MHA_ARGS], ids=["gqa", "mha"])
def test_bf16_models_prefill_as_close_to_fp32_as_with_sdpa(kernel, make_checkpoint, build, args):
    """bf16 logits of a random model stray from fp32 ones by up to ~2 either way; sums in
    fp32 and one rounding keep the native attention's no further than SDPA's."""
    _needs_avx2_attention(kernel)
    ckpt = make_checkpoint(args)
    fp32 = build(ckpt, max_seq_len=96).model
    tokens = torch.randint(3, fp32.params.vocab_size, (2, 70), generator=torch.Generator())
    exact = _logits(fp32, tokens, False)
    bf16 = build(ckpt, max_seq_len=96, dtype="bfloat16").model
    ours, sdpa = (_logits(bf16, tokens, native) - exact for native in (True, False))
    assert ours.abs().mean() <= 1.05 * sdpa.abs().mean()
    assert ours.abs().max() <= 1.25 * sdpa.abs().max()


def test_a_models_chunked_prefill_gives_the_same_logits_bit_for_bit(kernel, make_checkpoint, build):
    """Linear rows, norms and this attention are all independent of the chunk: the last
    position's logits are the same bits whether the prompt went in whole or in pieces."""
    _needs_avx2_attention(kernel)
    model = build(make_checkpoint(GQA_ARGS), max_seq_len=96).model
    tokens = torch.randint(3, model.params.vocab_size, (1, 75), generator=torch.Generator())
    last = torch.tensor([74])
    with torch.inference_mode():
        whole = model.forward_tokens(tokens, logits_index=last)
        model.fill_cache(tokens[:, :30])
        model.fill_cache(tokens[:, 30:64], 30)
        chunked = model.forward_tokens(tokens[:, 64:], 64, logits_index=torch.tensor([10]))
    assert torch.equal(chunked, whole)


def test_the_portable_build_leaves_attention_to_sdpa(kernel):
    if kernel.avx2:
        pytest.skip("this machine's build has the AVX2 attention")
    q, ck, cv = _inputs(1, 10, 4, 2, 16, 0, torch.float32)
    assert kernel.prefill_attention(q, ck, cv, 0) is None


def test_the_native_library_reports_its_attention(avx2_kernel):
    assert isinstance(avx2_kernel, native.NativeLinear)
    assert set(avx2_kernel._attention) == {torch.float32, torch.bfloat16}
