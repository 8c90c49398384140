"""The native decoding step: the model's torch layers in one call, used only where it applies."""

from __future__ import annotations

import pytest
import torch

from codellama import ModelArgs, PromptTooLongError, SamplingParams, native

from .conftest import GQA_ARGS, MHA_ARGS

# head_dim 18: not a multiple of the 16-wide vectors, so every tail path runs.
ODD_ARGS = ModelArgs(dim=72, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=8, rope_theta=1e6)
# An odd SwiGLU width (213): w2 has an odd K (a last half pair), w1/w3 a part-filled last block.
ODD_FFN_ARGS = ModelArgs(dim=80, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=1)
# Code Llama's head_dim is 128: 96 takes the decoding attention's 64- and 32-wide p @ V loops.
WIDE_HEAD_ARGS = ModelArgs(dim=192, n_layers=1, n_heads=2, n_kv_heads=1, multiple_of=16)
TOL = {"float32": 1e-4, "bfloat16": 5e-2}


def _needs_bf16_step(kernel: native.NativeLinear, dtype: str) -> None:
    if dtype == "bfloat16" and not kernel.bf16_products:
        pytest.skip("this CPU has neither AVX512-BF16 nor AVX2: bf16 decoding stays on torch")


def _step(model, prompt: torch.Tensor, token: torch.Tensor, *, native_step: bool, **kw):
    """Logits of one decoding step after ``prompt``, natively or through the torch layers."""
    decoder = model.native_decoder
    if not native_step:
        model.native_decoder = None
    try:
        with torch.inference_mode():
            model.forward_tokens(prompt, 0, row_offset=kw.get("row_offset", 0))
            if "positions" in kw:
                return model.forward_tokens(token, positions=kw["positions"], kv_len=kw["kv_len"],
                                            row_offset=kw.get("row_offset", 0))  # fmt: skip
            return model.forward_tokens(token, prompt.shape[1], row_offset=kw.get("row_offset", 0))
    finally:
        model.native_decoder = decoder


def _tokens(vocab: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_built_cpu_model_decodes_through_the_native_step(kernel, make_checkpoint, build, dtype):
    _needs_bf16_step(kernel, dtype)
    model = build(make_checkpoint(GQA_ARGS), dtype=dtype).model
    assert model.native_decoder is not None
    calls = []
    decoder = model.native_decoder

    def counting(*args):
        calls.append(args)
        return decoder(*args)

    model.native_decoder = counting
    vocab = model.params.vocab_size
    _step(model, _tokens(vocab, 2, 5), _tokens(vocab, 2, 1), native_step=True)
    assert len(calls) == 1  # the prefill (5 tokens) ran on the torch layers, the step natively


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("args", "prompt_len", "rows"),
    [
        (GQA_ARGS, 9, 3),
        (MHA_ARGS, 9, 1),
        (ODD_ARGS, 7, 2),
        (GQA_ARGS, 150, 2),
        (GQA_ARGS, 9, 1),
        (ODD_FFN_ARGS, 7, 1),
        (WIDE_HEAD_ARGS, 150, 2),
    ],
    ids=["gqa", "mha", "odd-head-dim", "long-context", "one-row", "odd-ffn-one-row", "head-dim-96"],
)
def test_native_step_equals_the_torch_layers(
    kernel, make_checkpoint, build, dtype, args, prompt_len, rows
):
    _needs_bf16_step(kernel, dtype)
    model = build(make_checkpoint(args), max_seq_len=256, dtype=dtype).model
    assert model.native_decoder is not None
    vocab = model.params.vocab_size
    prompt, token = _tokens(vocab, rows, prompt_len), _tokens(vocab, rows, 1, seed=1)
    got = _step(model, prompt, token, native_step=True)
    want = _step(model, prompt, token, native_step=False)
    assert got.dtype == torch.float32 and got.shape == want.shape == (rows, 1, vocab)
    tol = TOL[dtype] * want.abs().max().item()
    torch.testing.assert_close(got, want, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_native_step_picks_as_torch_argmax_does(kernel, make_checkpoint, build, dtype):
    _needs_bf16_step(kernel, dtype)
    model = build(make_checkpoint(GQA_ARGS), dtype=dtype).model
    vocab = model.params.vocab_size
    logits = _step(model, _tokens(vocab, 3, 9), _tokens(vocab, 3, 1, seed=1), native_step=True)
    picks = model.native_decoder.picks(logits[:, 0])
    assert picks is not None
    tokens, finite = picks
    assert tokens.tolist() == logits[:, 0].argmax(-1).tolist()
    assert finite == [True, True, True]


def test_the_native_step_flags_a_non_finite_row_and_picks_its_first_nan(
    kernel, make_checkpoint, build
):
    model = build(make_checkpoint(GQA_ARGS)).model
    vocab = model.params.vocab_size
    token = _tokens(vocab, 3, 1, seed=1)
    model.tok_embeddings.weight.data[token[1, 0]] = float("nan")  # row 1's input only
    logits = _step(model, _tokens(vocab, 3, 9), token, native_step=True)[:, 0]
    tokens, finite = model.native_decoder.picks(logits)
    assert finite == [True, False, True]
    assert tokens.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_native_steps_pick_is_the_first_of_tied_maxima_on_any_number_of_threads(
    kernel, make_checkpoint, build, threads
):
    """Threads pick over the units they took; the merged pick is torch.argmax's, the first
    of equal maxima, whichever thread took which."""
    model = build(make_checkpoint(GQA_ARGS)).model
    vocab, dim = model.params.vocab_size, model.params.dim
    tied = [70, vocab - 3]  # in different 64-row units
    u = torch.randn(dim, generator=torch.Generator().manual_seed(2))
    weight = (-u).expand(vocab, dim).clone()  # others: -(h . u); h . u > 0 ties at 70
    weight[tied] = u
    model.output.weight = torch.nn.Parameter(weight, requires_grad=False)
    model.use_native_kernel(kernel)  # plans again, reading the new weight
    prompt, token = _tokens(vocab, 4, 9), _tokens(vocab, 4, 1, seed=1)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        logits = _step(model, prompt, token, native_step=True)[:, 0]
    finally:
        torch.set_num_threads(old)
    tokens, finite = model.native_decoder.picks(logits)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    assert torch.equal(logits[:, 70], logits[:, vocab - 3])
    assert 70 in tokens.tolist()  # a tie between units happened
    assert finite == [True] * 4


def test_only_the_last_steps_logits_have_the_native_steps_picks(kernel, make_checkpoint, build):
    model = build(make_checkpoint(GQA_ARGS)).model
    vocab = model.params.vocab_size
    first = _step(model, _tokens(vocab, 2, 9), _tokens(vocab, 2, 1, seed=1), native_step=True)
    decoder = model.native_decoder
    assert decoder.picks(first[:, 0]) is not None
    assert decoder.picks(first[:, 0].clone()) is None  # a copy may have been changed
    assert decoder.picks(first[1:, 0]) is None  # a part
    _step(model, _tokens(vocab, 2, 9), _tokens(vocab, 2, 1, seed=2), native_step=True)
    assert decoder.picks(first[:, 0]) is None  # an earlier step's


def test_native_step_writes_the_same_kv_cache_as_the_torch_layers(kernel, make_checkpoint, build):
    model = build(make_checkpoint(GQA_ARGS)).model
    vocab = model.params.vocab_size
    prompt, token = _tokens(vocab, 2, 6), _tokens(vocab, 2, 1, seed=1)
    caches = []
    for native_step in (True, False):
        _step(model, prompt, token, native_step=native_step)
        cache = model.layers[1].attention.cache
        caches.append((cache.k[:2, :, :7].clone(), cache.v[:2, :, :7].clone()))
    for got, want in zip(*caches, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_per_row_positions_and_cache_rows_match_the_torch_layers(kernel, make_checkpoint, build):
    model = build(make_checkpoint(GQA_ARGS), max_batch_size=4).model
    vocab = model.params.vocab_size
    prompt, token = _tokens(vocab, 2, 12), _tokens(vocab, 2, 1, seed=1)
    positions = torch.tensor([[12], [5]])  # the second row attends to its first 6 keys only
    kw = {"positions": positions, "kv_len": 13, "row_offset": 2}
    got = _step(model, prompt, token, native_step=True, **kw)
    want = _step(model, prompt, token, native_step=False, **kw)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_native_step_gives_the_same_logits_on_any_number_of_threads(
    kernel, make_checkpoint, build, dtype
):
    # Threads take units of the weights from their own range and then from others' (which
    # ones depends on timing): any split must give the same sums. 5 threads: more than
    # cores here, and more than some groups have units.
    _needs_bf16_step(kernel, dtype)
    model = build(make_checkpoint(GQA_ARGS), dtype=dtype).model
    vocab = model.params.vocab_size
    prompt, token = _tokens(vocab, 3, 20), _tokens(vocab, 3, 1, seed=1)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 5, 2):
            torch.set_num_threads(n)
            results.append(_step(model, prompt, token, native_step=True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_generation_is_the_same_with_and_without_native_steps(
    kernel, make_checkpoint, build, dtype
):
    _needs_bf16_step(kernel, dtype)
    llama = build(make_checkpoint(GQA_ARGS, std=1.0), max_batch_size=8, dtype=dtype)
    vocab = llama.model.params.vocab_size
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (3, 11, 6, 1, 8)]
    got = llama.generate(prompts, 8, temperature=0, stop_token=-1, logprobs=True)
    decoder, llama.model.native_decoder = llama.model.native_decoder, None
    want = llama.generate(prompts, 8, temperature=0, stop_token=-1, logprobs=True)
    llama.model.native_decoder = decoder
    assert got[0] == want[0]
    tol = 1e-4 if dtype == "float32" else 0.1
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=tol, rtol=tol)


def _counting_greedy_steps(model) -> list[int]:
    """Count the rows of every lean greedy step the model's generations take."""
    calls: list[int] = []
    plan_steps = model.native_greedy_steps

    def counted(rows: int):
        steps = plan_steps(rows)
        if steps is None:
            return None

        def step(tokens, positions, kv_len, row_offset=0):
            calls.append(len(tokens))
            return steps(tokens, positions, kv_len, row_offset)

        return step

    model.native_greedy_steps = counted
    return calls


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_generation_takes_lean_native_steps_with_the_same_tokens(
    kernel, make_checkpoint, build, dtype
):
    """Greedy decoding without logprobs runs on GreedySteps: the same tokens as the model's
    forward steps, whose native step is checked against the torch layers above."""
    _needs_bf16_step(kernel, dtype)
    llama = build(make_checkpoint(GQA_ARGS, std=1.0), max_batch_size=8, dtype=dtype)
    vocab = llama.model.params.vocab_size
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (3, 11, 6, 1, 8)]
    calls = _counting_greedy_steps(llama.model)
    got = llama.generate(prompts, 10, temperature=0, stop_token=-1)
    assert calls == [len(prompts)] * 9  # the first token comes from the prefill's logits
    del llama.model.native_greedy_steps  # the model's own method: None -> forward steps
    llama.model.native_greedy_steps = lambda rows: None
    assert llama.generate(prompts, 10, temperature=0, stop_token=-1) == got
    if dtype == "float32":
        llama.model.native_decoder = None  # the torch layers
        assert llama.generate(prompts, 10, temperature=0, stop_token=-1) == got


def test_sampling_and_logprobs_do_not_take_lean_greedy_steps(kernel, make_checkpoint, build):
    llama = build(make_checkpoint(GQA_ARGS))
    calls = _counting_greedy_steps(llama.model)
    llama.generate([[5, 6, 7]], 4, temperature=0, stop_token=-1, logprobs=True)
    llama.generate([[5, 6, 7]], 4, temperature=0.8, stop_token=-1)
    assert calls == []


@pytest.mark.parametrize("part", ["norm", "embedding", "wq"])
def test_a_stream_paused_while_a_weight_is_swapped_ends_with_the_weights_it_began_with(
    kernel, make_checkpoint, build, part
):
    """``param.data = ...`` between two tokens of a stream frees the old storage unless
    something holds it: the lean steps hold it, so the stream reads no freed memory and
    ends as it would have; the next call decodes with the new weight."""
    llama = build(make_checkpoint(GQA_ARGS, std=1.0))
    model = llama.model
    prompt, greedy = [[5, 9, 17, 33]], SamplingParams(temperature=0)

    def tokens() -> list[int]:
        return [t for _, t in llama.generate_stream(prompt, 12, greedy, stop_tokens=())]

    want = tokens()
    module = {
        "norm": model.norm,
        "embedding": model.tok_embeddings,
        "wq": model.layers[0].attention.wq,
    }[part]
    stream = llama.generate_stream(prompt, 12, greedy, stop_tokens=())
    got = [next(stream)[1] for _ in range(3)]
    plan = module.__dict__.get("native_plan")  # a packed weight becomes a plain one
    shape = (plan.n, plan.k) if plan is not None else module.weight.shape
    module.weight.data = torch.randn(shape, generator=torch.Generator().manual_seed(8)) * 3
    got += [t for _, t in stream]
    assert got == want
    after = tokens()
    model.native_decoder = None  # the torch layers read the new weight as it is
    assert after == tokens()
    assert after != want


def test_lean_greedy_steps_refuse_bad_rows_positions_and_tokens(kernel, make_checkpoint, build):
    model = build(make_checkpoint(GQA_ARGS), max_seq_len=16).model
    steps = model.native_greedy_steps(2)
    assert steps is not None
    assert model.native_greedy_steps(native.MAX_ROWS + 1) is None
    with pytest.raises(ValueError, match="as many positions"):
        steps([5, 6], [0], 1)
    with pytest.raises(ValueError, match="1..8 tokens"):
        steps([5] * 9, [0] * 9, 1)
    with pytest.raises(ValueError, match="kv_len must be at least 1"):
        steps([5, 6], [0, 0], 0)
    with pytest.raises(PromptTooLongError, match="max_seq_len=16"):
        steps([5, 6], [3, 16], 16)
    with pytest.raises(IndexError, match="vocabulary"):
        steps([5, model.params.vocab_size], [0, 0], 1)
    picks, finite = steps([5, 6], [0, 0], 1)
    assert len(picks) == 2 and all(0 <= p < model.params.vocab_size for p in picks)
    assert finite == [True, True]


@pytest.mark.parametrize("part", ["norm", "embedding", "output", "wq"])
def test_a_replaced_weight_sends_the_step_to_the_torch_layers(kernel, make_checkpoint, build, part):
    model = build(make_checkpoint(GQA_ARGS)).model
    module = {
        "norm": model.norm,
        "embedding": model.tok_embeddings,
        "output": model.output,
        "wq": model.layers[0].attention.wq,
    }[part]
    plan = module.__dict__.get("native_plan")  # a linear weight's shape is its packed one
    shape = (plan.n, plan.k) if plan is not None else module.weight.shape
    new = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    module.weight = torch.nn.Parameter(new, requires_grad=False)
    vocab = model.params.vocab_size
    prompt, token = _tokens(vocab, 1, 4), _tokens(vocab, 1, 1, seed=1)
    assert model._native_decode(token, 4, None, None, 0) is None
    want = _step(model, prompt, token, native_step=False)
    torch.testing.assert_close(_step(model, prompt, token, native_step=True), want)
    model.use_native_kernel(kernel)  # plans again, reading the new weight
    assert model.native_decoder is not None
    got = _step(model, prompt, token, native_step=True)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_setup_cache_plans_the_step_again_for_the_new_cache(kernel, make_checkpoint, build):
    model = build(make_checkpoint(GQA_ARGS), max_batch_size=4).model
    model.setup_cache(max_batch_size=2, max_seq_len=32)
    decoder = model.native_decoder
    assert decoder is not None
    assert decoder.layers[0].cache_k is model.layers[0].attention.cache.k
    assert decoder.layers[0].cache_k.shape[:3] == (2, GQA_ARGS.kv_heads, 32)
    vocab = model.params.vocab_size
    prompt, token = _tokens(vocab, 2, 4), _tokens(vocab, 2, 1, seed=1)
    got = _step(model, prompt, token, native_step=True)
    want = _step(model, prompt, token, native_step=False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_position_outside_the_cache_is_a_clear_error(kernel, make_checkpoint, build):
    model = build(make_checkpoint(GQA_ARGS), max_seq_len=16).model
    token = torch.tensor([[5]])
    with torch.inference_mode(), pytest.raises(PromptTooLongError, match="max_seq_len=16"):
        model.forward_tokens(token, positions=torch.tensor([[16]]), kv_len=16)
    with torch.inference_mode(), pytest.raises(PromptTooLongError, match="max_seq_len=16"):
        model.forward_tokens(token, 16)


def test_a_token_outside_the_vocabulary_is_an_index_error(kernel, make_checkpoint, build):
    model = build(make_checkpoint(GQA_ARGS)).model
    with torch.inference_mode(), pytest.raises(IndexError, match="vocabulary"):
        model.forward_tokens(torch.tensor([[model.params.vocab_size]]), 0)


def test_compiled_and_model_parallel_free_paths_have_no_native_step(kernel, make_checkpoint, build):
    assert build(make_checkpoint(GQA_ARGS), compile=True).model.native_decoder is None
    model = build(make_checkpoint(GQA_ARGS)).model
    model.use_native_kernel(None)
    assert model.native_decoder is None


def test_portable_build_decodes_fp32_and_leaves_bf16_to_the_torch_layers(
    portable_kernel, kernel, make_checkpoint, build
):
    """CPUs without AVX2 get the portable code: build it here and check its step."""
    portable = portable_kernel
    ckpt = make_checkpoint(ODD_ARGS)
    model = build(ckpt, max_seq_len=256).model
    model.use_native_kernel(portable)
    assert model.native_decoder is not None
    vocab = model.params.vocab_size
    prompt, token = _tokens(vocab, 2, 40), _tokens(vocab, 2, 1, seed=1)
    got = _step(model, prompt, token, native_step=True)
    torch.testing.assert_close(got, _step(model, prompt, token, native_step=False),
                               atol=1e-4, rtol=1e-4)  # fmt: skip
    bf16 = build(ckpt, dtype="bfloat16").model
    bf16.use_native_kernel(portable)
    assert bf16.native_decoder is None


@pytest.mark.parametrize("part", ["norm", "embedding", "cache"])
def test_swapped_storage_is_not_read_through_a_stale_pointer(kernel, make_checkpoint, build, part):
    """``param.data = ...`` (as ``model.half()`` or ``.to()`` do) keeps the object, not the
    storage: the step must notice and run the torch layers."""
    model = build(make_checkpoint(GQA_ARGS)).model
    vocab = model.params.vocab_size
    prompt, token = _tokens(vocab, 1, 4), _tokens(vocab, 1, 1, seed=1)
    if part == "norm":
        model.norm.weight.data = torch.randn(model.norm.weight.shape)
    elif part == "embedding":
        model.tok_embeddings.weight.data = torch.randn(model.tok_embeddings.weight.shape)
    else:
        cache = model.layers[0].attention.cache
        cache.k.data = torch.zeros_like(cache.k)
    assert model._native_decode(token, 4, None, None, 0) is None
    want = _step(model, prompt, token, native_step=False)
    torch.testing.assert_close(_step(model, prompt, token, native_step=True), want)


def test_a_plain_weight_with_swapped_storage_is_not_read_by_its_plan(kernel):
    weight = torch.randn(16, 32)
    plan = kernel.plan(weight)
    x = torch.randn(1, 32)
    assert plan.accepts(x, weight)
    weight.data = torch.randn(16, 32)
    assert not plan.accepts(x, weight)
