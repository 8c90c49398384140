"""Stop strings: a row ends once its generated text holds one; text APIs cut it off."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codellama import Llama, PromptError, SamplingParams
from codellama.stops import stop_overlap

from .conftest import GQA_ARGS

GREEDY = SamplingParams(temperature=0.0)
N = 24


@pytest.fixture(scope="module")
def llama(make_checkpoint) -> Llama:
    ckpt = make_checkpoint(GQA_ARGS)
    return Llama.build(
        str(ckpt), str(ckpt / "tokenizer.model"), 64, 4, device="cpu", dtype="float32"
    )


def _free_run(llama: Llama, text: str) -> tuple[list[int], list[int], str]:
    """Prompt ids, the unconstrained greedy tokens and their text."""
    ids = llama.tokenizer.encode(text, bos=True, eos=False)
    tokens = llama.generate_results([ids], N, GREEDY, stop_tokens=())[0].tokens
    return ids, tokens, llama.tokenizer.decode(tokens)


def _stop_in(text: str) -> str:
    """A 2-character piece of ``text`` whose first occurrence is past its first quarter."""
    for a in range(len(text) // 4, len(text) - 2):
        piece = text[a : a + 2]
        if text.find(piece) == a:
            return piece
    pytest.skip(f"the free run's text has no usable stop string: {text!r}")


def _shortest_prefix_holding(llama: Llama, tokens: list[int], stop: str) -> list[int]:
    for k in range(1, len(tokens) + 1):
        if stop in llama.tokenizer.decode(tokens[:k]):
            return tokens[:k]
    raise AssertionError(f"{stop!r} never appears")


def test_generation_ends_with_the_token_that_completes_the_stop_string(llama):
    ids, tokens, text = _free_run(llama, "def add(a, b):")
    stop = _stop_in(text)
    res = llama.generate_results([ids], N, GREEDY, stop_tokens=(), stop_strings=[stop])[0]
    assert res.tokens == _shortest_prefix_holding(llama, tokens, stop)
    assert res.finish_reason == "stop"
    assert res.stop_string == stop


def test_text_completion_cuts_the_text_before_the_stop_string(llama):
    _, _, text = _free_run(llama, "class Stack:")
    stop = _stop_in(text)
    out = llama.text_completion(["class Stack:"], temperature=0.0, max_gen_len=N, stop=stop)
    assert out[0]["generation"] == text[: text.find(stop)]


def test_the_earliest_of_several_stop_strings_wins(llama):
    ids, tokens, text = _free_run(llama, "import os")
    early = _stop_in(text)
    late = text[-2:] if text.find(text[-2:]) > text.find(early) else "\x00never"
    res = llama.generate_results([ids], N, GREEDY, stop_tokens=(), stop_strings=[late, early])
    assert res[0].stop_string == early
    assert res[0].tokens == _shortest_prefix_holding(llama, tokens, early)


def test_absent_stop_string_changes_nothing(llama):
    ids, tokens, _ = _free_run(llama, "for i in range(10):")
    res = llama.generate_results([ids], N, GREEDY, stop_tokens=(), stop_strings=["\x00absent"])
    assert res[0].tokens == tokens
    assert res[0].finish_reason == "length" and res[0].stop_string is None


def test_rows_of_a_batch_stop_independently(llama):
    texts = ["def add(a, b):", "class Stack:", "import os"]
    runs = [_free_run(llama, t) for t in texts]
    stop = _stop_in(runs[0][2])
    batch = llama.generate_results(
        [r[0] for r in runs], N, GREEDY, stop_tokens=(), stop_strings=[stop]
    )
    for (_, tokens, text), res in zip(runs, batch, strict=True):
        want = _shortest_prefix_holding(llama, tokens, stop) if stop in text else tokens
        assert res.tokens == want


def test_stream_yields_the_completing_token_then_ends(llama):
    ids, _, text = _free_run(llama, "def add(a, b):")
    stop = _stop_in(text)
    streamed = [t for _, t in llama.generate_stream([ids], N, GREEDY, stop_strings=[stop])]
    res = llama.generate_results([ids], N, GREEDY, stop_strings=[stop])
    assert streamed == res[0].tokens


def test_infilling_and_chat_cut_their_text_at_the_stop_string(llama):
    free_fill = llama.text_infilling(["def f(x):\n    "], ["\n"], temperature=0.0, max_gen_len=N)
    middle = free_fill[0]["generation"]
    if len(middle) < 8:
        pytest.skip(f"the free infilling is too short to cut: {middle!r}")
    stop = _stop_in(middle)
    cut = llama.text_infilling(
        ["def f(x):\n    "], ["\n"], temperature=0.0, max_gen_len=N, stop=[stop]
    )
    assert cut[0]["generation"] == middle[: middle.find(stop)]
    assert cut[0]["full_text"] == "def f(x):\n    " + cut[0]["generation"] + "\n"

    dialog = [{"role": "user", "content": "Write hello world in C."}]
    free_chat = llama.chat_completion([dialog], temperature=0.0, max_gen_len=N)
    answer = free_chat[0]["generation"]["content"]
    if len(answer) < 8:
        pytest.skip(f"the free answer is too short to cut: {answer!r}")
    stop = _stop_in(answer)
    cut_chat = llama.chat_completion([dialog], temperature=0.0, max_gen_len=N, stop=stop)
    assert cut_chat[0]["generation"]["content"] == answer[: answer.find(stop)]


@pytest.mark.parametrize("bad", ["", [""], [3], [None], b"\n", {"a": 1}])
def test_bad_stop_strings_are_refused(llama, bad):
    with pytest.raises(PromptError, match="stop strings must be"):
        llama.text_completion(["x"], max_gen_len=2, stop=bad)


def test_a_stop_string_with_a_lone_surrogate_is_refused(llama):
    with pytest.raises(PromptError, match="stop string 1 holds '\\\\ud800'"):
        llama.text_completion(["x"], max_gen_len=2, stop=["ok", "a\ud800"])
    with pytest.raises(PromptError, match="stop string 1 holds"):
        llama.text_completion_stream(["x"], max_gen_len=2, stop=["ok", "a\ud800"])


def test_an_unfinished_character_does_not_match_a_replacement_character_stop(meta_tokenizer):
    """Byte pieces of a character not yet complete decode to U+FFFD: no stop string's."""
    from codellama.generation import _Row, _StopReader

    tok = meta_tokenizer
    ids = tok.encode("ab 😀", bos=False, eos=False)
    assert tok.token_piece(ids[-1]).startswith("<0x")  # 😀 is spelt in byte pieces
    reader = _StopReader(("\ufffd",), tok.decode, tok.is_plain_piece, tok.unfinished_bytes)
    row = _Row([1], budget=100)
    for n in range(1, len(ids) + 1):
        row.tokens = ids[:n]
        assert not reader.found(row), tok.decode(ids[:n])
    row.tokens = ids[:-1]  # the character left unfinished for good: the row ends so
    row.finish_reason = "length"
    assert reader.found(row) and row.stop_string == "\ufffd"


@pytest.mark.parametrize(
    ("text", "cut", "want"),
    [("ab 😀", 2, 0), ("ab 😀", 3, 1), ("ab 😀", 4, 2), ("ab 😀", 5, 3), ("ab 😀", 6, 0),
     ("ꙮ", 2, 1), ("ꙮ", 3, 2), ("ꙮ", 4, 0), ("abc", 1, 0)],
)  # fmt: skip
def test_unfinished_bytes_counts_a_characters_bytes_still_to_come(meta_tokenizer, text, cut, want):
    ids = meta_tokenizer.encode(text, bos=False, eos=False)
    assert meta_tokenizer.unfinished_bytes(ids[:cut]) == want


def test_unfinished_bytes_is_zero_after_bytes_no_character_can_take(meta_tokenizer):
    tok = meta_tokenizer
    byte = {v: k for k, v in tok._byte_values.items()}
    a = tok.encode("a", bos=False, eos=False)
    assert tok.unfinished_bytes(a + [byte[0x80]]) == 0  # a continuation with no lead
    assert tok.unfinished_bytes(a + [byte[0xE2], byte[0x41]]) == 0  # the lead's run broken
    assert tok.unfinished_bytes(a + [byte[0xE2], byte[0x82]]) == 2


def test_a_replacement_character_that_is_final_stops_at_once(meta_tokenizer):
    """An invalid byte decodes to U+FFFD for good: a stop string holding it matches then."""
    from codellama.generation import _Row, _StopReader

    tok = meta_tokenizer
    byte = {v: k for k, v in tok._byte_values.items()}
    reader = _StopReader(("a\ufffd",), tok.decode, tok.is_plain_piece, tok.unfinished_bytes)
    row = _Row([1], budget=100)
    row.tokens = tok.encode("a", bos=False, eos=False) + [byte[0x80]]
    assert reader.found(row) and row.stop_string == "a\ufffd"


def test_echo_cuts_where_generation_stopped_not_at_the_space_decoding_drops(llama):
    """A generation's text loses the space before its first piece (SentencePiece), the echoed
    text keeps it: a stop string made of that space and the piece never stopped generation,
    so the echo must not be cut there either."""
    tok = llama.tokenizer
    prompts = [tok.decode([i]) for i in range(3, tok.n_words) if tok.is_plain_piece(i)][:200]
    firsts = llama.generate_results(
        [tok.encode(p, bos=True, eos=False) for p in prompts], 1, GREEDY, stop_tokens=()
    )
    prompt = next(
        p for p, r in zip(prompts, firsts, strict=True)
        if tok.token_piece(r.tokens[0]).startswith("▁") and len(tok.token_piece(r.tokens[0])) > 1
    )  # fmt: skip
    ids, tokens, _ = _free_run(llama, prompt)
    piece = tok.token_piece(tokens[0])
    stop = " " + piece[1:]
    plain = llama.text_completion([prompt], temperature=0, max_gen_len=N, stop=[stop])
    echoed = llama.text_completion([prompt], temperature=0, max_gen_len=N, stop=[stop], echo=True)
    whole = llama.text_completion([prompt], temperature=0, max_gen_len=N, echo=True)
    assert plain[0]["generation"] == tok.decode(tokens)  # not stopped: " " is not in its text
    assert echoed[0]["generation"] == whole[0]["generation"]


def _overlap_by_definition(text: str, stop: str) -> int:
    return max((k for k in range(len(stop)) if text.endswith(stop[:k])), default=0)


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet="ab\n", max_size=30), stop=st.text(alphabet="ab\n", max_size=30))
def test_stop_overlap_is_the_longest_tail_that_begins_the_stop_string(text, stop):
    assert stop_overlap(text, stop) == _overlap_by_definition(text, stop)


def test_stop_overlap_of_periodic_strings():
    assert stop_overlap("x" + "ab" * 50, "ab" * 100) == 100  # the whole tail "abab...ab"
    assert stop_overlap("a" * 20, "a" * 10) == 9  # shorter than the stop string
    assert stop_overlap("b" + "a" * 5000, "a" * 10_000) == 5000
