"""Streaming: text pieces as tokens come, adding up to the non-streamed results; one
generation at a time per model."""

from __future__ import annotations

import threading

import pytest
import torch

from codellama import Llama, PromptError, SamplingParams, StreamInterruptedError
from codellama.model import cache_guard
from codellama.streaming import IncrementalDecoder, TextAssembler

from .conftest import GQA_ARGS

PROMPTS = ["def fib(n):", "import os\n", "# sum two numbers\ndef add(a, b):\n    return"]


@pytest.fixture
def llama(make_checkpoint, build) -> Llama:
    return build(make_checkpoint(GQA_ARGS), max_seq_len=96, max_batch_size=4)


def _collect(events):
    texts: dict[int, str] = {}
    last = {}
    for e in events:
        texts[e.index] = texts.get(e.index, "") + e.text
        assert e.index not in last or last[e.index].finish_reason is None  # nothing after end
        last[e.index] = e
    return texts, last


def test_completion_stream_adds_up_to_text_completion(llama):
    want = llama.text_completion(PROMPTS, temperature=0, max_gen_len=20)
    texts, last = _collect(llama.text_completion_stream(PROMPTS, temperature=0, max_gen_len=20))
    assert [texts[i] for i in range(3)] == [w["generation"] for w in want]
    assert all(last[i].finish_reason in ("stop", "length") for i in range(3))


def test_sampled_stream_with_a_seed_equals_generate_results_with_it(llama):
    stream = llama.text_completion_stream(PROMPTS, temperature=1.0, max_gen_len=16, seed=5)
    texts, _ = _collect(stream)
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    results = llama.generate_results(
        prompts, 16, SamplingParams(temperature=1.0), stop_tokens=[llama.tokenizer.eos_id], seed=5
    )
    assert [texts[i] for i in range(3)] == [llama.tokenizer.decode(r.tokens) for r in results]


def test_stream_never_sends_a_stop_string_and_names_it_at_the_end(llama):
    free = llama.text_completion(PROMPTS[:1], temperature=0, max_gen_len=24)[0]["generation"]
    stop = free[5:8]  # ends the row inside its text, perhaps across tokens
    want = llama.text_completion(PROMPTS[:1], temperature=0, max_gen_len=24, stop=stop)
    events = list(
        llama.text_completion_stream(PROMPTS[:1], temperature=0, max_gen_len=24, stop=stop)
    )
    sent = ""
    for e in events:
        sent += e.text
        assert stop not in sent
    assert sent == want[0]["generation"] == free[: free.index(stop)]
    assert (events[-1].finish_reason, events[-1].stop_string) == ("stop", stop)


def test_length_limited_rows_end_with_finish_reason_length(llama):
    events = list(llama.text_completion_stream(PROMPTS[:2], temperature=0, max_gen_len=3))
    ends = [e for e in events if e.finish_reason is not None]
    assert sorted(e.index for e in ends) == [0, 1]
    for e in ends:
        tokens = [x.token for x in events if x.index == e.index and x.token is not None]
        assert e.finish_reason == "length" and len(tokens) == 3


def test_infilling_stream_adds_up_to_text_infilling(llama):
    prefixes, suffixes = ["def add(a, b):\n    ", "x = "], ["\n    return c\n", "\nprint(x)"]
    want = llama.text_infilling(prefixes, suffixes, temperature=0, max_gen_len=16)
    texts, _ = _collect(
        llama.text_infilling_stream(prefixes, suffixes, temperature=0, max_gen_len=16)
    )
    assert [texts[0], texts[1]] == [w["generation"] for w in want]


def test_chat_stream_adds_up_to_chat_completion_and_refuses_special_tags(llama):
    dialogs = [
        [{"role": "user", "content": "Reverse a string in Bash."}],
        [{"role": "user", "content": "Say [INST] twice"}],
    ]
    want = llama.chat_completion(dialogs, temperature=0, max_gen_len=16)
    texts, _ = _collect(llama.chat_completion_stream(dialogs, temperature=0, max_gen_len=16))
    assert [texts[0], texts[1]] == [w["generation"]["content"] for w in want]


def _logprobs_by_row(events) -> dict[int, list[float]]:
    got: dict[int, list[float]] = {}
    for e in events:
        assert (e.logprob is None) == (e.token is None)  # a logprob for every token sent
        if e.token is not None:
            got.setdefault(e.index, []).append(e.logprob)
    return got


def test_stream_logprobs_are_those_of_the_non_streamed_call(llama):
    kw = dict(temperature=0.8, top_p=0.95, max_gen_len=12, seed=3, stop=["\n\n"])
    want = llama.text_completion(PROMPTS, logprobs=True, **kw)
    got = _logprobs_by_row(llama.text_completion_stream(PROMPTS, logprobs=True, **kw))
    assert [got.get(i, []) for i in range(3)] == [w["logprobs"] for w in want]
    assert any(want[i]["logprobs"] for i in range(3))


def test_infilling_and_chat_streams_give_logprobs_too(llama):
    dialogs = [[{"role": "user", "content": "Reverse a string in Bash."}]]
    want = llama.chat_completion(dialogs, temperature=0, max_gen_len=8, logprobs=True)
    events = llama.chat_completion_stream(dialogs, temperature=0, max_gen_len=8, logprobs=True)
    assert _logprobs_by_row(events)[0] == want[0]["logprobs"]
    want_fill = llama.text_infilling(["x = "], ["\n"], temperature=0, max_gen_len=8, logprobs=True)
    events = llama.text_infilling_stream(["x = "], ["\n"], temperature=0, max_gen_len=8,
                                         logprobs=True)  # fmt: skip
    assert _logprobs_by_row(events)[0] == want_fill[0]["logprobs"]


def test_stream_events_carry_no_logprob_unless_asked(llama):
    events = list(llama.text_completion_stream(PROMPTS, temperature=0, max_gen_len=4))
    assert events and all(e.logprob is None for e in events)


def test_assembler_holds_back_unfinished_characters(meta_tokenizer):
    text = "s = 'é€😀'\n"
    ids = meta_tokenizer.encode(text, bos=False, eos=False)
    assert any(meta_tokenizer.token_piece(t).startswith("<0x") for t in ids)  # byte pieces
    asm = TextAssembler(meta_tokenizer.decode)
    pieces = [asm.push(ids[: n + 1]) for n in range(len(ids))]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == meta_tokenizer.decode(ids)


def test_assembler_holds_back_what_may_start_a_stop_string(tokenizer):
    asm = TextAssembler(lambda ids: "".join(chr(i) for i in ids), stops=["\ndef"])
    assert asm.push([ord(c) for c in "x = 1\nd"]) == "x = 1"
    assert asm.push([ord(c) for c in "x = 1\ndo"]) == "\ndo"


def test_a_paused_stream_refuses_to_resume_after_another_call(llama):
    prompt = llama.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    greedy = SamplingParams(temperature=0)
    stream = llama.generate_stream([prompt], 12, greedy)
    next(stream)
    other = llama.generate_results([prompt[:3]], 4, greedy)  # runs, and is right
    assert other[0].tokens == llama.generate_results([prompt[:3]], 4, greedy)[0].tokens
    with pytest.raises(StreamInterruptedError, match="finish \\(or close\\) a stream"):
        list(stream)


def test_an_abandoned_stream_leaves_the_model_usable(llama):
    prompt = llama.tokenizer.encode(PROMPTS[1], bos=True, eos=False)
    greedy = SamplingParams(temperature=0)
    want = llama.generate_results([prompt], 8, greedy)[0].tokens
    for n, _ in enumerate(llama.generate_stream([prompt], 8, greedy)):
        if n == 2:
            break
    assert llama.generate_results([prompt], 8, greedy)[0].tokens == want


def test_a_second_thread_is_refused_while_one_generates(llama):
    prompt = llama.tokenizer.encode(PROMPTS[2], bos=True, eos=False)
    greedy = SamplingParams(temperature=0)
    want = llama.generate_results([prompt], 10, greedy)[0].tokens
    errors: list[BaseException] = []
    started = threading.Event()

    def other() -> None:
        started.wait()
        try:
            llama.generate_results([prompt], 10, greedy)
        except StreamInterruptedError as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    got = []
    for _, token in llama.generate_stream([prompt], 10, greedy):
        got.append(token)
        if len(got) == 1:
            with cache_guard(llama.model).lock:  # hold the model as a step in progress would
                started.set()
                thread.join()
    assert got == want
    assert len(errors) == 1 and "another thread" in str(errors[0])


def test_infilling_stops_at_a_stop_string_that_starts_with_the_middles_leading_space(llama):
    prefixes, suffixes = ["y ="], ["\n    return c\n"]  # this model's middle: " a..."
    free = llama.text_infilling(prefixes, suffixes, temperature=0, max_gen_len=16, logprobs=True)
    middle = free[0]["generation"]
    assert middle.startswith(" ") and len(middle) > 3  # the case: decode() drops this space
    stop = middle[:2]
    cut = llama.text_infilling(
        prefixes, suffixes, temperature=0, max_gen_len=16, logprobs=True, stop=stop
    )
    assert cut[0]["generation"] == "" and len(cut[0]["tokens"]) < len(free[0]["tokens"])
    events = list(
        llama.text_infilling_stream(prefixes, suffixes, temperature=0, max_gen_len=16, stop=stop)
    )
    assert "".join(e.text for e in events) == ""
    assert (events[-1].finish_reason, events[-1].stop_string) == ("stop", stop)


def test_a_call_that_computes_nothing_leaves_a_paused_stream_going(llama):
    prompt = llama.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    greedy = SamplingParams(temperature=0)
    want = llama.generate_results([prompt], 8, greedy)[0].tokens
    stream = llama.generate_stream([prompt], 8, greedy)
    got = [next(stream)[1]]
    assert llama.text_completion(["x"], max_gen_len=0) == [{"generation": ""}]
    assert llama.generate_results([[1] * llama.max_seq_len], 5)[0].tokens == []
    got += [t for _, t in stream]
    assert got == want


def test_two_llamas_over_one_model_share_its_cache_and_its_guard(llama):
    prompt = llama.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    greedy = SamplingParams(temperature=0)
    other = Llama(llama.model, llama.tokenizer)
    stream = llama.generate_stream([prompt], 8, greedy)
    next(stream)
    other.generate_results([prompt[:3]], 4, greedy)  # overwrites the cache the stream wrote
    with pytest.raises(StreamInterruptedError, match="finish \\(or close\\) a stream"):
        list(stream)


DIRECT_CALLS = {
    "forward": lambda model, prompt: model(torch.tensor([prompt[:4]]), 0),  # Meta's forward
    "freqs_cis": lambda model, prompt: model.freqs_cis,  # where Meta's layer loop starts
}


@pytest.mark.parametrize("call", sorted(DIRECT_CALLS))
def test_a_direct_call_on_the_model_stops_a_paused_stream_from_reading_the_cache(llama, call):
    prompt = llama.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    stream = llama.generate_stream([prompt], 8, SamplingParams(temperature=0))
    next(stream)
    DIRECT_CALLS[call](llama.model, prompt)
    with pytest.raises(StreamInterruptedError, match="finish \\(or close\\) a stream"):
        list(stream)


def test_a_model_made_as_metas_code_makes_it_can_be_copied_and_saved_after_generating(llama):
    import copy
    import io

    import torch

    from codellama import Transformer

    model = Transformer(llama.model.params)
    model.load_state_dict(llama.model.state_dict())
    Llama(model, llama.tokenizer).generate_results([[1, 5, 9]], 3, SamplingParams(temperature=0))
    copy.deepcopy(model)
    torch.save(model, io.BytesIO())


def test_a_call_after_a_streams_last_step_lets_the_stream_end(llama):
    prompt = llama.tokenizer.encode(PROMPTS[1], bos=True, eos=False)
    greedy = SamplingParams(temperature=0)
    want = llama.generate_results([prompt], 6, greedy)[0].tokens
    got = []
    for _, token in llama.generate_stream([prompt], 6, greedy):
        got.append(token)
        if len(got) == len(want):  # its last token: nothing is left to compute
            llama.generate_results([prompt[:2]], 3, greedy)  # a chat loop's next turn
    assert got == want


def test_a_call_between_a_streams_batches_leaves_the_next_batch_right(make_checkpoint, build):
    llama = build(make_checkpoint(GQA_ARGS), max_seq_len=96, max_batch_size=2)
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    greedy = SamplingParams(temperature=0)
    want = [r.tokens for r in llama.generate_results(prompts, 5, greedy, stop_tokens=())]
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    called = False
    for index, token in llama.generate_stream(prompts, 5, greedy, stop_tokens=()):
        got[index].append(token)
        if len(got[0]) == len(got[1]) == 5 and not called:  # the first batch is done
            llama.generate_results([prompts[0][:2]], 3, greedy)
            called = True
    assert called and [got[i] for i in range(3)] == want


def test_a_prompt_that_fills_the_cache_computes_nothing_a_call_can_disturb(llama):
    greedy = SamplingParams(temperature=0)
    full = [1] + [5] * (llama.max_seq_len - 1)
    short = llama.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    want = llama.generate_results([full, short], 4, greedy, stop_tokens=())
    events = llama._generate([full, short], 4, greedy, False, False, (), None, [])
    row, token = next(events)  # the full prompt ends before anything is computed
    assert (row.index, row.finish_reason, token) == (0, "length", None)
    llama.generate_results([short[:2]], 3, greedy)
    assert [t for row, t in events if row.index == 1] == want[1].tokens


def _interrupt_the_third_call(fn):
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    return interrupted


@pytest.mark.parametrize("step", ["forward", "lean native"])
def test_an_interrupt_inside_a_step_leaves_the_model_usable(llama, monkeypatch, step):
    """Greedy CPU decoding takes the native decoder's lean steps where it can (see
    test_native_decoder), else the model's forward steps: an interrupt in either."""
    prompt = llama.tokenizer.encode(PROMPTS[2], bos=True, eos=False)
    greedy = SamplingParams(temperature=0)
    want = llama.generate_results([prompt], 6, greedy)[0].tokens
    if step == "forward":
        monkeypatch.setattr(llama.model, "native_greedy_steps", lambda rows: None)
        monkeypatch.setattr(llama, "_decode", _interrupt_the_third_call(llama._decode))
    else:
        plan = llama.model.native_greedy_steps
        if plan(1) is None:
            pytest.skip("no native decoder here: greedy decoding takes the forward steps")
        monkeypatch.setattr(
            llama.model, "native_greedy_steps", lambda rows: _interrupt_the_third_call(plan(rows))
        )
    with pytest.raises(KeyboardInterrupt):
        llama.generate_results([prompt], 6, greedy)
    assert not cache_guard(llama.model).lock.locked()
    monkeypatch.undo()
    assert llama.generate_results([prompt], 6, greedy)[0].tokens == want


def test_stream_arguments_are_checked_when_the_stream_is_made(llama):
    with pytest.raises(PromptError, match="max_gen_len must be an integer >= 0"):
        llama.text_completion_stream(["x"], max_gen_len=-1)
    with pytest.raises(PromptError, match="stop strings must be non-empty"):
        llama.generate_stream([[1, 5]], 4, stop_strings=[""])
    with pytest.raises(PromptError, match="logprobs must be True or False"):
        llama.text_completion_stream(["x"], logprobs="yes")
    with pytest.raises(PromptError, match=r"unknown argument\(s\) \['echo'\]: not among"):
        llama.text_completion_stream(["x"], echo=True)


def _token_runs(tok, seed: int, n: int = 300) -> list[int]:
    """Tokens as a model may emit them: runs of encoded text (words, code, emoji, CJK, which
    byte pieces spell) mixed with arbitrary ids (bytes cut mid-character, controls, unused)."""
    import random

    rng = random.Random(seed)
    texts = ["def f(x):\n    return x", " héllo", "😀👍", "日本語", " ", "\n\n", "a  b", "ü"]
    out: list[int] = []
    while len(out) < n:
        if rng.random() < 0.6:
            out += tok.encode(rng.choice(texts), bos=False, eos=False)
        else:
            out.append(rng.randrange(tok.n_words))
    return out[:n]


@pytest.mark.parametrize("infilling", [False, True], ids=["decode", "decode_infilling"])
@pytest.mark.parametrize("seed", range(4))
def test_incremental_decoding_equals_a_whole_decode_at_every_length(
    meta_tokenizer, infilling, seed
):
    decode = meta_tokenizer.decode_infilling if infilling else meta_tokenizer.decode
    tokens = _token_runs(meta_tokenizer, seed)
    text = IncrementalDecoder(decode, meta_tokenizer.is_plain_piece)
    for n in range(len(tokens) + 1):
        assert text(tokens[:n]) == decode(tokens[:n]), n
    assert text.settled > 0  # it did decode only the newest tokens


def test_incremental_decoding_with_a_small_vocabulary(tokenizer):
    tokens = _token_runs(tokenizer, 7)
    text = IncrementalDecoder(tokenizer.decode, tokenizer.is_plain_piece)
    for n in range(len(tokens) + 1):
        assert text(tokens[:n]) == tokenizer.decode(tokens[:n]), n


def test_long_streams_decode_only_their_newest_tokens(meta_tokenizer):
    tokens = meta_tokenizer.encode("x = 1\n" * 2000, bos=False, eos=False)
    seen: list[int] = []

    def decode(t):
        seen.append(len(t))
        return meta_tokenizer.decode(t)

    text = IncrementalDecoder(decode, meta_tokenizer.is_plain_piece)
    for n in range(len(tokens) + 1):
        text(tokens[:n])
    # a whole decode per step would read n^2 / 2 tokens; settling reads ~n^2 / SETTLE
    assert sum(seen) < len(tokens) ** 2 / 8
