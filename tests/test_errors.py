"""Every bad input gets a typed error naming the bad value; graceful edge cases just work.

Each table row is (call, exception type, regex the message must match). The calls take a
``Ctx`` holding a built model (max_seq_len 32, max_batch_size 2), its tokenizer, a model whose
tokenizer has no infilling pieces, and helpers that write broken checkpoints.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from codellama import (
    CheckpointError,
    CheckpointNotFoundError,
    CodeLlamaError,
    ConfigError,
    DistributedError,
    Llama,
    NumericalError,
    OutOfMemoryError,
    OutputExistsError,
    PromptError,
    PromptTooLongError,
    SamplingParams,
    Tokenizer,
    UnknownWeightError,
    UnsupportedError,
    chat_prompt_tokens,
    infilling_prompt_tokens,
)
from codellama.demo import train_tokenizer

from .conftest import GQA_ARGS

MAX_SEQ_LEN = 32
MAX_BATCH = 2
VOCAB = 512  # the tiny test tokenizers' vocabulary


def _build(ckpt: Path, tokenizer: Path | None = None, **kw: Any) -> Llama:
    kw.setdefault("device", "cpu")
    kw.setdefault("dtype", "float32")
    tok = tokenizer or ckpt / "tokenizer.model"
    return Llama.build(str(ckpt), str(tok), MAX_SEQ_LEN, MAX_BATCH, **kw)


@dataclass
class Ctx:
    ckpt: Path  # a good checkpoint (GQA_ARGS, vocab 512)
    tmp: Path
    llama: Llama
    plain: Llama  # its tokenizer has no infilling pieces (like Code Llama - Python)
    small_tokenizer: Path  # a tokenizer with 400 pieces
    no_bos_tokenizer: Path  # a SentencePiece model without BOS/EOS pieces

    @property
    def tok(self) -> Tokenizer:
        return self.llama.tokenizer

    def copy(self, name: str) -> Path:
        """A copy of the good checkpoint (shards linked, not copied) to break."""
        d = self.tmp / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        for f in self.ckpt.iterdir():
            if f.suffix == ".pth":
                (d / f.name).symlink_to(f)
            else:
                shutil.copyfile(f, d / f.name)
        return d

    def with_params(self, name: str, text: str | None = None, **changes: Any) -> Path:
        """A checkpoint whose params.json is ``text``, or the good one with ``changes``
        (a value of ``...`` deletes the key)."""
        d = self.copy(name)
        if text is None:
            params = json.loads((d / "params.json").read_text())
            for k, v in changes.items():
                if v is ...:
                    params.pop(k, None)
                else:
                    params[k] = v
            text = json.dumps(params)
        (d / "params.json").write_text(text)
        return d

    def kwargs(self, **override: Any) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            ckpt_dir=str(self.ckpt),
            tokenizer_path=str(self.ckpt / "tokenizer.model"),
            max_seq_len=MAX_SEQ_LEN,
            max_batch_size=MAX_BATCH,
            device="cpu",
            dtype="float32",
        )
        kw.update(override)
        return kw


@pytest.fixture(scope="module")
def ctx(make_checkpoint, plain_tokenizer_path, tmp_path_factory) -> Ctx:
    ckpt = make_checkpoint(GQA_ARGS)
    plain_ckpt = make_checkpoint(GQA_ARGS, tokenizer=plain_tokenizer_path)
    tmp = tmp_path_factory.mktemp("broken")
    (tmp / "empty").mkdir()
    small = train_tokenizer(tmp / "small" / "tokenizer.model", vocab_size=400)
    return Ctx(ckpt, tmp, _build(ckpt), _build(plain_ckpt), small, _no_bos_tokenizer(tmp))


def _no_bos_tokenizer(tmp: Path) -> Path:
    """A SentencePiece model trained without BOS/EOS (``bos_id=eos_id=-1``)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["def f(x):", "    return x + 1", "print(f(2))"] * 20),
        model_writer=out, vocab_size=40, hard_vocab_limit=False, bos_id=-1, eos_id=-1, pad_id=-1,
        unk_id=0,
        byte_fallback=False, num_threads=1, minloglevel=2,
    )  # fmt: skip
    path = tmp / "no-bos" / "tokenizer.model"
    path.parent.mkdir()
    path.write_bytes(out.getvalue())
    return path


def esc(*parts: str) -> str:
    """A regex matching the literal ``parts`` in this order, anything between them."""
    return ".*".join(re.escape(p) for p in parts)


def _raises(call: Callable[[Ctx], object], ctx: Ctx, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match) as info:
        call(ctx)
    assert isinstance(info.value, CodeLlamaError)


# --------------------------------------------------------------------------- Llama.build


def _build_with(**override: Any) -> Callable[[Ctx], object]:
    """Build with the good checkpoint except for ``override`` (values may be callables of ctx)."""

    def call(c: Ctx) -> object:
        kw = {k: (v(c) if callable(v) else v) for k, v in override.items()}
        return Llama.build(**c.kwargs(**kw))

    return call


def _params_case(text: str | None = None, **changes: Any) -> Callable[[Ctx], object]:
    def call(c: Ctx) -> object:
        d = c.with_params("params", text, **changes)
        return _build(d)

    return call


def _remove(name: str) -> Callable[[Ctx], object]:
    def call(c: Ctx) -> object:
        d = c.copy(f"without-{name}")
        (d / name).unlink()
        return _build(d)

    return call


def _bad_shard(kind: str) -> Callable[[Ctx], object]:
    """A checkpoint whose consolidated.00.pth is truncated / unsafe / missing a key."""

    def call(c: Ctx) -> object:
        d = c.copy(f"shard-{kind}")
        shard = d / "consolidated.00.pth"
        good = (c.ckpt / "consolidated.00.pth").read_bytes()
        shard.unlink()
        if kind == "truncated":
            shard.write_bytes(good[: len(good) // 2])
        elif kind == "unsafe":
            torch.save({"norm.weight": torch.ones(2), "code": _NotATensor()}, shard)
        elif kind == "dangling-link":
            shard.symlink_to(d / "deleted.pth")  # e.g. a cache of links whose blobs are gone
        elif kind == "fifo":
            os.mkfifo(shard)  # opening it would wait for a writer for ever
        elif kind == "directory":
            shard.mkdir()
        elif kind == "missing-key":
            sd = torch.load(c.ckpt / "consolidated.00.pth", weights_only=True)
            del sd["norm.weight"]
            torch.save(sd, shard)
        return _build(d)

    return call


class _NotATensor:
    """Pickled into a shard: loading it would need to run code, so it is refused."""


def _vocab_mismatch(vocab_in_params: object) -> Callable[[Ctx], object]:
    """A 512-row checkpoint opened with a 400-piece tokenizer."""

    def call(c: Ctx) -> object:
        d = c.with_params(f"vocab-{vocab_in_params}", vocab_size=vocab_in_params)
        return _build(d, tokenizer=c.small_tokenizer)

    return call


def _non_int_cases(name: str, values: list[object]) -> list[Any]:
    return [
        pytest.param(
            _build_with(**{name: v}),
            ConfigError,
            re.escape(f"{name} must be a positive integer (>= 1), got {v!r}"),
            id=f"{name}={v!r}",
        )
        for v in values
    ]


BUILD_CASES = [
    # paths
    pytest.param(
        _build_with(ckpt_dir=lambda c: str(c.tmp / "no-such-ckpt")),
        CheckpointNotFoundError, esc("no-such-ckpt", "does not exist"),
        id="ckpt_dir-missing",
    ),
    pytest.param(
        _build_with(ckpt_dir=lambda c: str(c.ckpt / "consolidated.00.pth")),
        CheckpointNotFoundError, esc("consolidated.00.pth", "is a file, not a directory"),
        id="ckpt_dir-is-a-file",
    ),
    pytest.param(
        _build_with(ckpt_dir=lambda c: str(c.tmp / "empty")),
        CheckpointNotFoundError, esc("no checkpoint files (*.pth) in", "empty"),
        id="ckpt_dir-without-shards",
    ),
    pytest.param(
        _build_with(ckpt_dir=None), ConfigError, esc("ckpt_dir must be a path", "None"),
        id="ckpt_dir-None",
    ),
    pytest.param(
        _build_with(tokenizer_path=lambda c: str(c.tmp / "no-such.model")),
        CheckpointNotFoundError, esc("no-such.model", "does not exist"),
        id="tokenizer_path-missing",
    ),
    pytest.param(
        _build_with(tokenizer_path=lambda c: str(c.ckpt)),
        CheckpointNotFoundError, esc("is a directory, not a file", "tokenizer.model"),
        id="tokenizer_path-is-a-dir",
    ),
    pytest.param(
        _build_with(tokenizer_path=lambda c: str(c.ckpt / "params.json")),
        CheckpointError, esc("params.json", "is not a SentencePiece model"),
        id="tokenizer_path-not-sentencepiece",
    ),
    pytest.param(
        _build_with(tokenizer_path=42), ConfigError, esc("tokenizer_path must be a path", "42"),
        id="tokenizer_path-int",
    ),
    pytest.param(
        _build_with(ckpt_dir=123), ConfigError,
        esc("ckpt_dir must be a path", "got int: 123", "a name of digits as a number", "./123"),
        id="ckpt_dir-digits-from-a-command-line",
    ),
    pytest.param(
        _remove("params.json"), CheckpointNotFoundError, esc("params.json", "does not exist"),
        id="params.json-missing",
    ),
    # sizes
    *_non_int_cases("max_seq_len", [0, -5, 1.5, "128", None, True]),
    *_non_int_cases("max_batch_size", [0, -1, 2.0]),
    *_non_int_cases("prefill_chunk_size", [0, -1, "512"]),
    pytest.param(
        _build_with(compile="yes"), ConfigError,
        re.escape("compile must be True or False, got 'yes'"), id="compile-string",
    ),
    pytest.param(
        _build_with(max_seq_len=10**9), OutOfMemoryError,
        esc("max_seq_len=1000000000 x max_batch_size=2 needs a", "KV cache", "GiB free",
            "lower max_seq_len (at most"),
        id="max_seq_len-beyond-memory",
    ),
    pytest.param(
        _build_with(max_batch_size=10**8), OutOfMemoryError,
        esc("max_batch_size=100000000", "lower max_batch_size"), id="max_batch_size-beyond-memory",
    ),
    # model parallelism
    pytest.param(
        _build_with(model_parallel_size=2), ConfigError,
        esc("model_parallel_size=2 but 1 process(es) are running", "model_parallel_size=1"),
        id="model_parallel_size-exceeds-world",
    ),
    pytest.param(
        _build_with(model_parallel_size=0), ConfigError,
        re.escape("model_parallel_size must be a positive integer, got 0"),
        id="model_parallel_size=0",
    ),
    pytest.param(
        _build_with(model_parallel_size="1"), ConfigError,
        re.escape("model_parallel_size must be a positive integer, got '1'"),
        id="model_parallel_size-str",
    ),
    # device and dtype
    pytest.param(
        _build_with(device="gpu"), ConfigError, esc("device='gpu' is not a device", "'cpu'"),
        id="device=gpu",
    ),
    pytest.param(
        _build_with(device="meta"), ConfigError, esc("device='meta' is not supported", "'cpu'"),
        id="device=meta",
    ),
    pytest.param(
        _build_with(device=3.5), ConfigError, re.escape("device=3.5 is not a device"),
        id="device-float",
    ),
    pytest.param(
        _build_with(device="cpu:1"), ConfigError,
        re.escape("device='cpu:1': there is one cpu device; use 'cpu'"), id="device=cpu:1",
    ),
    pytest.param(
        _build_with(tokenizer_path=lambda c: c.no_bos_tokenizer), CheckpointError,
        esc("has no BOS/EOS pieces (bos_id -1, eos_id -1)", "<s>=1 and </s>=2"),
        id="tokenizer-without-bos",
    ),
    pytest.param(
        _build_with(device="cuda"), ConfigError, esc("device='cuda'", "device='cpu'"),
        id="device=cuda-without-cuda",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
    ),
    *[
        pytest.param(
            _build_with(dtype=v), ConfigError,
            esc(f"dtype={v!r} is not supported", "'float32', 'bfloat16', 'float16'"),
            id=f"dtype={v!r}",
        )
        for v in ["float64", "int8", "fp8", torch.int64, 16]
    ],
    *[
        pytest.param(
            _build_with(seed=v), ConfigError,
            re.escape(f"seed must be an integer in [-2**63, 2**64), got {v!r}"), id=f"seed={v!r}",
        )
        for v in ["x", 2**64, -(2**63) - 1]
    ],
]  # fmt: skip

PARAMS_CASES = [
    pytest.param(_params_case("{dim: 64"), ConfigError, esc("params.json", "is not valid JSON"),
                 id="invalid-json"),
    pytest.param(_params_case("[64, 2]"), ConfigError,
                 esc("params.json", "must hold a JSON object", "got a JSON list"), id="json-list"),
    pytest.param(_params_case(foo=1, bar=2), ConfigError,
                 esc("unknown keys ['bar', 'foo']", "known keys are"), id="unknown-keys"),
    pytest.param(_params_case(n_heads=5), ConfigError,
                 esc("n_heads=5 must divide dim=64", "divisors of 64"), id="n_heads-not-dividing-dim"),
    pytest.param(_params_case(n_kv_heads=16), ConfigError,
                 re.escape("n_kv_heads=16 must be a positive divisor of n_heads=8"),
                 id="n_kv_heads-above-n_heads"),
    pytest.param(_params_case(n_kv_heads=3), ConfigError,
                 re.escape("n_kv_heads=3 must be a positive divisor of n_heads=8"),
                 id="n_kv_heads-not-dividing-n_heads"),
    pytest.param(_params_case(n_kv_heads=-4), ConfigError, re.escape("n_kv_heads=-4 must be"),
                 id="n_kv_heads-negative"),
    pytest.param(_params_case(n_kv_heads="4"), ConfigError, re.escape("n_kv_heads='4' must be"),
                 id="n_kv_heads-str"),
    pytest.param(_params_case(dim=-64), ConfigError,
                 re.escape("dim must be a positive integer, got -64"), id="dim-negative"),
    pytest.param(_params_case(dim="64"), ConfigError,
                 re.escape("dim must be a positive integer, got '64'"), id="dim-str"),
    pytest.param(_params_case(dim=60, n_heads=4, n_kv_heads=...), ConfigError,
                 re.escape("head_dim = dim/n_heads = 15 must be even"), id="head_dim-odd"),
    pytest.param(_params_case(n_layers=0), ConfigError,
                 re.escape("n_layers must be a positive integer, got 0"), id="n_layers-zero"),
    pytest.param(_params_case(n_heads=8.0), ConfigError,
                 re.escape("n_heads must be a positive integer, got 8.0"), id="n_heads-float"),
    pytest.param(_params_case(multiple_of=-16), ConfigError,
                 re.escape("multiple_of must be a positive integer, got -16"),
                 id="multiple_of-negative"),
    pytest.param(_params_case(norm_eps=-1e-5), ConfigError,
                 re.escape("norm_eps must be a finite number > 0, got -1e-05"),
                 id="norm_eps-negative"),
    pytest.param(_params_case(norm_eps="1e-5"), ConfigError,
                 re.escape("norm_eps must be a finite number > 0, got '1e-5'"), id="norm_eps-str"),
    pytest.param(_params_case(rope_theta=0), ConfigError,
                 re.escape("rope_theta must be a finite number > 0, got 0"), id="rope_theta-zero"),
    pytest.param(_params_case(rope_theta=float("inf")), ConfigError,
                 re.escape("rope_theta must be a finite number > 0, got inf"), id="rope_theta-inf"),
    pytest.param(_params_case(rope_theta=1e-300), ConfigError,
                 re.escape("rope_theta must be a finite number > 1 (Code Llama's is 1000000"),
                 id="rope_theta-below-one"),
    pytest.param(_params_case(ffn_dim_multiplier=1e-9), ConfigError,
                 esc("ffn_dim_multiplier=1e-09 makes the feed-forward size 0"),
                 id="ffn_dim_multiplier-tiny"),
    pytest.param(_params_case(max_seq_len=16, max_batch_size=1), ConfigError,
                 esc("params.json has max_batch_size=1, max_seq_len=16",
                     f"the build asks for max_batch_size={MAX_BATCH}, max_seq_len={MAX_SEQ_LEN}",
                     "remove them from params.json"),
                 id="params-with-build-arguments"),
    pytest.param(_params_case(ffn_dim_multiplier="1.3"), ConfigError,
                 re.escape("ffn_dim_multiplier must be a finite number > 0, got '1.3'"),
                 id="ffn_dim_multiplier-str"),
    pytest.param(_params_case(ffn_dim_multiplier=-1.3), ConfigError,
                 re.escape("ffn_dim_multiplier must be a finite number > 0, got -1.3"),
                 id="ffn_dim_multiplier-negative"),
    pytest.param(_params_case(vocab_size=1000), ConfigError,
                 esc("vocab_size=1000", f"has {VOCAB} pieces", "use the tokenizer.model"),
                 id="vocab_size-differs-from-tokenizer"),
    pytest.param(_params_case(vocab_size=-7), ConfigError, esc("vocab_size=-7", f"{VOCAB} pieces"),
                 id="vocab_size-negative"),
]  # fmt: skip

CHECKPOINT_CASES = [
    pytest.param(
        _vocab_mismatch(...), CheckpointError,
        esc("shape mismatches", "tok_embeddings.weight in consolidated.00.pth",
            f"({VOCAB}, 64), expected (400, 64)"),
        id="embedding-rows-differ-from-tokenizer",
    ),
    pytest.param(
        _vocab_mismatch(-1), CheckpointError,
        esc("output.weight in consolidated.00.pth", f"({VOCAB}, 64), expected (400, 64)"),
        id="embedding-rows-differ-vocab_size=-1",
    ),
    pytest.param(_bad_shard("truncated"), CheckpointError,
                 esc("consolidated.00.pth", "truncated or corrupt"), id="shard-truncated"),
    pytest.param(_bad_shard("unsafe"), CheckpointError,
                 esc("refusing to load", "consolidated.00.pth"), id="shard-with-code"),
    pytest.param(_bad_shard("dangling-link"), CheckpointNotFoundError,
                 esc("consolidated.00.pth", "does not exist (a link to a missing file)",
                     "download.sh"), id="shard-dangling-link"),
    pytest.param(_bad_shard("fifo"), CheckpointError,
                 esc("consolidated.00.pth", "is not a regular file"), id="shard-named-pipe",
                 marks=pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")),
    pytest.param(_bad_shard("directory"), CheckpointError,
                 esc("consolidated.00.pth", "is a directory"), id="shard-directory"),
    pytest.param(_bad_shard("missing-key"), CheckpointError,
                 esc("missing keys: norm.weight (not in consolidated.00.pth)"),
                 id="shard-missing-key"),
]  # fmt: skip


@pytest.mark.parametrize("call, exc, match", BUILD_CASES + PARAMS_CASES + CHECKPOINT_CASES)
def test_build_rejects_bad_input(ctx, call, exc, match):
    _raises(call, ctx, exc, match)


# --------------------------------------------------------------------------- generation APIs


def _prompts_case(prompts: object) -> Callable[[Ctx], object]:
    return lambda c: c.llama.text_completion(prompts, max_gen_len=2)  # type: ignore[arg-type]


def _sampling_case(**kw: Any) -> Callable[[Ctx], object]:
    return lambda c: c.llama.text_completion(["x"], **{"max_gen_len": 2, **kw})


def _tokens_case(prompt_tokens: object, **kw: Any) -> Callable[[Ctx], object]:
    return lambda c: c.llama.generate(prompt_tokens, 2, **kw)  # type: ignore[arg-type]


def _results_case(**kw: Any) -> Callable[[Ctx], object]:
    return lambda c: c.llama.generate_results([[1, 5]], 2, **kw)


def _chat_case(dialogs: object) -> Callable[[Ctx], object]:
    return lambda c: c.llama.chat_completion(dialogs, max_gen_len=2)  # type: ignore[arg-type]


def _infill_case(prefixes: object, suffixes: object, plain: bool = False) -> Callable:
    def call(c: Ctx) -> object:
        llama = c.plain if plain else c.llama
        return llama.text_infilling(prefixes, suffixes, max_gen_len=2)  # type: ignore[arg-type]

    return call


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
S = {"role": "system", "content": "be brief"}

PROMPT_CASES = [
    pytest.param(_prompts_case("def f("), PromptError,
                 esc("prompts must be a list of strings, got str: 'def f('",
                     "wrap a single one in a list: ['def f(']"), id="completion-str"),
    pytest.param(_prompts_case(None), PromptError,
                 re.escape("prompts must be a list of strings, got NoneType: None"),
                 id="completion-None"),
    pytest.param(_prompts_case(42), PromptError,
                 re.escape("prompts must be a list of strings, got int: 42"), id="completion-int"),
    pytest.param(_prompts_case([1]), PromptError,
                 re.escape("prompts[0] must be a str, got int: 1"), id="completion-int-item"),
    pytest.param(_prompts_case(["ok", None]), PromptError,
                 re.escape("prompts[1] must be a str, got NoneType: None"),
                 id="completion-None-item"),
    pytest.param(_prompts_case([b"x = 1"]), PromptError,
                 re.escape("prompts[0] must be a str, got bytes: b'x = 1'"),
                 id="completion-bytes-item"),
]  # fmt: skip

SAMPLING_CASES = [
    pytest.param(_sampling_case(temperature=-0.1), PromptError,
                 re.escape("temperature must be >= 0 (0 means greedy), got -0.1"),
                 id="temperature-negative"),
    pytest.param(_sampling_case(temperature=float("nan")), PromptError,
                 re.escape("temperature must be a finite number, got nan"), id="temperature-nan"),
    pytest.param(_sampling_case(temperature="hot"), PromptError,
                 re.escape("temperature must be a finite number (int or float), got 'hot'"), id="temperature-str"),
    *[
        pytest.param(_sampling_case(top_p=v), PromptError,
                     re.escape(f"top_p must be in [0, 1], got {v!r}"), id=f"top_p={v!r}")
        for v in [1.5, -0.2, -0.0001]
    ],
    pytest.param(_sampling_case(top_p=None), PromptError,
                 re.escape("top_p must be a finite number (int or float), got None"), id="top_p-None"),
    pytest.param(_sampling_case(top_k=-1), PromptError,
                 re.escape("top_k must be an integer >= 0 (0 = off), got -1"), id="top_k-negative"),
    pytest.param(_sampling_case(top_k=2.5), PromptError,
                 re.escape("top_k must be an integer >= 0 (0 = off), got 2.5"), id="top_k-float"),
    pytest.param(_sampling_case(min_p=1.5), PromptError,
                 re.escape("min_p must be in [0, 1] (0 = off), got 1.5"), id="min_p-above-one"),
    pytest.param(_sampling_case(min_p=-0.1), PromptError,
                 re.escape("min_p must be in [0, 1] (0 = off), got -0.1"), id="min_p-negative"),
    pytest.param(_sampling_case(repetition_penalty=0), PromptError,
                 re.escape("repetition_penalty must be > 0 (1 = off), got 0"),
                 id="repetition_penalty-zero"),
    pytest.param(_sampling_case(top_q=0.5), PromptError,
                 esc("unknown argument(s) ['top_q']", "'top_k'"), id="unknown-kwarg"),
    *[
        pytest.param(_sampling_case(max_gen_len=v), PromptError,
                     re.escape(f"max_gen_len must be an integer >= 0, got {v!r}"),
                     id=f"max_gen_len={v!r}")
        for v in [-1, 2.5, "8", True]
    ],
    pytest.param(lambda c: c.llama.text_completion(["x"], stop_token=5), PromptError,
                 esc("unknown argument(s) ['stop_token']"), id="completion-stop_token"),
    pytest.param(lambda c: c.llama.chat_completion([[{"role": "user", "content": "hi"}]],
                                                   echo=True), PromptError,
                 esc("unknown argument(s) ['echo']"), id="chat-echo"),
    pytest.param(lambda c: c.llama.text_infilling(["a"], ["b"], stop_strings=["x"]), PromptError,
                 esc("unknown argument(s) ['stop_strings']"), id="infilling-stop_strings"),
    pytest.param(lambda c: c.llama.text_completion(["x"], logprobs="no"), PromptError,
                 esc("logprobs must be True or False, got 'no'"), id="logprobs-str"),
    pytest.param(lambda c: c.llama.text_infilling(["a"], ["b"], suffix_first="yes"),
                 PromptError, esc("suffix_first must be True or False, got 'yes'"),
                 id="suffix_first-str"),
    pytest.param(lambda c: c.llama.text_completion([], temperature=-1), PromptError,
                 re.escape("temperature must be >= 0 (0 means greedy), got -1"),
                 id="bad-temperature-with-empty-batch"),
    pytest.param(lambda c: c.llama.text_completion([], max_gen_len=-3), PromptError,
                 re.escape("max_gen_len must be an integer >= 0, got -3"),
                 id="bad-max_gen_len-with-empty-batch"),
]  # fmt: skip

TOKEN_CASES = [
    pytest.param(_tokens_case("abc"), PromptError,
                 re.escape("prompt_tokens must be a list of token-id lists, got str: 'abc'"),
                 id="tokens-str"),
    pytest.param(_tokens_case(None), PromptError,
                 re.escape("prompt_tokens must be a list of token-id lists, got NoneType: None"),
                 id="tokens-None"),
    pytest.param(_tokens_case([bytearray(b"def f")]), PromptError,
                 re.escape("prompt 0 must be a list of token ids, got bytearray"),
                 id="tokens-bytearray-prompt"),
    pytest.param(_tokens_case([1, 5, 9]), PromptError,
                 esc("prompt 0 must be a list of token ids, got int: 1", "wrap a single prompt"),
                 id="tokens-flat-list"),
    pytest.param(_tokens_case([[1, "a"]]), PromptError,
                 re.escape("prompt 0 has token ids that are not integers: ['a']"),
                 id="tokens-str-id"),
    pytest.param(_tokens_case([[1, 2.0]]), PromptError,
                 re.escape("prompt 0 has token ids that are not integers: [2.0]"),
                 id="tokens-float-id"),
    pytest.param(_tokens_case([[1, True]]), PromptError,
                 re.escape("prompt 0 has token ids that are not integers: [True]"),
                 id="tokens-bool-id"),
    pytest.param(_tokens_case([[1, VOCAB]]), PromptError,
                 re.escape(f"prompt 0 has token ids outside the vocabulary [0, {VOCAB}): [{VOCAB}]"),
                 id="tokens-id-too-large"),
    pytest.param(_tokens_case([[1], [1, -1]]), PromptError,
                 re.escape(f"prompt 1 has token ids outside the vocabulary [0, {VOCAB}): [-1]"),
                 id="tokens-id-negative"),
    pytest.param(_tokens_case([[]]), PromptError,
                 esc("prompt 0 is empty", "BOS, id 1"), id="tokens-empty-prompt"),
    pytest.param(_tokens_case([[1] * (MAX_SEQ_LEN + 1)]), PromptTooLongError,
                 re.escape(f"prompt 0 has {MAX_SEQ_LEN + 1} tokens but max_seq_len is "
                           f"{MAX_SEQ_LEN}; shorten it by 1 token or build with max_seq_len >= "
                           f"{MAX_SEQ_LEN + 1}"),
                 id="tokens-too-long"),
    pytest.param(_tokens_case([[1, 5]], stop_token="eos"), PromptError,
                 esc("stop token 'eos' is not an integer token id", "eos_id (2)"),
                 id="stop_token-str"),
    pytest.param(_tokens_case([[1, 5]], stop_token=1.5), PromptError,
                 re.escape("stop token 1.5 is not an integer token id"), id="stop_token-float"),
    pytest.param(_tokens_case([[1, 5]], stop_token=-5), PromptError,
                 re.escape(f"stop token -5 is outside the vocabulary [0, {VOCAB}), so it would never"),
                 id="stop_token-negative"),
    pytest.param(_tokens_case([[1, 5]], stop_token=VOCAB), PromptError,
                 re.escape(f"stop token {VOCAB} is outside the vocabulary"), id="stop_token-past-vocab"),
    pytest.param(_results_case(stop_tokens="2"), PromptError,
                 re.escape("stop_tokens must be a list of token ids, got '2'"),
                 id="stop_tokens-str"),
    pytest.param(_results_case(sampling={"temperature": 0}), PromptError,
                 re.escape("sampling must be a SamplingParams, got dict"), id="sampling-dict"),
    *[
        pytest.param(_results_case(seed=v), PromptError,
                     re.escape(f"seed must be None or an integer in [-2**63, 2**64), got {v!r}"),
                     id=f"seed={v!r}")
        for v in ["x", 2**70]
    ],
]  # fmt: skip

CHAT_CASES = [
    pytest.param(_chat_case("hi"), PromptError,
                 re.escape("dialogs must be a list of dialogs (each a list of messages), got str: 'hi'"),
                 id="chat-str"),
    pytest.param(_chat_case(None), PromptError,
                 re.escape("dialogs must be a list of dialogs (each a list of messages), got NoneType"),
                 id="chat-None"),
    pytest.param(_chat_case([U]), PromptError,
                 esc("dialog 0: a dialog must be a list of messages", "got dict",
                     "pass [[message, ...]]"),
                 id="chat-unwrapped-dialog"),
    pytest.param(_chat_case([[]]), PromptError,
                 re.escape("dialog 0: a dialog needs at least one user message, got an empty list"),
                 id="chat-empty-dialog"),
    pytest.param(_chat_case([[{"role": "bot", "content": "x"}]]), PromptError,
                 esc("dialog 0: message 0 has role 'bot'", "'system', 'user' or 'assistant'"),
                 id="chat-unknown-role"),
    pytest.param(_chat_case([[{"content": "x"}]]), PromptError,
                 re.escape("message 0 has role None"), id="chat-no-role"),
    pytest.param(_chat_case([[U, U]]), PromptError,
                 esc("roles out of order at 'user' message 1", "alternate"),
                 id="chat-user-user"),
    pytest.param(_chat_case([[A, U]]), PromptError,
                 re.escape("roles out of order at 'assistant' message 0"),
                 id="chat-starts-with-assistant"),
    pytest.param(_chat_case([[S, S, U]]), PromptError,
                 re.escape("roles out of order at 'system' message 1"), id="chat-two-systems"),
    pytest.param(_chat_case([[U, A]]), PromptError,
                 re.escape("the last message must be from 'user', got 'assistant'"),
                 id="chat-ends-with-assistant"),
    pytest.param(_chat_case([[S]]), PromptError,
                 re.escape("the last message must be from 'user', got 'system'"),
                 id="chat-system-only"),
    pytest.param(_chat_case([[{"role": "user"}]]), PromptError,
                 re.escape("message 0 (user) needs a 'content' string, got None"),
                 id="chat-no-content"),
    pytest.param(_chat_case([[{"role": "user", "content": 42}]]), PromptError,
                 re.escape("message 0 (user) needs a 'content' string, got 42"),
                 id="chat-int-content"),
    pytest.param(_chat_case([[{"role": "user", "content": ["a"]}]]), PromptError,
                 re.escape("needs a 'content' string, got ['a']"), id="chat-list-content"),
    pytest.param(_chat_case([["hi"]]), PromptError,
                 re.escape("dialog 0: message 0 must be a dict, got str"), id="chat-str-message"),
    pytest.param(_chat_case([[{**U, "destination": 5}]]), PromptError,
                 re.escape("message 0 has a non-string destination 5"),
                 id="chat-int-destination"),
    pytest.param(_chat_case([[{"role": "user", "content": "x", "contnet": "y"}]]), PromptError,
                 esc("dialog 0: message 0 has unknown keys ['contnet']", "'role', 'content'"),
                 id="chat-unknown-key"),
    pytest.param(_chat_case([[U], [U, A]]), PromptError,
                 re.escape("dialog 1: the last message must be from 'user'"),
                 id="chat-second-dialog-bad"),
    pytest.param(_chat_case([[{"role": "user", "content": "x " * 40}]]), PromptTooLongError,
                 esc("prompt 0 has", f"tokens but max_seq_len is {MAX_SEQ_LEN}"),
                 id="chat-too-long"),
]  # fmt: skip

INFILL_CASES = [
    pytest.param(_infill_case(["a"], ["b"], plain=True), UnsupportedError,
                 esc("has no infilling pieces", "infilling is supported by Code Llama 7B and 13B "
                     "(base and Instruct)"), id="infill-unsupported"),
    pytest.param(_infill_case([], [], plain=True), UnsupportedError,
                 esc("infilling is supported by Code Llama 7B and 13B"),
                 id="infill-unsupported-empty-batch"),
    pytest.param(lambda c: infilling_prompt_tokens(c.plain.tokenizer, "a", "b"), UnsupportedError,
                 esc("infilling is supported by Code Llama 7B and 13B"),
                 id="infill-tokens-unsupported"),
    pytest.param(_infill_case(["a", "b"], ["c"]), PromptError,
                 re.escape("got 2 prefixes but 1 suffixes; pass one suffix per prefix"),
                 id="infill-count-mismatch"),
    pytest.param(_infill_case("a", ["b"]), PromptError,
                 re.escape("prefixes must be a list of strings, got str: 'a'"),
                 id="infill-prefixes-str"),
    pytest.param(_infill_case(["a"], [None]), PromptError,
                 re.escape("suffixes[0] must be a str, got NoneType: None"),
                 id="infill-None-suffix"),
    pytest.param(_infill_case([1], ["b"]), PromptError,
                 re.escape("prefixes[0] must be a str, got int: 1"), id="infill-int-prefix"),
    pytest.param(_infill_case(["x " * 40], [""]), PromptTooLongError,
                 esc("prompt 0 has", f"tokens but max_seq_len is {MAX_SEQ_LEN}"),
                 id="infill-too-long"),
    pytest.param(lambda c: infilling_prompt_tokens(c.tok, 1, "b"), PromptError,  # type: ignore[arg-type]
                 re.escape("prefix must be a str, got int: 1"), id="infill-tokens-int-prefix"),
    pytest.param(lambda c: chat_prompt_tokens(c.tok, [A]), PromptError,
                 re.escape("roles out of order at 'assistant' message 0"),
                 id="chat-tokens-bad-dialog"),
    pytest.param(lambda c: c.tok.encode(None, bos=True, eos=False), PromptError,  # type: ignore[arg-type]
                 re.escape("expected a str to encode, got NoneType: None"), id="encode-None"),
    pytest.param(lambda c: infilling_prompt_tokens(c.tok, "a", "b", suffix_first="no"),  # type: ignore[arg-type]
                 PromptError, re.escape("suffix_first must be True or False, got 'no'"),
                 id="infill-tokens-str-suffix-first"),
    pytest.param(lambda c: c.tok.encode("x", bos="yes", eos=False), PromptError,  # type: ignore[arg-type]
                 re.escape("bos must be True or False, got 'yes'"), id="encode-str-bos"),
    pytest.param(lambda c: c.tok.encode("x", bos=2, eos=False), PromptError,
                 re.escape("bos must be True or False, got 2"), id="encode-int-bos"),
]  # fmt: skip

TEXT_CASES = [
    pytest.param(lambda c: c.llama.text_completion(["a", "b\udc80"]), PromptError,
                 re.escape("prompts[1] holds '\\udc80' at offset 1, a lone surrogate"),
                 id="completion-lone-surrogate"),
    pytest.param(_infill_case(["a"], ["\ud800"]), PromptError,
                 re.escape("suffixes[0] holds '\\ud800' at offset 0"),
                 id="infill-lone-surrogate"),
    pytest.param(_chat_case([[S, {"role": "user", "content": "x\ud800"}]]), PromptError,
                 re.escape("dialog 0: message 1 (user) content holds '\\ud800' at offset 1"),
                 id="chat-lone-surrogate"),
    pytest.param(lambda c: c.tok.decode(None), PromptError,  # type: ignore[arg-type]
                 re.escape("expected a list of token ids, got NoneType"), id="decode-None"),
    pytest.param(lambda c: c.tok.decode("abc"), PromptError,  # type: ignore[arg-type]
                 re.escape("expected a list of token ids, got str: 'abc'"), id="decode-str"),
    pytest.param(lambda c: c.tok.decode([1.5, 2.7]), PromptError,  # type: ignore[list-item]
                 re.escape("token ids must be integers, got float: 1.5"), id="decode-floats"),
    pytest.param(lambda c: c.tok.decode([[1, 2]]), PromptError,  # type: ignore[list-item]
                 re.escape("token ids must be integers, got list: [1, 2]"), id="decode-nested"),
    pytest.param(lambda c: c.tok.token_piece(-1), PromptError,
                 re.escape(f"token id -1 is outside the vocabulary [0, {VOCAB})"),
                 id="token-piece-padding"),
]  # fmt: skip


@pytest.mark.parametrize(
    "call, exc, match",
    PROMPT_CASES + SAMPLING_CASES + TOKEN_CASES + CHAT_CASES + INFILL_CASES + TEXT_CASES,
)
def test_generation_rejects_bad_input(ctx, call, exc, match):
    _raises(call, ctx, exc, match)


def test_too_long_text_prompt_names_both_lengths(ctx):
    text = "def add(a, b):\n    return a + b\n" * 4
    n = len(ctx.tok.encode(text, bos=True, eos=False))
    assert n > MAX_SEQ_LEN
    with pytest.raises(PromptTooLongError) as info:
        ctx.llama.text_completion(["short", text], max_gen_len=4)
    assert str(info.value) == (
        f"prompt 1 has {n} tokens but max_seq_len is {MAX_SEQ_LEN}; shorten it by "
        f"{n - MAX_SEQ_LEN} tokens or build with max_seq_len >= {n}"
    )
    assert isinstance(info.value, PromptError) and isinstance(info.value, ValueError)


def test_every_error_is_a_codellama_error_and_a_builtin():
    for cls, builtin in [
        (ConfigError, ValueError),
        (CheckpointError, ValueError),
        (CheckpointNotFoundError, FileNotFoundError),
        (PromptError, ValueError),
        (PromptTooLongError, PromptError),
        (UnsupportedError, ValueError),
        (NumericalError, RuntimeError),
        (DistributedError, RuntimeError),
        (OutOfMemoryError, MemoryError),
        (OutOfMemoryError, ValueError),
        (OutputExistsError, FileExistsError),
        (UnknownWeightError, KeyError),
        (UnknownWeightError, CheckpointError),
    ]:
        assert issubclass(cls, CodeLlamaError) and issubclass(cls, builtin)


def test_unknown_weight_name_is_named_in_the_error():
    from codellama.checkpoint import split_dim

    with pytest.raises(UnknownWeightError) as info:
        split_dim("layers.0.attention.wqkv.weight")
    assert str(info.value) == "'layers.0.attention.wqkv.weight' is not a Code Llama parameter name"


def test_writing_into_a_non_empty_folder_raises_output_exists(tmp_path):
    from codellama.checkpoint import refuse_non_empty

    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=esc(str(tmp_path), "overwrite=True")):
        refuse_non_empty(tmp_path, overwrite=False)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_forward_beyond_max_seq_len_is_a_prompt_too_long_error(ctx):
    tokens = torch.ones((1, 4), dtype=torch.long)
    with pytest.raises(
        PromptTooLongError, match=esc("exceed max_seq_len=32", "larger max_seq_len")
    ):
        ctx.llama.model.forward(tokens, start_pos=MAX_SEQ_LEN - 2)


# --------------------------------------------------------------------------- graceful cases


def test_numpy_and_tensor_prompts_give_the_same_tokens_as_lists(ctx):
    np = pytest.importorskip("numpy")
    prompts = [[1, 20, 30, 40], [1, 50, 60]]
    want = ctx.llama.generate(prompts, 4, temperature=0.0)
    assert ctx.llama.generate([np.array(p) for p in prompts], 4, temperature=0.0) == want
    assert ctx.llama.generate([[np.int64(t) for t in p] for p in prompts], 4, temperature=0) == want
    assert ctx.llama.generate(torch.tensor([prompts[0]]), 4, temperature=0.0)[0] == want[0][:1]
    scalars = [[torch.tensor(t) for t in p] for p in prompts]  # e.g. iterating over a tensor
    assert ctx.llama.generate(scalars, 4, temperature=0.0) == want
    with pytest.raises(PromptError, match="not integers"):
        ctx.llama.generate([[torch.tensor(1.0)]], 4)


@pytest.mark.parametrize("nesting", ["batch", "prompt", "token"])
def test_prompt_tensors_on_the_meta_device_are_refused_by_name(ctx, nesting):
    ids = torch.tensor([[1, 20, 30]], device="meta")
    prompts = {"batch": ids, "prompt": [ids[0]], "token": [list(ids[0])]}[nesting]
    with pytest.raises(PromptError, match="meta device, which holds no values"):
        ctx.llama.generate(prompts, 4)


def test_empty_batches_return_empty_lists(ctx):
    llama = ctx.llama
    assert llama.text_completion([]) == []
    assert llama.text_completion([], logprobs=True, echo=True) == []
    assert llama.chat_completion([]) == []
    assert llama.text_infilling([], []) == []
    assert llama.generate([], 4) == ([], None)
    assert llama.generate([], 4, logprobs=True) == ([], [])
    assert llama.generate_results([], 4) == []


def test_empty_prompt_generates_from_bos(ctx):
    llama = ctx.llama
    out = llama.text_completion([""], temperature=0, max_gen_len=6, logprobs=True)
    from_bos, _ = llama.generate([[llama.tokenizer.bos_id]], 6, temperature=0)
    assert out[0]["generation"] == llama.tokenizer.decode(from_bos[0])
    assert len(out[0]["tokens"]) == len(from_bos[0]) == len(out[0]["logprobs"])
    echoed = llama.text_completion([""], temperature=0, max_gen_len=6, echo=True)
    assert echoed[0]["generation"] == out[0]["generation"]  # BOS decodes to nothing


def test_empty_strings_are_valid_in_infilling_and_chat(ctx):
    out = ctx.llama.text_infilling([""], [""], max_gen_len=3, temperature=0)
    assert out[0]["full_text"] == out[0]["generation"]
    chat = ctx.llama.chat_completion([[{"role": "user", "content": ""}]], max_gen_len=3)
    assert chat[0]["generation"]["role"] == "assistant"


def test_more_prompts_than_max_batch_size_keep_caller_order(ctx):
    llama = ctx.llama
    prompts = ["def f(", "", "import os\n", "x = [1, 2", "class A:\n    pass", "# é ü ✓"]
    assert len(prompts) > llama.max_batch_size
    together = llama.text_completion(prompts, temperature=0, max_gen_len=5, logprobs=True)
    assert len(together) == len(prompts)
    for p, got in zip(prompts, together, strict=True):
        alone = llama.text_completion([p], temperature=0, max_gen_len=5, logprobs=True)[0]
        assert got["tokens"] == alone["tokens"]
        assert got["generation"] == alone["generation"]
    tokens = [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    results = llama.generate_results(tokens, 4, SamplingParams(temperature=0))
    assert [r.prompt_len for r in results] == [len(t) for t in tokens]


def test_stop_tokens_accept_any_iterable_of_ints(ctx):
    llama = ctx.llama
    a = llama.generate_results([[1, 5]], 4, SamplingParams(temperature=0), stop_tokens={-1})
    b = llama.generate_results([[1, 5]], 4, SamplingParams(temperature=0), stop_tokens=(-1,))
    assert a == b and len(a[0].tokens) == 4


# --------------------------------------------------------------------------- numerical faults


@pytest.fixture
def fresh(ctx) -> Llama:
    """A model of its own, to corrupt."""
    return _build(ctx.ckpt)


SAMPLERS = [
    pytest.param({"temperature": 0}, id="greedy"),
    pytest.param({"temperature": 0.8, "top_p": 0.9}, id="top_p"),
    pytest.param({"temperature": 1.0, "top_p": 1.0, "top_k": 5, "min_p": 0.1}, id="top_k-min_p"),
    pytest.param({"temperature": 0.7, "repetition_penalty": 1.3}, id="repetition_penalty"),
]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("sampling", SAMPLERS)
def test_non_finite_logits_raise_numerical_error(fresh, sampling, bad):
    fresh.model.norm.weight.data[0] = bad  # the final norm feeds every logit
    with pytest.raises(NumericalError, match=esc("non-finite logits", "generation step 0")) as e:
        fresh.text_completion(["def f(", "x"], max_gen_len=4, **sampling)
    assert "multinomial" not in str(e.value) and "probability tensor" not in str(e.value)
    assert isinstance(e.value, RuntimeError)


def test_numerical_error_names_the_step_it_happened_at(fresh):
    prompt = fresh.tokenizer.encode("def f(", bos=True, eos=False)
    first = fresh.generate([prompt], 1, temperature=0, stop_token=-1)[0][0][0]
    assert first not in prompt
    fresh.model.tok_embeddings.weight.data[first] = float("nan")  # poisons step 1 only
    with pytest.raises(NumericalError, match=esc("row 0", "generation step 1")):
        fresh.generate([prompt], 4, temperature=0, stop_token=-1)


def test_sampling_never_fails_inside_multinomial():
    from codellama.sampling import sample

    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")
    params = SamplingParams(temperature=1.0, top_p=0.5)
    assert sample(logits, params).shape == (3,)
    # A temperature so small that logits / temperature overflows: the argmax (T -> 0 limit).
    tiny = SamplingParams(temperature=5e-324, top_p=1.0)
    assert sample(logits[[0, 2]], tiny).tolist() == logits[[0, 2]].argmax(-1).tolist()


def test_weights_larger_than_free_memory_are_refused_before_loading(ctx, monkeypatch):
    import codellama.distributed

    monkeypatch.setattr(codellama.distributed, "available_memory", lambda device: 1000)
    with pytest.raises(OutOfMemoryError, match=esc("the weights need", "cpu has 0.0 GiB free")):
        _build(ctx.ckpt)


def test_a_small_kv_cache_beyond_memory_is_sized_in_kib_and_the_fix_named(ctx, monkeypatch):
    import codellama.distributed
    import codellama.generation

    seen: list[int] = []
    real = codellama.generation.weight_bytes
    monkeypatch.setattr(
        codellama.generation, "weight_bytes", lambda *a: seen.append(real(*a)) or seen[-1]
    )
    monkeypatch.setattr(codellama.distributed, "available_memory", lambda d: 2**50)
    _build(ctx.ckpt)  # to learn the weights' size
    monkeypatch.setattr(codellama.distributed, "available_memory", lambda d: seen[-1] + 1024)
    with pytest.raises(OutOfMemoryError) as err:
        _build(ctx.ckpt)
    assert "KiB per 1K tokens" in str(err.value)
    assert " 0 MiB" not in str(err.value) and "at most 0" not in str(err.value)


def test_every_error_class_is_documented():
    import codellama.errors

    doc = (Path(__file__).parent.parent / "docs" / "errors.md").read_text()
    classes = [
        name
        for name, obj in vars(codellama.errors).items()
        if isinstance(obj, type) and issubclass(obj, CodeLlamaError)
    ]
    assert len(classes) >= 10
    assert [c for c in classes if f"`{c}`" not in doc] == []


@pytest.mark.parametrize("raw", ["abc", "-5", "0", "nan"])
def test_a_bad_collective_timeout_is_a_config_error_naming_the_variable(monkeypatch, raw):
    from codellama.distributed import collective_timeout

    monkeypatch.setenv("CODELLAMA_TIMEOUT_S", raw)
    with pytest.raises(
        ConfigError,
        match=re.escape(f"CODELLAMA_TIMEOUT_S must be a number of seconds > 0, got {raw!r}"),
    ):
        collective_timeout()


def test_collective_timeout_takes_seconds_and_defaults_to_60(monkeypatch):
    from codellama.distributed import collective_timeout

    monkeypatch.setenv("CODELLAMA_TIMEOUT_S", "1.5")
    assert collective_timeout().total_seconds() == 1.5
    monkeypatch.delenv("CODELLAMA_TIMEOUT_S")
    assert collective_timeout().total_seconds() == 60


@pytest.mark.parametrize("raw", ["1e100", "inf"])
def test_a_collective_timeout_meaning_for_ever_waits_the_longest_torch_takes(monkeypatch, raw):
    from codellama.distributed import MAX_TIMEOUT_S, collective_timeout

    monkeypatch.setenv("CODELLAMA_TIMEOUT_S", raw)
    assert collective_timeout().total_seconds() == MAX_TIMEOUT_S  # 1e100 s overflowed torch


def test_importing_the_package_reads_no_environment_variable():
    env = {**os.environ, "CODELLAMA_TIMEOUT_S": "abc"}
    done = subprocess.run([sys.executable, "-c", "import codellama"], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()


def test_numpy_numbers_are_taken_as_python_numbers(ctx):
    np = pytest.importorskip("numpy")
    llama = _build(ctx.ckpt, prefill_chunk_size=np.int64(16))
    params = SamplingParams(temperature=np.float32(0.5), top_p=np.float64(0.9), top_k=np.int32(3))
    assert (type(params.temperature), type(params.top_k)) == (float, int)
    ids = llama.tokenizer.encode("x", bos=True, eos=False)
    want = llama.generate_results([ids], 4, SamplingParams(temperature=0))
    got = llama.generate_results([ids], np.int64(4), SamplingParams(temperature=np.float32(0)))
    assert [r.tokens for r in got] == [r.tokens for r in want]


def test_a_numpy_model_parallel_size_is_taken_as_an_int(ctx):
    np = pytest.importorskip("numpy")
    llama = _build(ctx.ckpt, model_parallel_size=np.int64(1))
    assert llama.tokenizer.n_words == VOCAB


def test_the_tokenizer_refuses_bytes_as_token_ids(ctx):
    for ids in (b"ab", bytearray(b"ab"), memoryview(b"ab")):
        with pytest.raises(PromptError, match="expected a list of token ids"):
            ctx.tok.decode(ids)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "tokens, match",
    [
        (torch.tensor([[1.0, 2.0]]), "tokens must be an integer tensor"),
        ([[1, 2]], "tokens must be an integer tensor .torch.long., got list"),
        (torch.tensor([1, 2]), r"got shape \(2,\)"),
        (torch.zeros((1, 0), dtype=torch.long), "seqlen >= 1"),
        (torch.tensor([[1, 10**6]]), "token id 1000000 is outside the vocabulary"),
        (torch.tensor([[-3, 1]]), "token id -3 is outside the vocabulary"),
        (torch.ones((MAX_BATCH + 1, 2), dtype=torch.long), "rows but max_batch_size is"),
        (
            torch.ones((1, 2), dtype=torch.long, device="meta"),
            "tokens are on meta but the model is on cpu",
        ),
    ],
    ids=["float", "list", "1-d", "empty", "id-too-big", "id-negative", "too-many-rows", "device"],
)
def test_model_forward_refuses_bad_tokens_by_name(ctx, tokens, match):
    model = _build(ctx.ckpt).model
    with pytest.raises(PromptError, match=match):
        model.forward(tokens, 0)


def test_llama_made_from_something_else_than_a_model_and_tokenizer_is_a_config_error():
    with pytest.raises(ConfigError, match="takes a Transformer and a Tokenizer, got NoneType"):
        Llama(None, None)


def test_llama_made_from_a_tokenizer_of_another_vocabulary_is_a_config_error(ctx):
    small = Tokenizer(str(ctx.small_tokenizer))
    with pytest.raises(ConfigError, match=f"tokenizer has 400 pieces but .* has {VOCAB} rows"):
        Llama(ctx.llama.model, small)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"seed": "x"}, "seed must be an integer"), ({"compile": "x"}, "compile must be True")],
    ids=["seed", "compile"],
)
def test_llama_constructor_checks_seed_and_compile(ctx, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Llama(ctx.llama.model, ctx.llama.tokenizer, **kwargs)


def test_numpy_integer_seeds_work_as_ints(ctx):
    np = pytest.importorskip("numpy")
    llama = ctx.llama
    kw = dict(max_gen_len=6, temperature=1.0, top_p=1.0)
    assert llama.generate([[1, 5]], seed=np.int64(7), **kw) == llama.generate(
        [[1, 5]], seed=7, **kw
    )
    a = Llama(llama.model, llama.tokenizer, seed=np.int32(3))
    b = Llama(llama.model, llama.tokenizer, seed=3)
    assert a.seed == 3 and a.generate([[1, 5]], **kw) == b.generate([[1, 5]], **kw)


def test_non_finite_prompt_logprobs_are_a_numerical_error(ctx, monkeypatch):
    llama = ctx.llama
    real = llama.model.forward_tokens

    def broken(tokens, *args, **kwargs):
        logits = real(tokens, *args, **kwargs)
        logits[:, 0, 3] = float("nan")
        return logits

    monkeypatch.setattr(llama.model, "forward_tokens", broken)
    with pytest.raises(NumericalError, match="non-finite logits .* prompt's positions"):
        llama.generate([[1, 5, 9, 4]], 0, logprobs=True, echo=True)


def test_prefill_chunk_size_set_after_build_is_checked_too(ctx):
    with pytest.raises(ConfigError, match="prefill_chunk_size must be a positive integer"):
        ctx.llama.prefill_chunk_size = 0
    assert ctx.llama.prefill_chunk_size > 0


def test_a_decode_that_is_not_a_function_is_refused(ctx):
    with pytest.raises(PromptError, match="decode must be a function"):
        ctx.llama.generate_results([[1, 5]], 2, stop_strings=["x"], decode=5)


@pytest.mark.parametrize("returned", [None, b"x"], ids=["None", "bytes"])
def test_a_decode_that_returns_no_text_is_refused_and_the_model_stays_usable(ctx, returned):
    with pytest.raises(PromptError, match="decode must return the text .* got"):
        ctx.llama.generate_results([[1, 5]], 2, stop_strings=["x"], decode=lambda t: returned)
    assert len(ctx.llama.generate_results([[1, 5]], 2)[0].tokens) == 2
