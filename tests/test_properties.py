"""Property tests over arbitrary Unicode: tokenizer round trips, prompt formats, generation.

The tiny tokenizer (``codellama.demo.train_tokenizer``: identity normalization, byte fallback,
no whitespace folding) loses nothing but the distinction between a space and U+2581 ``▁``,
SentencePiece's own space symbol: ``decode(encode(s)) == s.replace("▁", " ")`` for every
string, exactly ``s`` when it has no ``▁``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from codellama import (
    Llama,
    SamplingParams,
    Tokenizer,
    chat_prompt_tokens,
    infilling_prompt_tokens,
)
from codellama.prompt_formats import SPECIAL_TAGS, UNSAFE_ERROR, has_special_tags

from .conftest import GQA_ARGS

META_SPACE = "\u2581"  # SentencePiece's "▁": decodes to a space
TAGS = [*SPECIAL_TAGS, "<s>", "</s>", "<unk>", "<PRE>", "<SUF>", "<MID>", "<EOT>", "▁<PRE>",
        "▁<EOT>", "☺", "<0x41>", "<<SYS>>\n", "\n<</SYS>>\n\n", "Source: user", "Destination:"]  # fmt: skip
WHITESPACE = " \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2009\u200b\u2028\u2029\u3000\ufeff"

# Arbitrary text: any Unicode scalar value (st.text() never yields surrogates), pure
# whitespace, and mixes of text with the tags of the prompt formats and SentencePiece.
TEXT = st.one_of(
    st.text(),
    st.text(alphabet=WHITESPACE + META_SPACE),
    st.lists(
        st.one_of(st.text(max_size=4), st.sampled_from(TAGS), st.sampled_from(WHITESPACE)),
        max_size=8,
    ).map("".join),
)
SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # fmt: skip


def expected_text(s: str) -> str:
    return s.replace(META_SPACE, " ")


# --------------------------------------------------------------------------- tokenizer


@SETTINGS
@given(s=TEXT)
@example(s="")
@example(s="  leading and trailing  ")
@example(s="▁x ▁")
@example(s="\x00\ufeff☺<PRE> [INST]")
def test_decode_inverts_encode(tokenizer: Tokenizer, s: str):
    ids = tokenizer.encode(s, bos=False, eos=False)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.n_words for i in ids)
    assert tokenizer.sp_model.unk_id() not in ids  # byte fallback: every character encodes
    assert tokenizer.decode(ids) == expected_text(s)
    if META_SPACE not in s:
        assert tokenizer.decode(ids) == s
    framed = tokenizer.encode(s, bos=True, eos=True)
    assert framed == [tokenizer.bos_id, *ids, tokenizer.eos_id]
    assert tokenizer.decode(framed) == expected_text(s)  # BOS/EOS decode to nothing


@SETTINGS
@given(s=TEXT)
@example(s="")
@example(s=" starts with a space")
@example(s="☺☺")
def test_decode_infilling_inverts_encode_infilling(tokenizer: Tokenizer, s: str):
    ids = tokenizer.encode_infilling(s)
    assert all(0 <= i < tokenizer.n_words for i in ids)
    assert tokenizer.decode_infilling(ids) == expected_text(s)
    if s and not s[0].isspace() and META_SPACE not in s:
        # No implicit leading space: the pieces are those of encode() without its "▁".
        assert tokenizer.decode(ids) == s


# --------------------------------------------------------------------------- prompt formats


@SETTINGS
@given(prefix=TEXT, suffix=TEXT, suffix_first=st.booleans())
def test_infilling_prompt_never_raises(tokenizer: Tokenizer, prefix, suffix, suffix_first):
    tokens = infilling_prompt_tokens(tokenizer, prefix, suffix, suffix_first=suffix_first)
    assert all(isinstance(t, int) and 0 <= t < tokenizer.n_words for t in tokens)
    if suffix_first:
        assert tokens[:3] == [tokenizer.bos_id, tokenizer.prefix_id, tokenizer.suffix_id]
        assert tokenizer.middle_id in tokens
    else:
        assert tokens[:2] == [tokenizer.bos_id, tokenizer.prefix_id]
        assert tokens[-1] == tokenizer.middle_id


CONTENT = st.one_of(st.text(max_size=12), TEXT)


@st.composite
def dialogs(draw, content=CONTENT, max_pairs: int = 2, destinations: bool = False):
    """A valid dialog: [system], (user, assistant)*, user, with arbitrary contents."""

    def msg(role: str) -> dict:
        m = {"role": role, "content": draw(content)}
        if destinations and draw(st.booleans()):
            m["destination"] = draw(st.sampled_from(["user", "assistant", "ipython", ""]))
        return m

    out = [msg("system")] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, max_pairs))):
        out += [msg("user"), msg("assistant")]
    return [*out, msg("user")]


@pytest.fixture(scope="module")
def step_tokenizer(step_tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(step_tokenizer_path)


@SETTINGS
@given(dialog=dialogs())
def test_inst_chat_prompt_never_raises(tokenizer: Tokenizer, dialog):
    tokens = chat_prompt_tokens(tokenizer, dialog)
    assert all(isinstance(t, int) and 0 <= t < tokenizer.n_words for t in tokens)
    users = sum(m["role"] == "user" for m in dialog)
    # Text never encodes to the control pieces: one BOS per user turn, one EOS per answer.
    assert tokens[0] == tokenizer.bos_id
    assert tokens.count(tokenizer.bos_id) == users
    assert tokens.count(tokenizer.eos_id) == users - 1
    assert isinstance(has_special_tags(dialog), bool)


@SETTINGS
@given(dialog=dialogs(destinations=True))
def test_step_chat_prompt_never_raises(step_tokenizer: Tokenizer, dialog):
    tokens = chat_prompt_tokens(step_tokenizer, dialog)
    assert all(isinstance(t, int) and 0 <= t < step_tokenizer.n_words for t in tokens)
    assert tokens[0] == step_tokenizer.bos_id
    if not has_special_tags(dialog):
        turns = len(dialog) + (dialog[0]["role"] != "system")  # an empty system is added
        assert tokens.count(step_tokenizer.step_id) == turns


# --------------------------------------------------------------------------- generation

MAX_SEQ_LEN = 256
MAX_BATCH = 4


@pytest.fixture(scope="module")
def llama(make_checkpoint) -> Llama:
    ckpt = make_checkpoint(GQA_ARGS)
    return Llama.build(
        str(ckpt), str(ckpt / "tokenizer.model"), MAX_SEQ_LEN, MAX_BATCH,
        device="cpu", dtype="float32",
    )  # fmt: skip


SAMPLING = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(0, 2)),
    top_p=st.floats(0, 1, exclude_min=True),
    top_k=st.one_of(st.just(0), st.integers(0, 600)),
    min_p=st.floats(0, 1),
    repetition_penalty=st.one_of(
        st.just(1.0), st.floats(0.05, 20), st.floats(0, exclude_min=True, allow_infinity=False)
    ),
)
PROMPTS = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(TAGS)), max_size=6)


def _check_logprobs(lps: list[float]) -> None:
    assert all(math.isfinite(x) and x <= 0 for x in lps)


EXTREMES = [
    SamplingParams(temperature=5e-324, top_p=5e-324),  # logits / T overflows float32
    SamplingParams(temperature=2.0, top_p=1.0, top_k=600, min_p=1.0),
    SamplingParams(temperature=1.0, top_k=1, repetition_penalty=1e-300),
    SamplingParams(temperature=0.5, repetition_penalty=1e300),
    SamplingParams(temperature=0.0, repetition_penalty=5e-324),
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompts=PROMPTS,
    sampling=SAMPLING,
    max_gen_len=st.integers(0, 8),
    logprobs=st.booleans(),
    echo=st.booleans(),
)
@example(prompts=["", "x"] * 3, sampling=EXTREMES[0], max_gen_len=8, logprobs=True, echo=True)
@example(prompts=["def f("], sampling=EXTREMES[1], max_gen_len=8, logprobs=True, echo=False)
@example(prompts=["a", "b"], sampling=EXTREMES[2], max_gen_len=8, logprobs=False, echo=False)
@example(prompts=["a a a"], sampling=EXTREMES[3], max_gen_len=8, logprobs=True, echo=False)
@example(prompts=[], sampling=EXTREMES[4], max_gen_len=8, logprobs=True, echo=True)
def test_text_completion_never_raises(llama: Llama, prompts, sampling, max_gen_len, logprobs, echo):
    out = llama.text_completion(
        prompts,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_gen_len=max_gen_len,
        logprobs=logprobs,
        echo=echo,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty,
    )
    assert len(out) == len(prompts)
    for p, pred in zip(prompts, out, strict=True):
        assert isinstance(pred["generation"], str)
        if echo:
            assert pred["generation"].startswith(expected_text(p))
        if logprobs:
            n_prompt = len(llama.tokenizer.encode(p, bos=True, eos=False))
            n_new = len(pred["tokens"]) - (n_prompt if echo else 0)
            assert 0 <= n_new <= max_gen_len
            assert len(pred["tokens"]) == len(pred["logprobs"])
            _check_logprobs(pred["logprobs"])
        else:
            assert set(pred) == {"generation"}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompts=PROMPTS,
    sampling=SAMPLING,
    max_gen_len=st.integers(0, 8),
    stop=st.sampled_from([(), (2,), (2, 7, 300)]),
    seed=st.one_of(st.none(), st.integers(0, 2**32)),
)
def test_generate_results_respect_budget_and_stops(llama: Llama, prompts, sampling, max_gen_len,
                                                   stop, seed):  # fmt: skip
    tokens = [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    results = llama.generate_results(tokens, max_gen_len, sampling, stop_tokens=stop, seed=seed)
    assert len(results) == len(tokens)
    for t, r in zip(tokens, results, strict=True):
        budget = min(max_gen_len, MAX_SEQ_LEN - len(t))
        assert r.prompt_len == len(t)
        assert len(r.tokens) <= budget
        assert not set(r.tokens) & set(stop)
        assert all(0 <= x < llama.model.params.vocab_size for x in r.tokens)
        assert r.finish_reason == ("length" if len(r.tokens) == budget else "stop")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dialogs=st.lists(dialogs(content=st.text(max_size=8), max_pairs=1), max_size=5),
    infills=st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10)), max_size=5),
    sampling=SAMPLING,
    max_gen_len=st.integers(0, 6),
    suffix_first=st.booleans(),
)
def test_chat_and_infilling_never_raise(llama: Llama, dialogs, infills, sampling, max_gen_len,
                                        suffix_first):  # fmt: skip
    kw = dict(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_gen_len=max_gen_len,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty,
    )
    chats = llama.chat_completion(dialogs, logprobs=True, **kw)
    assert len(chats) == len(dialogs)
    for d, c in zip(dialogs, chats, strict=True):
        assert c["generation"]["role"] == "assistant"
        if has_special_tags(d, destinations=llama.tokenizer.step_id is not None):
            assert c["generation"]["content"] == UNSAFE_ERROR
        assert len(c["tokens"]) == len(c["logprobs"]) <= max_gen_len
        _check_logprobs(c["logprobs"])
    prefixes = [p for p, _ in infills]
    suffixes = [s for _, s in infills]
    filled = llama.text_infilling(prefixes, suffixes, suffix_first=suffix_first, **kw)
    assert len(filled) == len(infills)
    for p, s, f in zip(prefixes, suffixes, filled, strict=True):
        assert f["full_text"] == p + f["generation"] + s
