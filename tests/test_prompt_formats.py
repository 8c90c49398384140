"""Prompt token ids must equal Meta's formatting exactly, on tiny and on Meta's tokenizers."""

from __future__ import annotations

import pytest

from codellama import (
    ConfigError,
    PromptError,
    Tokenizer,
    UnsupportedError,
    chat_prompt_tokens,
    infilling_prompt_tokens,
)

PREFIX = 'def remove_non_ascii(s: str) -> str:\n    """ '
SUFFIX = "\n    return result\n"
UNICODE_PREFIX = "# π₁ P = 0 ↔ "
UNICODE_SUFFIX = " = 0 :=\nbegin — ünïcödé ✓ 中文\n"


def expected_infilling(tok: Tokenizer, prefix: str, suffix: str, suffix_first: bool) -> list[int]:
    """Meta's layout, spelled out piece by piece: the suffix is encoded without SentencePiece's
    leading space by encoding "☺" + suffix and dropping the "▁" and "☺" pieces."""
    sp = tok.sp_model
    suffix_ids = sp.encode("☺" + suffix)[2:]
    if suffix_first:
        return [
            tok.bos_id,
            tok.prefix_id,
            tok.suffix_id,
            *suffix_ids,
            tok.middle_id,
            *sp.encode(prefix),
        ]
    return [
        tok.bos_id,
        tok.prefix_id,
        *sp.encode(prefix),
        tok.suffix_id,
        *suffix_ids,
        tok.middle_id,
    ]


INFILL_CASES = [
    (PREFIX, SUFFIX),
    ("", SUFFIX),
    (PREFIX, ""),
    ("", ""),
    (UNICODE_PREFIX, UNICODE_SUFFIX),
]


@pytest.mark.parametrize("suffix_first", [False, True], ids=["psm", "spm"])
@pytest.mark.parametrize(
    "prefix,suffix",
    INFILL_CASES,
    ids=["code", "empty-prefix", "empty-suffix", "both-empty", "unicode"],
)
def test_infilling_ids_on_tiny_tokenizer(tokenizer, prefix, suffix, suffix_first):
    got = infilling_prompt_tokens(tokenizer, prefix, suffix, suffix_first=suffix_first)
    assert got == expected_infilling(tokenizer, prefix, suffix, suffix_first)


@pytest.mark.parametrize("suffix_first", [False, True], ids=["psm", "spm"])
@pytest.mark.parametrize(
    "prefix,suffix",
    INFILL_CASES,
    ids=["code", "empty-prefix", "empty-suffix", "both-empty", "unicode"],
)
def test_infilling_ids_on_meta_tokenizer(meta_tokenizer, prefix, suffix, suffix_first):
    got = infilling_prompt_tokens(meta_tokenizer, prefix, suffix, suffix_first=suffix_first)
    assert got == expected_infilling(meta_tokenizer, prefix, suffix, suffix_first)


def test_meta_tokenizer_special_ids(meta_tokenizer):
    t = meta_tokenizer
    assert (t.n_words, t.bos_id, t.eos_id, t.pad_id) == (32016, 1, 2, -1)
    assert (t.prefix_id, t.suffix_id, t.middle_id, t.eot_id) == (32007, 32008, 32009, 32010)
    assert t.step_id is None


def test_infilling_prompt_has_known_meta_ids(meta_tokenizer):
    ids = infilling_prompt_tokens(meta_tokenizer, "def f(", "\n    return x")
    # <s> ▁<PRE> ...prefix... ▁<SUF> "\n" "   " "▁return" "▁x" ▁<MID>
    assert ids[:2] == [1, 32007]
    assert ids[-6:] == [32008, 13, 1678, 736, 921, 32009]


def test_llama2_tokenizer_has_no_infilling(llama2_tokenizer):
    assert llama2_tokenizer.n_words == 32000
    assert not llama2_tokenizer.supports_infilling
    with pytest.raises(UnsupportedError, match="7B and 13B"):
        infilling_prompt_tokens(llama2_tokenizer, "a", "b")


def test_flags_take_the_ints_0_and_1_as_metas_code_does(tokenizer):
    """Meta's ``encode`` tests ``if bos:``, so callers pass ``bos=1``; strings stay refused."""
    assert tokenizer.encode("x", bos=1, eos=0) == tokenizer.encode("x", bos=True, eos=False)
    assert infilling_prompt_tokens(tokenizer, "a", "b", suffix_first=1) == (
        infilling_prompt_tokens(tokenizer, "a", "b", suffix_first=True)
    )


def test_encode_decode_infilling_have_no_leading_space(tokenizer):
    text = "    return x\n"
    assert tokenizer.decode_infilling(tokenizer.encode_infilling(text)) == text


# ---------------------------------------------------------------- chat, [INST] format


def expected_inst(tok: Tokenizer, dialog: list[dict]) -> list[int]:
    """Meta's Llama 2 chat layout written out as text, one encode per turn."""
    sp = tok.sp_model
    if dialog[0]["role"] == "system":
        first = f"<<SYS>>\n{dialog[0]['content']}\n<</SYS>>\n\n{dialog[1]['content']}"
        dialog = [{"role": "user", "content": first}] + dialog[2:]
    ids: list[int] = []
    for user, answer in zip(dialog[0::2], dialog[1::2], strict=False):
        turn = "[INST] " + user["content"].strip() + " [/INST] " + answer["content"].strip() + " "
        ids += [tok.bos_id] + sp.encode(turn) + [tok.eos_id]
    ids += [tok.bos_id] + sp.encode("[INST] " + dialog[-1]["content"].strip() + " [/INST]")
    return ids


DIALOGS = {
    "single": [{"role": "user", "content": "Write fizzbuzz in Python."}],
    "system": [
        {"role": "system", "content": "Provide answers in JavaScript"},
        {"role": "user", "content": "Sum all contiguous sublists."},
    ],
    "multi-turn": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "  What is 2+2?  "},
        {"role": "assistant", "content": " 4 "},
        {"role": "user", "content": "And 3+3? ✓ ünï"},
    ],
}


@pytest.mark.parametrize("name", list(DIALOGS))
def test_inst_chat_ids_on_tiny_tokenizer(tokenizer, name):
    assert chat_prompt_tokens(tokenizer, DIALOGS[name]) == expected_inst(tokenizer, DIALOGS[name])


@pytest.mark.parametrize("name", list(DIALOGS))
def test_inst_chat_ids_on_meta_tokenizer(meta_tokenizer, name):
    assert chat_prompt_tokens(meta_tokenizer, DIALOGS[name]) == expected_inst(
        meta_tokenizer, DIALOGS[name]
    )


def test_inst_chat_starts_with_known_meta_ids(meta_tokenizer):
    ids = chat_prompt_tokens(meta_tokenizer, DIALOGS["system"])
    # <s> ▁[ INST ] ▁<< SY S >> \n
    assert ids[:9] == [1, 518, 25580, 29962, 3532, 14816, 29903, 6778, 13]
    assert ids[-4:] == [518, 29914, 25580, 29962]  # ▁[ / INST ]


# ---------------------------------------------------------------- chat, 70B step format


def expected_step(tok: Tokenizer, dialog: list[dict]) -> list[int]:
    sp = tok.sp_model
    if dialog[0]["role"] != "system":
        dialog = [{"role": "system", "content": ""}] + dialog
    ids = [tok.bos_id]
    for m in dialog:
        header = " Source: " + m["role"]
        if m.get("destination") is not None:
            header += "\nDestination: " + m["destination"]
        ids += sp.encode(header)
        if m["content"]:
            ids += sp.encode("\n\n " + m["content"].strip())
        ids.append(tok.step_id)
    return ids + sp.encode(" Source: assistant\nDestination: user") + sp.encode("\n\n ")


@pytest.mark.parametrize("name", list(DIALOGS))
def test_step_chat_ids(step_tokenizer_path, name):
    tok = Tokenizer(step_tokenizer_path)
    assert tok.step_id is not None
    assert chat_prompt_tokens(tok, DIALOGS[name]) == expected_step(tok, DIALOGS[name])


def test_step_chat_keeps_destinations(step_tokenizer_path):
    tok = Tokenizer(step_tokenizer_path)
    dialog = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi", "destination": "assistant"},
    ]
    assert chat_prompt_tokens(tok, dialog) == expected_step(tok, dialog)


@pytest.mark.parametrize(
    "dialog,match",
    [
        ([], "at least one user message"),
        ([{"role": "assistant", "content": "hi"}], "out of order"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "out of order"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
        ([{"role": "robot", "content": "a"}], "'robot'"),
        ([{"role": "user"}], "content"),
        ([{"role": "system", "content": "s"}], "last message"),
    ],
    ids=[
        "empty",
        "assistant-first",
        "two-users",
        "ends-with-assistant",
        "unknown-role",
        "no-content",
        "system-only",
    ],
)
def test_bad_dialogs_raise_prompt_error(tokenizer, dialog, match):
    with pytest.raises(PromptError, match=match):
        chat_prompt_tokens(tokenizer, dialog)


@pytest.mark.parametrize("encode", ["encode", "encode_infilling"])
def test_text_with_a_lone_surrogate_is_refused_with_its_offset(tokenizer, encode):
    with pytest.raises(PromptError, match=r"text holds '\\ud800' at offset 3, a lone surrogate"):
        if encode == "encode":
            tokenizer.encode("abc\ud800", bos=True, eos=False)
        else:
            tokenizer.encode_infilling("abc\ud800")


@pytest.mark.parametrize("ids", [[5, 10**6], [-5], [3 * 10**9]])
def test_decoding_an_id_outside_the_vocabulary_names_it(tokenizer, ids):
    with pytest.raises(PromptError, match=f"token id {int(ids[-1])} is outside the vocabulary"):
        tokenizer.decode(ids)


def test_decode_still_drops_metas_padding(tokenizer):
    ids = tokenizer.encode("x = 1", bos=False, eos=False)
    assert tokenizer.decode([-1, *ids, -1]) == tokenizer.decode(ids) == "x = 1"


@pytest.mark.parametrize("path", [None, 123])
def test_a_tokenizer_path_that_is_not_a_path_is_a_config_error(path):
    with pytest.raises(ConfigError, match="tokenizer path must be a str or os.PathLike"):
        Tokenizer(path)
