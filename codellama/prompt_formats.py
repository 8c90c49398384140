"""Prompt formats: infilling (prefix-suffix-middle) and chat, token for token as Meta's.

Two chat formats exist. Code Llama - Instruct 7B/13B/34B use ``[INST]``/``<<SYS>>``;
the 70B Instruct vocabulary has a ``<step>`` piece and uses ``Source:``/``Destination:``
headers with ``<step>`` between turns. :func:`chat_prompt_tokens` picks by the tokenizer.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Literal

if sys.version_info >= (3, 11):
    from typing import NotRequired, TypedDict
else:  # Python 3.10: typing_extensions (a dependency of torch) has them
    from typing_extensions import NotRequired, TypedDict

from .errors import PromptError, UnsupportedError, is_flag
from .tokenizer import TEXTLIKE, Tokenizer, check_text

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    """One turn of a dialog: ``{"role": ..., "content": ...}`` (Meta's dict)."""

    role: Role
    content: str
    destination: NotRequired[str]  # 70B format only: who a message is for


MESSAGE_KEYS = frozenset(Message.__annotations__)  # role, content, destination
Dialog = list[Message]
"""A conversation, as Meta's type: [system], user, assistant, ..., user. Functions here
accept any sequence of messages."""

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>", "<step>")
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."
INFILLING_MODELS = "Code Llama 7B and 13B (base and Instruct)"


def infilling_prompt_tokens(
    tokenizer: Tokenizer, prefix: str, suffix: str, suffix_first: bool = False
) -> list[int]:
    """Token ids of an infilling problem.

    Prefix-suffix-middle: ``<PRE> {prefix} <SUF>{suffix} <MID>``; with ``suffix_first``
    (suffix-prefix-middle): ``<PRE> <SUF>{suffix} <MID> {prefix}``.
    """
    require_infilling(tokenizer)
    for name, value in (("prefix", prefix), ("suffix", suffix)):
        if not isinstance(value, str):
            raise PromptError(f"{name} must be a str, got {type(value).__name__}: {value!r:.80}")
    if not is_flag(suffix_first):
        raise PromptError(f"suffix_first must be True or False, got {suffix_first!r:.40}")
    assert tokenizer.prefix_id is not None and tokenizer.suffix_id is not None
    assert tokenizer.middle_id is not None
    bos, pre, suf, mid = (
        tokenizer.bos_id,
        tokenizer.prefix_id,
        tokenizer.suffix_id,
        tokenizer.middle_id,
    )
    if suffix_first:
        return (
            [bos, pre, suf]
            + tokenizer.encode_infilling(suffix)
            + [mid]
            + tokenizer.encode(prefix, bos=False, eos=False)
        )
    return (
        [bos, pre]
        + tokenizer.encode(prefix, bos=False, eos=False)
        + [suf]
        + tokenizer.encode_infilling(suffix)
        + [mid]
    )


def require_infilling(tokenizer: Tokenizer) -> None:
    """Raise :class:`UnsupportedError` unless the tokenizer has the infilling pieces."""
    if not tokenizer.supports_infilling:
        raise UnsupportedError(
            f"the tokenizer {getattr(tokenizer, 'model_path', '')!r} has no infilling pieces "
            f"(▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT>); infilling is supported by {INFILLING_MODELS}, "
            "not by Code Llama - Python, 34B or 70B"
        )


def has_special_tags(dialog: Sequence[Message], destinations: bool = True) -> bool:
    """True if a message contains a tag of the chat formats (Meta answers UNSAFE_ERROR).

    Meta's code checks the contents only; with ``destinations`` (the 70B format, which puts
    them in the prompt) the destinations are checked too, so that none can inject a turn.
    """
    texts = [m["content"] for m in dialog]
    if destinations:
        texts += [m["destination"] for m in dialog if m.get("destination")]
    return any(tag in text for text in texts for tag in SPECIAL_TAGS)


def validate_dialog(dialog: Sequence[Message], *, index: int | None = None) -> None:
    """Raise :class:`PromptError` unless ``dialog`` is [system], user, assistant, ..., user."""
    where = "" if index is None else f"dialog {index}: "
    if isinstance(dialog, TEXTLIKE) or not isinstance(dialog, Sequence):
        hint = (
            "; chat_completion takes a list of dialogs: pass [[message, ...]], not [message, ...]"
            if isinstance(dialog, dict)
            else ""
        )
        raise PromptError(
            f"{where}a dialog must be a list of messages "
            f'({{"role": ..., "content": ...}}), got {type(dialog).__name__}: {dialog!r:.60}{hint}'
        )
    if len(dialog) == 0:
        raise PromptError(f"{where}a dialog needs at least one user message, got an empty list")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict):
            raise PromptError(f"{where}message {i} must be a dict, got {type(msg).__name__}")
        if msg.get("role") not in ("system", "user", "assistant"):
            raise PromptError(
                f"{where}message {i} has role {msg.get('role')!r}; "
                "roles must be 'system', 'user' or 'assistant'"
            )
        unknown = sorted(str(k) for k in msg if k not in MESSAGE_KEYS)
        if unknown:  # a misspelt key would otherwise be dropped without a word
            raise PromptError(
                f"{where}message {i} has unknown keys {unknown}; a message has 'role', "
                "'content' and (70B Instruct only) 'destination'"
            )
        if not isinstance(msg.get("content"), str):
            raise PromptError(
                f"{where}message {i} ({msg['role']}) needs a 'content' string, "
                f"got {msg.get('content')!r:.80}"
            )
        check_text(msg["content"], f"{where}message {i} ({msg['role']}) content")
        dest = msg.get("destination")
        if dest is not None and not isinstance(dest, str):
            raise PromptError(f"{where}message {i} has a non-string destination {dest!r:.80}")
        if dest is not None:
            check_text(dest, f"{where}message {i} destination")
    turns = list(dialog[1:] if dialog[0]["role"] == "system" else dialog)
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise PromptError(
                f"{where}roles out of order at {msg['role']!r} message "
                f"{i + len(dialog) - len(turns)}: an optional 'system' message comes first, then "
                "'user' and 'assistant' alternate, starting and ending with 'user'"
            )
    if not turns or turns[-1]["role"] != "user":
        last = dialog[-1]["role"]
        raise PromptError(f"{where}the last message must be from 'user', got {last!r}")


def chat_prompt_tokens(tokenizer: Tokenizer, dialog: Sequence[Message]) -> list[int]:
    """Token ids of a dialog in the format the tokenizer's model was trained on."""
    validate_dialog(dialog)
    if tokenizer.step_id is not None:
        return _step_format_tokens(tokenizer, dialog)
    return _inst_format_tokens(tokenizer, dialog)


def _inst_format_tokens(tokenizer: Tokenizer, dialog: Sequence[Message]) -> list[int]:
    """``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>...``"""
    msgs = [(m["role"], m["content"]) for m in dialog]
    if msgs[0][0] == "system":
        msgs = [(msgs[1][0], B_SYS + msgs[0][1] + E_SYS + msgs[1][1])] + msgs[2:]
    tokens: list[int] = []
    for (_, prompt), (_, answer) in zip(msgs[0:-1:2], msgs[1::2], strict=False):
        text = f"{B_INST} {prompt.strip()} {E_INST} {answer.strip()} "
        tokens += tokenizer.encode(text, bos=True, eos=True)
    tokens += tokenizer.encode(f"{B_INST} {msgs[-1][1].strip()} {E_INST}", bos=True, eos=False)
    return tokens


def _step_format_tokens(tokenizer: Tokenizer, dialog: Sequence[Message]) -> list[int]:
    """70B Instruct: `` Source: {role}[\\nDestination: {dest}]\\n\\n {content}<step>`` turns."""
    assert tokenizer.step_id is not None
    if dialog[0]["role"] != "system":
        dialog = [Message(role="system", content=""), *dialog]
    tokens = [tokenizer.bos_id]
    for msg in dialog:
        header = f" Source: {msg['role'].strip()}"
        if msg.get("destination") is not None:
            header += f"\nDestination: {msg['destination'].strip()}"
        tokens += tokenizer.encode(header, bos=False, eos=False)
        if msg["content"]:
            tokens += tokenizer.encode("\n\n " + msg["content"].strip(), bos=False, eos=False)
        tokens.append(tokenizer.step_id)
    tokens += tokenizer.encode(" Source: assistant\nDestination: user", bos=False, eos=False)
    tokens += tokenizer.encode("\n\n ", bos=False, eos=False)
    return tokens
