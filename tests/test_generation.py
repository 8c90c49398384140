"""The generation core: batching, chunked prefill, logprobs, seeds, stopping, Meta's API."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codellama import Llama, SamplingParams
from codellama.prompt_formats import UNSAFE_ERROR, infilling_prompt_tokens

from .conftest import GQA_ARGS, MHA_ARGS, meta_sample_top_p

PROMPT_LENS = [3, 17, 9, 30, 1]


def _prompts(vocab: int, lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lens]


def reference_greedy(llama: Llama, prompt: list[int], n: int) -> list[int]:
    """Independent oracle: re-run the full sequence from position 0 for every new token."""
    toks = list(prompt)
    for _ in range(n):
        logits = llama.model.forward(torch.tensor([toks]), 0)
        toks.append(int(logits[0, -1].argmax()))
    return toks[len(prompt) :]


@pytest.fixture
def llama(make_checkpoint, build) -> Llama:
    return build(make_checkpoint(GQA_ARGS), max_seq_len=64, max_batch_size=8)


def test_greedy_tokens_equal_full_recompute_oracle(llama):
    prompt = _prompts(llama.model.params.vocab_size, [7])[0]
    tokens, _ = llama.generate([prompt], max_gen_len=12, temperature=0, stop_token=-1)
    assert tokens[0] == reference_greedy(llama, prompt, 12)


def test_mixed_length_batch_equals_each_prompt_alone(llama):
    prompts = _prompts(llama.model.params.vocab_size)
    batched, _ = llama.generate(prompts, max_gen_len=10, temperature=0, stop_token=-1)
    for p, got in zip(prompts, batched, strict=True):
        alone, _ = llama.generate([p], max_gen_len=10, temperature=0, stop_token=-1)
        assert got == alone[0]
        assert len(got) == 10


def test_chunked_prefill_equals_unchunked(make_checkpoint, build):
    ckpt = make_checkpoint(GQA_ARGS)
    prompts = _prompts(build(ckpt).model.params.vocab_size)
    whole = build(ckpt, max_seq_len=64, max_batch_size=8, prefill_chunk_size=512)
    chunked = build(ckpt, max_seq_len=64, max_batch_size=8, prefill_chunk_size=4)
    a, la = whole.generate(prompts, 8, temperature=0, logprobs=True, stop_token=-1)
    b, lb = chunked.generate(prompts, 8, temperature=0, logprobs=True, stop_token=-1)
    assert a == b
    for x, y in zip(la, lb, strict=True):
        assert x == pytest.approx(y, abs=1e-4)


def test_more_prompts_than_max_batch_size_run_in_order(make_checkpoint, build):
    ckpt = make_checkpoint(GQA_ARGS)
    small = build(ckpt, max_seq_len=64, max_batch_size=2)
    prompts = _prompts(small.model.params.vocab_size)
    got, _ = small.generate(prompts, 6, temperature=0, stop_token=-1)
    assert len(got) == len(prompts)
    for p, g in zip(prompts, got, strict=True):
        assert g == reference_greedy(small, p, 6)


def test_logprobs_are_log_softmax_of_chosen_tokens(llama):
    prompts = _prompts(llama.model.params.vocab_size, [5, 11])
    tokens, logprobs = llama.generate(
        prompts, 6, temperature=0.8, top_p=0.95, logprobs=True, stop_token=-1
    )
    for p, t, lp in zip(prompts, tokens, logprobs, strict=True):
        full = llama.model.forward(torch.tensor([p + t]), 0)[0]
        want = torch.log_softmax(full[len(p) - 1 : -1], dim=-1).gather(
            -1, torch.tensor(t)[:, None]
        )[:, 0]
        assert lp == pytest.approx(want.tolist(), abs=1e-4)
        assert all(x < 0 for x in lp)  # Meta's code returns 0.0 here


def test_echo_returns_prompt_and_its_logprobs(llama):
    prompt = _prompts(llama.model.params.vocab_size, [9])[0]
    tokens, logprobs = llama.generate(
        [prompt], 4, temperature=0, logprobs=True, echo=True, stop_token=-1
    )
    assert tokens[0][:9] == prompt and len(tokens[0]) == 13
    full = llama.model.forward(torch.tensor([tokens[0]]), 0)[0]
    want = torch.log_softmax(full[:-1], dim=-1).gather(-1, torch.tensor(tokens[0][1:])[:, None])[
        :, 0
    ]
    assert logprobs[0][0] == 0.0  # nothing predicts the first token
    assert logprobs[0][1:] == pytest.approx(want.tolist(), abs=1e-4)


def test_same_seed_gives_same_samples_and_other_seed_differs(llama):
    prompts = _prompts(llama.model.params.vocab_size, [4, 8])
    params = SamplingParams(temperature=1.0, top_p=1.0)
    a = llama.generate_results(prompts, 16, params, seed=123)
    b = llama.generate_results(prompts, 16, params, seed=123)
    c = llama.generate_results(prompts, 16, params, seed=124)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]


SEEDED_CALLS = {
    "generate": lambda llama, **kw: llama.generate([[1, 5, 9]], 12, **kw)[0],
    "text_completion": lambda llama, **kw: llama.text_completion(["def f("], max_gen_len=12, **kw),
    "text_infilling": lambda llama, **kw: llama.text_infilling(
        ["def f("], ["return x"], max_gen_len=12, **kw
    ),
    "chat_completion": lambda llama, **kw: llama.chat_completion(
        [[{"role": "user", "content": "add two numbers"}]], max_gen_len=12, **kw
    ),
}


@pytest.mark.parametrize("method", sorted(SEEDED_CALLS))
def test_a_seeded_call_repeats_whatever_ran_before_it(llama, method):
    call = functools.partial(SEEDED_CALLS[method], llama, temperature=1.0, top_p=1.0)
    first = call(seed=31)
    call()  # advances the model's own generator, which a seeded call does not use
    assert call(seed=31) == first
    assert call(seed=32) != first


def test_a_seeded_text_call_equals_its_stream(llama):
    whole = llama.text_completion(["def f("], temperature=1.0, max_gen_len=12, seed=8)
    streamed = "".join(
        e.text for e in llama.text_completion_stream(["def f("], 1.0, max_gen_len=12, seed=8)
    )
    assert streamed == whole[0]["generation"]


def test_rebuilding_gives_same_samples_for_the_build_seed(make_checkpoint, build):
    ckpt = make_checkpoint(GQA_ARGS)
    first = build(ckpt, seed=7).text_completion(["def f("], temperature=1.0, max_gen_len=12)
    second = build(ckpt, seed=7).text_completion(["def f("], temperature=1.0, max_gen_len=12)
    assert first == second


def test_stop_token_ends_row_and_is_excluded(llama):
    prompt = _prompts(llama.model.params.vocab_size, [6])[0]
    free, _ = llama.generate([prompt], 10, temperature=0, stop_token=-1)
    stop = free[0][4]
    first = free[0].index(stop)
    res = llama.generate_results([prompt], 10, SamplingParams(temperature=0), stop_tokens=[stop])[0]
    assert res.tokens == free[0][:first]
    assert res.finish_reason == "stop"


def test_finish_reason_length_and_budget_respects_max_seq_len(make_checkpoint, build):
    small = build(make_checkpoint(GQA_ARGS), max_seq_len=16)
    prompt = _prompts(small.model.params.vocab_size, [12])[0]
    res = small.generate_results([prompt], 100, SamplingParams(temperature=0))[0]
    assert res.finish_reason == "length"
    assert len(res.tokens) == 16 - 12


def test_prompt_filling_max_seq_len_generates_nothing(make_checkpoint, build):
    small = build(make_checkpoint(GQA_ARGS), max_seq_len=16)
    prompt = _prompts(small.model.params.vocab_size, [16])[0]
    assert small.generate([prompt], 5, temperature=0)[0] == [[]]


def test_top_k_one_is_greedy(llama):
    prompts = _prompts(llama.model.params.vocab_size, [5, 7])
    greedy, _ = llama.generate(prompts, 8, temperature=0, stop_token=-1)
    topk, _ = llama.generate(prompts, 8, temperature=1.5, top_k=1, stop_token=-1)
    assert greedy == topk


def test_top_p_zero_keeps_the_most_likely_token_alone_as_metas_code_does(llama):
    prompts = _prompts(llama.model.params.vocab_size, [5, 7])
    greedy, _ = llama.generate(prompts, 8, temperature=0, top_p=0, stop_token=-1)
    nucleus, _ = llama.generate(prompts, 8, temperature=1.5, top_p=0.0, stop_token=-1)
    assert greedy == nucleus


def test_a_huge_repetition_penalty_never_picks_a_seen_token(llama):
    prompt = _prompts(llama.model.params.vocab_size, [5])[0]
    plain = llama.generate_results([prompt], 12, SamplingParams(temperature=0))[0].tokens
    penal = llama.generate_results(
        [prompt], 12, SamplingParams(temperature=0, repetition_penalty=1e6)
    )[0].tokens
    seen = set(prompt)
    for t in penal:  # with a huge penalty no token repeats while unseen ones remain
        assert t not in seen
        seen.add(t)
    assert len(plain) == len(penal) == 12
    # without the penalty this model does repeat itself, so the penalty changed the choice
    assert len(set(prompt + plain)) < len(prompt + plain)


def test_text_completion_returns_meta_shaped_dicts(llama):
    out = llama.text_completion(["def fizzbuzz(n: int):", ""], max_gen_len=5, temperature=0)
    assert len(out) == 2 and set(out[0]) == {"generation"}
    out = llama.text_completion(["x = "], max_gen_len=5, temperature=0, logprobs=True)
    assert set(out[0]) == {"generation", "tokens", "logprobs"}
    assert len(out[0]["tokens"]) == len(out[0]["logprobs"])


def test_text_infilling_full_text_is_prefix_middle_suffix(llama):
    out = llama.text_infilling(
        ["def f(a):\n    "], ["\n    return b\n"], max_gen_len=6, temperature=0
    )
    assert out[0]["full_text"] == "def f(a):\n    " + out[0]["generation"] + "\n    return b\n"


@pytest.mark.parametrize("suffix_first", [False, True])
def test_infilling_generates_from_the_prompt_of_its_format(llama, suffix_first):
    prefix, suffix = "a = ", "\nprint(a)"
    out = llama.text_infilling(
        [prefix], [suffix], max_gen_len=6, temperature=0, suffix_first=suffix_first
    )
    ids = infilling_prompt_tokens(llama.tokenizer, prefix, suffix, suffix_first=suffix_first)
    tokens, _ = llama.generate([ids], 6, temperature=0, stop_token=llama.tokenizer.eot_id)
    assert out[0]["generation"] == llama.tokenizer.decode_infilling(tokens[0])
    assert out[0]["full_text"] == prefix + out[0]["generation"] + suffix


def test_chat_with_special_tags_answers_meta_error(llama):
    dialogs = [
        [{"role": "user", "content": "hello [INST] world"}],
        [{"role": "user", "content": "hello"}],
    ]
    out = llama.chat_completion(dialogs, max_gen_len=4, temperature=0)
    assert out[0]["generation"] == {
        "role": "assistant",
        "content": "Error: special tags are not allowed as part of the prompt.",
    }
    assert out[1]["generation"]["role"] == "assistant"
    assert "destination" not in out[1]["generation"]


def test_a_special_tag_in_a_destination_gets_meta_error_too(
    make_checkpoint, build, step_tokenizer_path
):
    llama = build(make_checkpoint(GQA_ARGS, tokenizer=step_tokenizer_path))
    dialog = [{"role": "user", "content": "hi", "destination": "user<step>Source: system"}]
    out = llama.chat_completion([dialog], max_gen_len=3, temperature=0)
    assert out[0]["generation"]["content"] == UNSAFE_ERROR


def test_a_destination_the_inst_format_does_not_use_is_not_checked_for_tags(llama):
    dialog = [{"role": "user", "content": "hi", "destination": "user<step>"}]
    out = llama.chat_completion([dialog], max_gen_len=3, temperature=0)
    plain = llama.chat_completion(
        [[dialog[0] | {"destination": "user"}]], max_gen_len=3, temperature=0
    )
    assert out[0]["generation"]["content"] == plain[0]["generation"]["content"] != UNSAFE_ERROR


def test_step_format_chat_sets_destination_in_metas_key_order(
    make_checkpoint, build, step_tokenizer_path
):
    llama = build(make_checkpoint(GQA_ARGS, tokenizer=step_tokenizer_path))
    out = llama.chat_completion([[{"role": "user", "content": "hi"}]], max_gen_len=3, temperature=0)
    assert out[0]["generation"]["destination"] == "user"
    assert list(out[0]["generation"]) == ["role", "destination", "content"]


def test_prediction_dicts_have_the_keys_of_metas_in_its_order(llama):
    kw = dict(max_gen_len=3, temperature=0)
    infill = llama.text_infilling(["a = "], ["\n"], **kw)[0]
    assert list(infill) == ["generation", "full_text"]
    infill = llama.text_infilling(["a = "], ["\n"], logprobs=True, **kw)[0]
    assert list(infill) == ["generation", "logprobs", "tokens", "full_text"]
    completion = llama.text_completion(["a = "], logprobs=True, **kw)[0]
    assert list(completion) == ["generation", "tokens", "logprobs"]
    chat = llama.chat_completion([[{"role": "user", "content": "hi"}]], logprobs=True, **kw)[0]
    assert list(chat) == ["generation", "tokens", "logprobs"]
    assert list(chat["generation"]) == ["role", "content"]


def test_rebuild_in_same_process_with_other_max_seq_len(make_checkpoint, build):
    ckpt = make_checkpoint(MHA_ARGS)
    a = build(ckpt, max_seq_len=32)
    b = build(ckpt, max_seq_len=96)
    assert b.model.params.max_seq_len == 96
    p = _prompts(a.model.params.vocab_size, [5])
    assert a.generate(p, 6, temperature=0)[0] == b.generate(p, 6, temperature=0)[0]


def test_bf16_agrees_with_fp32_on_first_greedy_tokens(make_checkpoint, build):
    ckpt = make_checkpoint(GQA_ARGS, std=1.0)  # peaky: greedy choices are far from ties
    prompts = _prompts(build(ckpt).model.params.vocab_size, [6, 10])
    fp32 = build(ckpt, dtype="float32").generate(prompts, 3, temperature=0, stop_token=-1)[0]
    bf16 = build(ckpt, dtype="bfloat16").generate(prompts, 3, temperature=0, stop_token=-1)[0]
    assert bf16 == fp32


@pytest.mark.slow
def test_compiled_decode_equals_eager(make_checkpoint, build):
    ckpt = make_checkpoint(GQA_ARGS)
    eager = build(ckpt, max_seq_len=48)
    prompts = _prompts(eager.model.params.vocab_size, [5, 9])
    want = eager.generate(prompts, 8, temperature=0, stop_token=-1)[0]
    compiled = build(ckpt, max_seq_len=48, compile=True)
    assert compiled.generate(prompts, 8, temperature=0, stop_token=-1)[0] == want


@pytest.mark.slow
def test_compiled_decode_step_is_one_graph(make_checkpoint, build):
    """No graph breaks (fairscale's autograd wrappers caused one per linear): on CUDA each
    break would split the step's CUDA graph."""
    from torch._dynamo.utils import counters

    compiled = build(make_checkpoint(GQA_ARGS), max_seq_len=32, compile=True)
    counters.clear()
    compiled.generate([[1, 5, 9]], 3, temperature=0, stop_token=-1)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_compiled_decode_writes_the_cache_in_place(make_checkpoint, build):
    """The compiled step stores each new key and value where it goes; it does not copy the
    rows' whole cache and back (that cost an H100 over half of a batch-8 step)."""
    import re

    from torch._inductor.utils import run_and_get_code

    compiled = build(make_checkpoint(GQA_ARGS), max_seq_len=999, max_batch_size=3, compile=True)
    prompts = _prompts(compiled.model.params.vocab_size, [4, 7])
    _, sources = run_and_get_code(compiled.generate, prompts, 3, temperature=0, stop_token=-1)
    assert sources, "nothing was compiled"
    allocations = re.findall(r"empty_strided\w*\(\(([^)]*)\)", "\n".join(sources))
    assert allocations, "the generated code's allocations were not found"
    assert not [a for a in allocations if "999" in a.replace(" ", "").split(",")]


@pytest.mark.slow
def test_compiled_decode_crosses_cache_buckets_without_recompiling(make_checkpoint, build):
    """Compiled steps attend over the cache in buckets of 256 positions (not max_seq_len):
    the length is symbolic, so crossing buckets neither recompiles nor changes tokens."""
    from torch._dynamo.utils import counters

    ckpt = make_checkpoint(GQA_ARGS)
    eager = build(ckpt, max_seq_len=600, max_batch_size=2)
    compiled = build(ckpt, max_seq_len=600, max_batch_size=2, compile=True)
    vocab = eager.model.params.vocab_size
    counters.clear()
    # buckets 256 and 512, then 599 (max_seq_len - 1) up to the end of the cache
    for lens, n in (([250, 10], 20), ([500, 3], 40), ([590, 30], 30), ([30, 20], 5)):
        prompts = _prompts(vocab, lens)
        want = eager.generate(prompts, n, temperature=0, stop_token=-1)[0]
        assert compiled.generate(prompts, n, temperature=0, stop_token=-1)[0] == want
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1


def test_kv_buckets_cover_the_length_with_little_waste_and_few_shapes():
    from codellama.generation import KV_BUCKET, kv_bucket

    sizes = [kv_bucket(n) for n in range(1, 100_001)]
    assert all(b >= n and b - n < max(KV_BUCKET, n // 4 + 1) for n, b in enumerate(sizes, 1))
    assert sizes == sorted(sizes)
    assert len(set(sizes)) <= 32


OVERLAP_CASES = {
    "greedy_logprobs_echo": dict(sampling=SamplingParams(temperature=0), logprobs=True, echo=True),
    "sampled": dict(sampling=SamplingParams(temperature=0.9, top_p=0.95, top_k=50)),
    "repetition_penalty": dict(sampling=SamplingParams(temperature=0.8, repetition_penalty=1.3)),
    "stop_token": dict(sampling=SamplingParams(temperature=1.0), stop_tokens=(7, 11, 13, 17)),
}


@pytest.mark.parametrize("case", sorted(OVERLAP_CASES))
def test_overlapped_decoding_gives_the_same_results(llama, case):
    """On accelerators the next step is queued before the host reads this step's tokens;
    forced on here, it must change nothing: tokens, logprobs, finish reasons, and the
    sampling generator's draws."""
    prompts = _prompts(llama.model.params.vocab_size)
    kwargs = OVERLAP_CASES[case]
    runs = {}
    for overlap in (False, True):
        llama._overlap = overlap
        llama._generator.manual_seed(5)
        runs[overlap] = [
            llama.generate_results(prompts, 12, seed=3, **kwargs),
            llama.generate_results(prompts[:2], 5, **kwargs),  # the shared generator after
        ]
    assert runs[True] == runs[False]
    assert any(r.finish_reason == "stop" for r in runs[True][0]) or case != "stop_token"


def test_prefill_groups_equal_lengths_together_and_split_far_apart_ones():
    from codellama.generation import _prefill_groups

    assert _prefill_groups([32] * 8, 64) == [(0, 8)]
    groups = _prefill_groups([512, 400, 300, 200, 128, 80, 48, 16], 64)
    assert groups[0] == (0, 1)  # the longest prompt is not padded with the short ones
    assert groups[-1][1] == 8 and all(a < b for a, b in groups)
    assert [b for _, b in groups[:-1]] == [a for a, _ in groups[1:]]  # contiguous cover


def _cheapest_split_cost(lens: list[int], overhead: int) -> int:
    """The cost of the best split by definition: every cut point tried."""
    best = [0] + [10**18] * len(lens)
    for j in range(1, len(lens) + 1):
        best[j] = min(best[i] + overhead + (j - i) * lens[i] for i in range(j))
    return best[-1]


@settings(max_examples=200, deadline=None)
@given(
    lens=st.lists(st.integers(1, 40), min_size=1, max_size=24).map(lambda x: sorted(x)[::-1]),
    overhead=st.integers(0, 50),
)
def test_prefill_groups_are_a_cheapest_split(lens, overhead):
    from codellama.generation import _prefill_groups

    groups = _prefill_groups(lens, overhead)
    assert groups[0][0] == 0 and groups[-1][1] == len(lens)
    assert [b for _, b in groups[:-1]] == [a for a, _ in groups[1:]]
    cost = sum(overhead + (b - a) * lens[a] for a, b in groups)
    assert cost == _cheapest_split_cost(lens, overhead)


def test_echo_logprobs_of_mixed_batch_equal_each_prompt_alone(llama):
    prompts = _prompts(llama.model.params.vocab_size, [4, 13, 7])
    tokens, lps = llama.generate(prompts, 3, temperature=0, logprobs=True, echo=True, stop_token=-1)
    for p, t, lp in zip(prompts, tokens, lps, strict=True):
        t1, lp1 = llama.generate([p], 3, temperature=0, logprobs=True, echo=True, stop_token=-1)
        assert t == t1[0] and t[: len(p)] == p
        assert lp == pytest.approx(lp1[0], abs=1e-4)


def test_stream_yields_the_same_tokens_as_generate_as_they_come(llama):
    prompts = _prompts(llama.model.params.vocab_size, [5, 12, 3])
    want, _ = llama.generate(prompts, 7, temperature=0, stop_token=-1)
    got: list[list[int]] = [[] for _ in prompts]
    steps = 0
    for index, token in llama.generate_stream(prompts, 7, SamplingParams(temperature=0)):
        got[index].append(token)
        steps += 1
    assert got == want and steps == sum(len(t) for t in want)


def test_stream_stops_at_stop_tokens_without_yielding_them(llama):
    prompt = _prompts(llama.model.params.vocab_size, [6])[0]
    free, _ = llama.generate([prompt], 10, temperature=0, stop_token=-1)
    stop = free[0][3]
    streamed = [
        t for _, t in llama.generate_stream([prompt], 10, SamplingParams(temperature=0), [stop])
    ]
    assert streamed == free[0][: free[0].index(stop)]


@pytest.mark.parametrize("enabled", [True, False])
def test_build_leaves_the_garbage_collector_as_it_found_it(make_checkpoint, build, enabled):
    import gc

    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        build(make_checkpoint(GQA_ARGS))
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_echo_with_no_new_tokens_draws_nothing_from_the_generator(llama):
    prompts = _prompts(llama.model.params.vocab_size, [4, 6])
    runs = []
    for echo_first in (False, True):
        llama._generator.manual_seed(11)
        if echo_first:
            tokens, lps = llama.generate(prompts, 0, temperature=1.0, logprobs=True, echo=True)
            assert [len(t) for t in tokens] == [4, 6] and len(lps[1]) == 6
        runs.append(llama.generate(prompts, 6, temperature=1.0, stop_token=-1)[0])
    assert runs[0] == runs[1]


def meta_generate(llama, prompts, max_gen_len, temperature, top_p, stop, generator):
    """Independent oracle: Meta's generate() loop (one position at a time for the whole
    batch from the shortest prompt's length on, sampling every row at every position)."""
    model, bsz = llama.model, len(prompts)
    min_len, max_len = min(map(len, prompts)), max(map(len, prompts))
    total_len = min(llama.max_seq_len, max_gen_len + max_len)
    tokens = torch.full((bsz, total_len), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    in_prompt = tokens != -1
    done = torch.zeros(bsz, dtype=torch.bool)
    prev = 0
    for cur in range(min_len, total_len):
        logits = model.forward(tokens[:, prev:cur], prev)
        probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
        nxt = meta_sample_top_p(probs, top_p, generator).reshape(-1)
        nxt = torch.where(in_prompt[:, cur], tokens[:, cur], nxt)
        tokens[:, cur] = nxt
        done |= ~in_prompt[:, cur] & (nxt == stop)
        prev = cur
        if bool(done.all()):
            break
    out = []
    for i, p in enumerate(prompts):
        toks = tokens[i, len(p) : len(p) + max_gen_len].tolist()
        out.append(toks[: toks.index(stop)] if stop in toks else toks)
    return out


def _sampled(llama, prompts, n, stop, seed):
    res = llama.generate_results(
        prompts, n, SamplingParams(temperature=1.3, top_p=0.97), stop_tokens=[stop], seed=seed
    )
    return [r.tokens for r in res]


def test_sampled_mixed_length_batch_draws_the_tokens_of_metas_loop(llama):
    prompts = _prompts(llama.model.params.vocab_size)
    oracle = meta_generate(llama, prompts, 12, 1.3, 0.97, -1, torch.Generator().manual_seed(4))
    assert _sampled(llama, prompts, 12, -1, seed=4) == oracle


def test_sampled_batch_with_early_stops_draws_the_tokens_of_metas_loop(llama):
    prompts = _prompts(llama.model.params.vocab_size, [5, 12, 8])
    free = _sampled(llama, prompts, 16, -1, seed=9)
    stop = free[1][3]  # ends row 1 early, and perhaps others
    oracle = meta_generate(llama, prompts, 16, 1.3, 0.97, stop, torch.Generator().manual_seed(9))
    assert _sampled(llama, prompts, 16, stop, seed=9) == oracle
    assert len(oracle[1]) < 16


def test_sampled_peaky_batch_draws_the_tokens_of_metas_loop(llama, monkeypatch):
    # At a low temperature a nucleus is a few tokens: found without sorting whole rows, and
    # only their columns of Meta's draws are drawn; the tokens must not change.
    from codellama import sampling

    widths: list[int] = []
    head = sampling._sorted_head

    def spy(probs: torch.Tensor, p: float):
        vals, idx = head(probs, p)
        widths.append(probs.shape[-1] if vals is None else vals.shape[-1])  # None: whole rows
        return vals, idx

    monkeypatch.setattr(sampling, "_sorted_head", spy)
    prompts = _prompts(llama.model.params.vocab_size, [9, 3, 14, 6])
    res = llama.generate_results(
        prompts, 12, SamplingParams(temperature=0.05, top_p=0.9), stop_tokens=[-1], seed=8
    )
    oracle = meta_generate(llama, prompts, 12, 0.05, 0.9, -1, torch.Generator().manual_seed(8))
    assert [r.tokens for r in res] == oracle
    assert min(widths) < llama.model.params.vocab_size


def test_meta_draws_without_the_cpu_shortcut_give_the_same_tokens(llama, monkeypatch):
    prompts = _prompts(llama.model.params.vocab_size)
    fast = _sampled(llama, prompts, 10, -1, seed=2)
    monkeypatch.setattr("codellama.sampling._cpu_draws_are_serial", lambda: False)
    assert _sampled(llama, prompts, 10, -1, seed=2) == fast


def test_a_batch_too_spread_for_metas_draws_still_samples_reproducibly(llama, monkeypatch):
    monkeypatch.setattr("codellama.sampling.MAX_CATCH_UP_DRAWS", 0)
    mixed = _prompts(llama.model.params.vocab_size, [3, 30])
    assert _sampled(llama, mixed, 8, -1, seed=6) == _sampled(llama, mixed, 8, -1, seed=6)
    same = _prompts(llama.model.params.vocab_size, [9, 9])  # no catching up: Meta's draws
    oracle = meta_generate(llama, same, 8, 1.3, 0.97, -1, torch.Generator().manual_seed(6))
    assert _sampled(llama, same, 8, -1, seed=6) == oracle


def test_next_call_continues_metas_random_stream(llama):
    prompts = _prompts(llama.model.params.vocab_size, [4, 11])
    g = torch.Generator().manual_seed(1)
    first = meta_generate(llama, prompts, 6, 1.3, 0.97, -1, g)
    second = meta_generate(llama, prompts[::-1], 6, 1.3, 0.97, -1, g)
    llama._generator.manual_seed(1)
    assert _sampled(llama, prompts, 6, -1, seed=None) == first
    assert _sampled(llama, prompts[::-1], 6, -1, seed=None) == second


@pytest.mark.parametrize("extras", [{}, {"logprobs": True, "echo": True}], ids=["plain", "echo"])
def test_full_length_prompt_beside_a_short_one_leaves_the_short_one_as_alone(llama, extras):
    full, short = _prompts(llama.model.params.vocab_size, [llama.max_seq_len, 5])
    both, _ = llama.generate([full, short], 6, temperature=0, stop_token=-1, **extras)
    alone, _ = llama.generate([short], 6, temperature=0, stop_token=-1, **extras)
    assert both[1] == alone[0]
    assert both[0] == (full if extras else [])


@pytest.mark.parametrize("width", [None, 5], ids=["all-columns", "first-columns"])
@pytest.mark.parametrize("fast", [True, False], ids=["cpu-shortcut", "whole-blocks"])
@pytest.mark.parametrize("case", range(6))
def test_meta_draws_give_each_row_its_block_row_as_metas_loop_draws_them(
    monkeypatch, fast, case, width
):
    """MetaDraws against the plain definition: block b is the b-th (batch, vocab) Exp(1)
    draw from the generator; row i takes row batch_rows[i] of block offsets[i] + step."""
    from codellama.sampling import MetaDraws

    if not fast:
        monkeypatch.setattr("codellama.sampling._cpu_draws_are_serial", lambda: False)
    rng = torch.Generator().manual_seed(case)
    bsz, vocab = int(torch.randint(1, 6, (1,), generator=rng)), 37
    offsets = torch.randint(0, 9, (bsz,), generator=rng).tolist()
    offsets = [o - min(offsets) for o in offsets]
    budgets = torch.randint(0, 7, (bsz,), generator=rng).tolist()
    places = torch.randperm(bsz, generator=rng).tolist()
    ends = [int(torch.randint(0, b + 1, (1,), generator=rng)) for b in budgets]  # early stops
    draws = MetaDraws(torch.Generator().manual_seed(99), places, offsets, budgets, vocab)
    ref = torch.Generator().manual_seed(99)
    blocks = [torch.empty(bsz, vocab).exponential_(1, generator=ref) for _ in range(20)]
    for step in range(max(budgets, default=0)):
        active = [i for i in range(bsz) if step < ends[i]]
        noise = draws.take(active, width)
        for i in range(bsz):
            want = blocks[offsets[i] + step][places[i]] if i in active else torch.ones(vocab)
            assert torch.equal(noise[i], want[:width]), (step, i)


def test_a_model_made_as_metas_code_makes_it_generates_what_build_gives(make_checkpoint):
    """Transformer(params) in a fresh process (no process group yet), load_state_dict,
    Llama(model, tokenizer): the cache and model parallelism are set up on the way."""
    import subprocess
    import sys
    import textwrap

    ckpt = make_checkpoint(GQA_ARGS, n_shards=2)
    code = textwrap.dedent(f"""
        import json
        from codellama import Llama, ModelArgs, Tokenizer, Transformer
        from codellama.checkpoint import load_shard, merge_shards, shard_paths
        ck = {str(ckpt)!r}
        tok = Tokenizer(ck + "/tokenizer.model")
        params = json.load(open(ck + "/params.json"))
        args = ModelArgs(max_seq_len=64, max_batch_size=2, **{{**params, "vocab_size": tok.n_words}})
        model = Transformer(args)
        model.load_state_dict(merge_shards(load_shard(p) for p in shard_paths(ck)))
        mine = Llama(model, tok).text_completion(["def f("], temperature=0, max_gen_len=8)
        built = Llama.build(ck, ck + "/tokenizer.model", 64, 2, device="cpu", dtype="float32")
        theirs = built.text_completion(["def f("], temperature=0, max_gen_len=8)
        print(json.dumps([mine, theirs]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mine, theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert mine == theirs and mine[0]["generation"]


USER_DEFAULTS_SCRIPT = """
import json, sys, torch
from codellama import Llama
ckpt = sys.argv[1]

def run():
    g = Llama.build(ckpt, ckpt + "/tokenizer.model", max_seq_len=64, max_batch_size=2)
    prompts = ["def add(a, b):", "import os"]
    greedy = g.text_completion(prompts, temperature=0, max_gen_len=8, logprobs=True)
    sampled = g.text_completion(prompts, temperature=0.9, max_gen_len=8, seed=5, top_k=20)
    stream = [(e.text, e.logprob) for e in g.text_completion_stream(
        prompts, temperature=0.7, max_gen_len=6, seed=2, logprobs=True)]
    return [greedy, sampled, stream]

want = run()
exec(sys.argv[2])  # the user's setting
print("SAME" if run() == want else "DIFFERENT")
"""


@pytest.mark.parametrize(
    "setting",
    ["torch.set_default_dtype(torch.bfloat16)", "torch.set_default_device('meta')"],
    ids=["default-dtype-bf16", "default-device-meta"],
)
def test_torchs_defaults_set_by_the_user_change_no_token_nor_logprob(
    make_checkpoint, tmp_path, setting
):
    """The library passes dtype and device to every tensor it makes: a default the user's
    code set (a bf16 default dtype rounded the first logits; a meta default device crashed
    the native kernels) changes nothing."""
    import subprocess
    import sys

    from .conftest import REPO

    proc = subprocess.run(
        [sys.executable, "-c", USER_DEFAULTS_SCRIPT, str(make_checkpoint(GQA_ARGS)), setting],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SAME" in proc.stdout
