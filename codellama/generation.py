"""The ``Llama`` generator: one batched prefill/decode core under completion, infilling, chat.

``Llama.build`` loads a Meta-layout checkpoint (any shard count, see :mod:`checkpoint`);
``generate`` keeps Meta's signature and return values. Prompts of different lengths are
prefilled together in bounded chunks and decoded together with per-row positions, so each
row gets exactly the tokens it would get alone.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import numbers
import operator
import os
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, SupportsIndex, TypedDict

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # Python 3.10: typing_extensions (a dependency of torch) has it
    from typing_extensions import Unpack

import torch

from . import distributed, gpu_kernels, native
from .checkpoint import (
    load_weights,
    path_type_hint,
    read_params,
    shard_paths,
    stored_dtypes,
)
from .errors import (
    ConfigError,
    NumericalError,
    OutOfMemoryError,
    PromptError,
    PromptTooLongError,
    is_flag,
)
from .model import (
    CacheGuard,
    ModelArgs,
    Transformer,
    build_empty,
    cache_guard,
    kv_cache_bytes,
    rope_table_bytes,
    weight_bytes,
)
from .prompt_formats import (
    UNSAFE_ERROR,
    Message,
    chat_prompt_tokens,
    has_special_tags,
    infilling_prompt_tokens,
    require_infilling,
    validate_dialog,
)
from .sampling import (
    MetaDraws,
    SamplingExtras,
    SamplingParams,
    check_max_gen_len,
    prompt_token_mask,
    rows_finite,
    sample,
)
from .stops import check_stop_strings, cut_at_stop, first_stop
from .streaming import _UNFINISHED, FinishReason, IncrementalDecoder, StreamEvent, TextAssembler
from .tokenizer import TEXTLIKE, Tokenizer, check_text

TokenIds = Collection[SupportsIndex]
"""One prompt's token ids: a list (or tuple) of ints, a 1-D tensor or a numpy array."""
PromptTokens = Collection[TokenIds]
"""A batch of prompts' token ids: a list of :data:`TokenIds`, or a 2-D tensor or array."""

# Prompt tokens per forward pass. 1024 against 512 (bf16 `small`, 2-core CPU): prefill of a
# 1-2K prompt 11-12% faster, a 16K one 7%; peak memory at 16K +29 MiB (184 MiB in all).
DEFAULT_PREFILL_CHUNK = 1024
# Compiled decoding attends over the cache in buckets of at least this many positions, not
# over all max_seq_len of them (at 100K positions that reads 4x a 7B model's weights a token).
KV_BUCKET = 256


def kv_bucket(n: int) -> int:
    """``n`` rounded up to a multiple of KV_BUCKET or of an eighth of the power of two above
    it: at most KV_BUCKET or 25% more positions than needed, and 4 shapes (so 4 CUDA graphs)
    per doubling of the context: 31 up to 100K positions."""
    step = max(KV_BUCKET, (1 << max(n - 1, 0).bit_length()) // 8)
    return -(-n // step) * step


# Cost of one pass over the weights, in prompt tokens, when grouping rows for prefill.
PREFILL_GROUP_OVERHEAD = 64
_SAMPLING_EXTRAS = frozenset({"top_k", "min_p", "repetition_penalty"})


class CompletionPrediction(TypedDict, total=False):
    """One result of :meth:`Llama.text_completion` (Meta's dict)."""

    generation: str
    tokens: list[str]  # only with logprobs=True
    logprobs: list[float]  # only with logprobs=True


class InfillingPrediction(TypedDict, total=False):
    """One result of :meth:`Llama.text_infilling`: the middle, and prefix + middle + suffix."""

    generation: str
    full_text: str
    tokens: list[str]
    logprobs: list[float]


class ChatPrediction(TypedDict, total=False):
    """One result of :meth:`Llama.chat_completion`: the assistant's message."""

    generation: Message
    tokens: list[str]
    logprobs: list[float]


@dataclass
class GenerationResult:
    """One row of output: token ids, their log-probabilities, and why generation ended."""

    tokens: list[int]
    logprobs: list[float] | None
    finish_reason: FinishReason
    prompt_len: int
    stop_string: str | None = None  # the stop string that ended generation, if one did


@dataclass
class _Row:
    prompt: list[int]
    budget: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    index: int = 0  # position in the caller's list
    stop_string: str | None = None
    searched: int = 0  # generated text before this offset holds no stop string
    text: IncrementalDecoder | None = None  # its generated text, for stop strings


@dataclass(frozen=True)
class _StopReader:
    """Finds stop strings in the text of a row's tokens, as ``decode`` reads it."""

    texts: tuple[str, ...]
    decode: Callable[[Sequence[int]], str]
    plain: Callable[[int], bool]  # the tokenizer's is_plain_piece
    unfinished: Callable[[Sequence[int]], int]  # the tokenizer's unfinished_bytes

    def found(self, row: _Row) -> bool:
        """Whether ``row``'s generated text now holds one of the stop strings (searching
        only where a new occurrence can be); records the earliest one."""
        if row.text is None:
            row.text = IncrementalDecoder(self.decode, self.plain)
        text = row.text(row.tokens)
        n = self.unfinished(row.tokens) if row.finish_reason is None else 0
        if n and text.endswith(_UNFINISHED * n):  # a character spelt in byte pieces, not yet
            text = text[:-n]  # complete: its U+FFFDs are not (yet) in the text
        hit = first_stop(text, self.texts, row.searched)
        # A stop string can only start in the last (longest - 1) characters; 3 more because
        # an unfinished UTF-8 character decodes to up to 3 U+FFFD, 1 once complete.
        row.searched = max(len(text) - max(map(len, self.texts)) - 3, 0)
        if hit is None:
            return False
        row.stop_string = self.texts[hit[1]]
        return True


class Llama:
    """A Code Llama model with its tokenizer, ready to generate."""

    @staticmethod
    def build(
        ckpt_dir: str | os.PathLike[str],
        tokenizer_path: str | os.PathLike[str],
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        seed: int = 1,
        compile: bool = False,
        prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK,
    ) -> Llama:
        """Load a checkpoint in Meta's layout and return a ready :class:`Llama`.

        Args:
            ckpt_dir: folder with ``consolidated.NN.pth`` shards and ``params.json``.
            tokenizer_path: the checkpoint's ``tokenizer.model``.
            max_seq_len: longest prompt + generation; sizes the KV cache (up to 100K).
            max_batch_size: rows decoded together; larger batches are split.
            model_parallel_size: processes sharing the model (default: the world size).
            device: None picks cuda, else mps, else cpu.
            dtype: None picks bf16/fp16 on CUDA and fp32 elsewhere; strings are accepted.
                An fp32 CPU model keeps a bf16 checkpoint's linear weights in bf16 (exact;
                products stay fp32 and bit-identical), for half the memory.
            seed: seed of the sampling generator (the same on every rank).
            compile: torch.compile the decode step (static shapes; CUDA graphs on GPU).
            prefill_chunk_size: prompt tokens processed per forward pass; bounds memory.
        """
        max_seq_len = _positive_int("max_seq_len", max_seq_len)
        max_batch_size = _positive_int("max_batch_size", max_batch_size)
        prefill_chunk_size = _positive_int("prefill_chunk_size", prefill_chunk_size)
        _check_seed_and_compile(seed, compile)  # before the slow load (Llama() checks again)
        for name, path in (("ckpt_dir", ckpt_dir), ("tokenizer_path", tokenizer_path)):
            if not isinstance(path, (str, os.PathLike)):
                raise ConfigError(
                    f"{name} must be a path (str or os.PathLike), {path_type_hint(path)}"
                )
        start = time.time()
        dev = distributed.resolve_device(device)
        dt = distributed.resolve_dtype(dtype, dev)
        paths = shard_paths(ckpt_dir)
        params = read_params(ckpt_dir)
        tokenizer = Tokenizer(tokenizer_path)
        rank, mp = distributed.setup_model_parallel(model_parallel_size, dev)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if rank > 0:  # as Meta's: one process of each model prints (each copy's first)
            sys.stdout = open(os.devnull, "w")

        vocab = params.get("vocab_size", -1)
        if vocab is not None and not _is_int(vocab):
            raise ConfigError(f"params.json's vocab_size must be an integer, got {vocab!r}")
        if vocab not in (-1, None) and vocab != tokenizer.n_words:
            raise ConfigError(
                f"params.json has vocab_size={vocab} but the tokenizer {tokenizer_path!r} has "
                f"{tokenizer.n_words} pieces; use the tokenizer.model that came with this "
                "checkpoint"
            )
        params = {**params, "vocab_size": tokenizer.n_words}
        args = ModelArgs.from_params(params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        args.validate(model_parallel_size=mp)
        kernel = native.load() if dev.type == "cpu" and not compile else None
        if kernel is not None and not native.preferred(kernel):
            kernel = None  # no AVX-512 or AVX2 code: oneDNN is far faster than this build
        _check_memory(args, dt, dev, mp, _linear_dtype(kernel, dt, paths))
        with _cyclic_gc_paused():
            model = build_empty(args, dev, dt)
            if dev.type != "cpu":  # CPU decoding runs each weight natively instead
                model.fuse_projections()
            if dev.type == "cuda":
                gpu_kernels.enable()  # Triton matrix products for decoding's few rows
            model.native_kernel = kernel  # on the CPU: packs the weights as they load
            store = None if compile else model.store_prepacked
            load_weights(model, paths, mp_rank=rank, mp_size=mp, progress=rank == 0, store=store)
            model.setup_cache(dtype=dt, device=dev)
            model.eval().requires_grad_(False)
            if not compile:  # torch.compile prepacks by itself (inductor freezing)
                model.prepack_cpu_weights()
                if dev.type == "cpu":
                    model.use_native_kernel(model.native_kernel)
        print(f"Loaded in {time.time() - start:.2f} seconds")  # by each copy's first process
        return Llama(
            model,
            tokenizer,
            seed=seed,
            compile=compile,
            prefill_chunk_size=prefill_chunk_size,
        )

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        seed: int = 1,
        compile: bool = False,
        prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK,
    ):
        prefill_chunk_size = _positive_int("prefill_chunk_size", prefill_chunk_size)
        if not isinstance(model, Transformer) or not isinstance(tokenizer, Tokenizer):
            raise ConfigError(
                f"Llama(model, tokenizer) takes a Transformer and a Tokenizer, got "
                f"{type(model).__name__} and {type(tokenizer).__name__}; Llama.build(ckpt_dir, "
                "tokenizer_path, ...) makes both from a checkpoint"
            )
        if tokenizer.n_words != model.params.vocab_size:
            raise ConfigError(
                f"the tokenizer has {tokenizer.n_words} pieces but the model's vocabulary has "
                f"{model.params.vocab_size} rows; pass the tokenizer.model that came with the "
                "checkpoint"
            )
        _check_seed_and_compile(seed, compile)
        model.ensure_cache()
        self.model = model
        self.tokenizer = tokenizer
        self.seed = int(seed)  # numpy's integers too
        self._prefill_chunk_size = prefill_chunk_size
        self._generator = torch.Generator(device=model.device).manual_seed(self.seed)
        self._decode: Callable[..., torch.Tensor] = self._decode_step
        self.compiled = bool(compile)
        self._overlap = model.device.type != "cpu"  # see _run_batch
        if compile:
            mode = "reduce-overhead" if model.device.type == "cuda" else None
            # dynamic: the batch size and the attended cache length are symbolic, so one
            # compilation serves every kv_len bucket (see decode_next) and batches of 2+
            # rows; CUDA graphs are recorded per shape, which costs no compilation.
            self._decode = torch.compile(self._decode_step, mode=mode, dynamic=True)

    # ------------------------------------------------------------------ core

    @property
    def prefill_chunk_size(self) -> int:
        """Most prompt tokens a prefill pass takes at once (bounds prefill's memory)."""
        return self._prefill_chunk_size

    @prefill_chunk_size.setter
    def prefill_chunk_size(self, value: int) -> None:
        self._prefill_chunk_size = _positive_int("prefill_chunk_size", value)

    @property
    def max_seq_len(self) -> int:
        """Most positions a row may use, prompt and generation (the KV cache's length)."""
        return self.model.params.max_seq_len

    @property
    def max_batch_size(self) -> int:
        """Most rows decoded together; larger batches run in successive batches."""
        return self.model.params.max_batch_size

    def _decode_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None,
        start_pos: int,
        kv_len: int,
    ) -> torch.Tensor:
        return self.model.forward_tokens(
            tokens, start_pos, positions=positions, kv_len=kv_len, logits_index=None
        )[:, 0]

    def _check_prompts(self, prompt_tokens: PromptTokens) -> list[list[int]]:
        prompt_tokens = _as_lists(prompt_tokens)
        if isinstance(prompt_tokens, TEXTLIKE) or not isinstance(prompt_tokens, Sequence):
            raise PromptError(
                "prompt_tokens must be a list of token-id lists, got "
                f"{type(prompt_tokens).__name__}: {prompt_tokens!r:.60}"
            )
        vocab = self.model.params.vocab_size
        out = []
        for i, p in enumerate(prompt_tokens):
            p = _as_lists(p)
            if isinstance(p, TEXTLIKE) or not isinstance(p, Sequence):
                raise PromptError(
                    f"prompt {i} must be a list of token ids, got {type(p).__name__}: {p!r:.60}"
                    " (prompt_tokens is a list of prompts: wrap a single prompt as [ids])"
                )
            if len(p) == 0:
                raise PromptError(
                    f"prompt {i} is empty; a prompt needs at least one token (e.g. BOS, "
                    f"id {self.tokenizer.bos_id})"
                )
            ids = [_as_lists(t) for t in p]  # 0-d tensors and numpy scalars as Python numbers
            not_int = [t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
            if not_int:
                raise PromptError(
                    f"prompt {i} has token ids that are not integers: {not_int[:5]!r:.120}; "
                    "pass lists of int ids (e.g. tokenizer.encode(text, bos=True, eos=False))"
                )
            ids = [int(t) for t in ids]  # numpy integers too
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise PromptError(
                    f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}; "
                    "encode prompts with this model's tokenizer"
                )
            if len(ids) > self.max_seq_len:
                raise PromptTooLongError(
                    f"prompt {i} has {len(ids)} tokens but max_seq_len is {self.max_seq_len}; "
                    f"shorten it by {_count(len(ids) - self.max_seq_len, 'token')} or build with "
                    f"max_seq_len >= {len(ids)}"
                )
            out.append(ids)
        return out

    def generate_results(
        self,
        prompt_tokens: PromptTokens,
        max_gen_len: int,
        sampling: SamplingParams = SamplingParams(),
        logprobs: bool = False,
        echo: bool = False,
        stop_tokens: Sequence[int] = (),
        seed: int | None = None,
        stop_strings: str | Sequence[str] = (),
        decode: Callable[[Sequence[int]], str] | None = None,
    ) -> list[GenerationResult]:
        """The generation core: batches of at most ``max_batch_size``, results in order.

        Generation of a row ends at the first of ``stop_tokens`` (excluded from the output,
        ``finish_reason == "stop"``), as soon as its decoded text contains one of
        ``stop_strings`` (the token that completes it is kept; ``stop_string`` says which),
        or after ``min(max_gen_len, max_seq_len - prompt length)`` tokens (``"length"``).
        ``seed`` gives this call its own sampling generator. Sampling draws what Meta's loop
        draws for each row (see :class:`~codellama.sampling.MetaDraws`), so a row's samples
        depend on its batch: its place in it and the other prompts' lengths. ``decode``
        reads a row's text for stop strings (default ``tokenizer.decode``; infilling's
        middles are read with ``tokenizer.decode_infilling``).
        """
        rows: list[_Row] = []
        for _ in self._generate(
            prompt_tokens, max_gen_len, sampling, logprobs, echo, stop_tokens, seed, rows,
            stop_strings, decode,
        ):  # fmt: skip
            pass
        return [self._result(r, logprobs, echo) for r in rows]

    def generate_stream(
        self,
        prompt_tokens: PromptTokens,
        max_gen_len: int,
        sampling: SamplingParams = SamplingParams(),
        stop_tokens: Sequence[int] = (),
        seed: int | None = None,
        stop_strings: str | Sequence[str] = (),
    ) -> Iterator[tuple[int, int]]:
        """Yield ``(prompt index, token id)`` as soon as each token is generated.

        Same core, arguments and tokens as :meth:`generate_results`; stop tokens are not
        yielded (the token completing a stop string is). Rows of one batch advance
        together, one token each per step.
        """
        events = self._generate(
            prompt_tokens, max_gen_len, sampling, False, False, stop_tokens, seed, [],
            stop_strings,
        )  # fmt: skip
        return ((row.index, token) for row, token in events if token is not None)

    def _generate(
        self,
        prompt_tokens: PromptTokens,
        max_gen_len: int,
        sampling: SamplingParams,
        logprobs: bool,
        echo: bool,
        stop_tokens: Sequence[int],
        seed: int | None,
        rows_out: list[_Row],
        stop_strings: str | Sequence[str] = (),
        decode: Callable[[Sequence[int]], str] | None = None,
    ) -> Iterator[tuple[_Row, int | None]]:
        """Validate the arguments (now), and return the generation that runs the prompts
        batch by batch; rows are appended to ``rows_out``; ``decode`` reads a row's text
        for ``stop_strings`` (default ``tokenizer.decode``).

        Yields ``(row, token)`` for each new token, and ``(row, None)`` when a row ends
        without one (a stop token, or no room left); ``row.finish_reason`` is set from the
        row's last event on. A call started while this one is suspended (a stream not run
        to its end) takes the shared KV cache: resuming this one then raises
        :class:`StreamInterruptedError` rather than generating from a clobbered cache.
        """
        prompts = self._check_prompts(prompt_tokens)
        max_gen_len = check_max_gen_len(max_gen_len)
        _check_flag("logprobs", logprobs)
        _check_flag("echo", echo)
        if not isinstance(sampling, SamplingParams):
            raise PromptError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if isinstance(stop_tokens, TEXTLIKE) or not isinstance(stop_tokens, Iterable):
            raise PromptError(f"stop_tokens must be a list of token ids, got {stop_tokens!r:.80}")
        stops = frozenset(self._stop_id(t) for t in stop_tokens)
        texts = check_stop_strings(stop_strings)
        if seed is not None and not _seed_ok(seed):
            raise PromptError(
                f"seed must be None or an integer in [-2**63, 2**64), got {seed!r:.40}"
            )
        if decode is not None and not callable(decode):
            raise PromptError(
                f"decode must be a function from token ids to text, got {type(decode).__name__}"
            )
        distributed.check_same_on_all_ranks(
            "prompts or sampling parameters",
            {
                "prompts": prompts, "max_gen_len": max_gen_len, "sampling": sampling,
                "logprobs": logprobs, "echo": echo, "stop tokens": sorted(stops),
                "seed": seed, "stop strings": texts,
            },
        )  # fmt: skip
        generator = self._generator
        if seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(int(seed))
        tok = self.tokenizer
        read = tok.decode if decode is None else _returning_text(decode)
        reader = _StopReader(texts, read, tok.is_plain_piece, tok.unfinished_bytes)
        return self._batches(
            prompts, max_gen_len, sampling, logprobs, echo, stops, reader, generator, rows_out
        )

    @torch.inference_mode()
    def _batches(
        self,
        prompts: list[list[int]],
        max_gen_len: int,
        sampling: SamplingParams,
        logprobs: bool,
        echo: bool,
        stops: frozenset[int],
        reader: _StopReader,
        generator: torch.Generator,
        rows_out: list[_Row],
    ) -> Iterator[tuple[_Row, int | None]]:
        """Run the prompts batch by batch (see :meth:`_generate`)."""
        guard, owner = cache_guard(self.model), object()
        step = self.max_batch_size
        for lo in range(0, len(prompts), step):
            rows = [
                _Row(p, min(max_gen_len, self.max_seq_len - len(p)), index=lo + i)
                for i, p in enumerate(prompts[lo : lo + step])
            ]
            rows_out += rows
            batch = self._run_batch(
                rows, sampling, logprobs, echo, stops, reader, generator, guard, owner
            )
            while True:
                guard.refuse_if_busy()
                # `with` on the lock itself: an interrupt (Ctrl-C) cannot fall between taking
                # it and the block that releases it, as it can in a Python-level acquire.
                with guard.lock:
                    emitted = next(batch, None)
                if emitted is None:
                    break
                yield from emitted

    def _stop_id(self, t: object) -> int:
        if not isinstance(t, bool):
            try:
                i = operator.index(t)  # type: ignore[arg-type]
            except TypeError:
                pass
            else:
                vocab = self.model.params.vocab_size
                if i == -1 or 0 <= i < vocab:
                    return i
                raise PromptError(
                    f"stop token {i} is outside the vocabulary [0, {vocab}), so it would never "
                    "stop a row; pass an id of this tokenizer, or -1 for none"
                )
        raise PromptError(
            f"stop token {t!r:.40} is not an integer token id; pass ids such as "
            f"tokenizer.eos_id ({self.tokenizer.eos_id}), or -1 for none"
        )

    def _result(self, row: _Row, logprobs: bool, echo: bool) -> GenerationResult:
        assert row.finish_reason is not None
        tokens, lps = row.tokens, row.logprobs
        if echo:
            tokens = row.prompt + tokens
        return GenerationResult(
            tokens, lps if logprobs else None, row.finish_reason, len(row.prompt), row.stop_string
        )

    def _prefill(
        self, prompt: torch.Tensor, lens: list[int], rows: list[_Row], echo_lp: bool
    ) -> torch.Tensor:
        """Fill the KV cache with the prompts; return each row's last-position logits.

        Rows (sorted longest first) are prefilled in groups of similar length so that little
        work is spent on padding, each group in chunks of at most ``prefill_chunk_size``
        tokens so that memory stays bounded whatever the prompt length. With ``echo_lp`` the
        prompt tokens' logprobs are stored in ``rows``.
        """
        model, device = self.model, self.model.device
        vocab = model.params.vocab_size
        last = torch.empty((len(lens), vocab), dtype=torch.float32, device=device)
        for a, b in _prefill_groups(lens, PREFILL_GROUP_OVERHEAD):
            chunk = self.prefill_chunk_size
            if echo_lp:  # all-position logits: bound the (rows, chunk, V) tensor to ~256 MiB
                chunk = max(1, min(chunk, 2**26 // ((b - a) * vocab)))
            ends = [n - 1 for n in lens[a:b]]
            for s in range(0, lens[a], chunk):
                e = min(s + chunk, lens[a])
                tokens = prompt[a:b, s:e]
                done = [i for i, n in enumerate(ends) if s <= n < e]
                if not done and not echo_lp:
                    model.fill_cache(tokens, s, row_offset=a)
                    continue
                idx = torch.tensor([min(max(n - s, 0), e - s - 1) for n in ends], device=device)
                if echo_lp:
                    logits = model.forward_tokens(tokens, s, row_offset=a)
                    self._store_prompt_logprobs(logits, prompt[a:b], s, rows[a:b])
                    picked = logits[torch.arange(b - a, device=device), idx]
                else:
                    picked = model.forward_tokens(tokens, s, logits_index=idx, row_offset=a)
                for i in done:
                    last[a + i] = picked[i]
        return last

    @staticmethod
    def _store_prompt_logprobs(
        logits: torch.Tensor, prompt: torch.Tensor, start: int, rows: list[_Row]
    ) -> None:
        """logprob of prompt token p+1 given the prefix up to p, for the chunk's positions."""
        targets = prompt[:, start + 1 : start + 1 + logits.shape[1]]
        n = targets.shape[1]
        lp = torch.log_softmax(logits[:, :n], dim=-1).gather(-1, targets.unsqueeze(-1))
        if not bool(torch.isfinite(lp).all()):
            raise NumericalError(
                f"the model produced non-finite logits (NaN/inf) for the prompt's positions "
                f"{start}..{start + n - 1}; the weights or the dtype are broken (fp16 "
                "overflows easily: try dtype='bfloat16' or 'float32')"
            )
        for r, values in zip(rows, lp.squeeze(-1).tolist(), strict=True):
            for j, value in enumerate(values):
                if start + 1 + j < len(r.prompt):
                    r.logprobs[start + 1 + j] = value

    def _run_batch(
        self,
        rows: list[_Row],
        sampling: SamplingParams,
        want_logprobs: bool,
        echo: bool,
        stops: frozenset[int],
        reader: _StopReader,
        generator: torch.Generator,
        guard: CacheGuard,
        owner: object,
    ) -> Iterator[list[tuple[_Row, int | None]]]:
        """Prefill then decode ``rows`` together; yields each step's events (see
        :meth:`_generate`). The prefill takes the model's KV cache for ``owner``; resumed
        after a yield with steps left, it first checks that nothing else wrote the cache in
        between (a stream paused while another call ran): only there can anything have."""
        model, device = self.model, self.model.device
        rows = sorted(rows, key=lambda r: -len(r.prompt))  # longest first: see _prefill_groups
        bsz = len(rows)
        lens = [len(r.prompt) for r in rows]
        prompt = _padded(rows, lens[0]).to(device)
        lens_t = torch.tensor(lens, device=device)
        echo_lp = want_logprobs and echo
        for r in rows:
            if echo_lp:
                r.logprobs = [0.0] * len(r.prompt)  # the first token has no prediction
            if r.budget == 0:
                r.finish_reason = "length"
        if any(r.budget == 0 for r in rows):
            yield [(r, None) for r in rows if r.budget == 0]
        if all(r.budget == 0 for r in rows) and not echo_lp:
            return
        guard.owner = owner
        last_logits = self._prefill(prompt, lens, rows, echo_lp)

        # Decode: every row one token per step at its own position.
        uniform = len(set(lens)) == 1 and not self.compiled
        # A row whose prompt fills the cache has no budget; it is fed (and ignored) at the
        # last position, like every row that has finished.
        last_pos = self.max_seq_len - 1
        positions = lens_t.clamp(max=last_pos).view(bsz, 1)
        cur_pos = [min(n, last_pos) for n in lens]
        vocab = model.params.vocab_size
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = prompt_token_mask(prompt, lens, vocab)
        max_steps = max(r.budget for r in rows)
        # Greedy picks on CPU in one native call (argmax and finiteness): right after a
        # decoding step each torch op costs 10-100 us, as the CPU caches are cold.
        kernel = model.native_kernel
        if not sampling.greedy or seen is not None or want_logprobs:
            kernel = None
        if distributed.model_parallel_world() != 1:
            kernel = None
        # On an accelerator the next step is queued before the host waits for this step's
        # tokens, so the device never idles while Python checks stops (one step may be
        # computed in vain at the end). The picks, and so the tokens, are the same.
        overlap = self._overlap and kernel is None
        # Greedy decoding on the native decoder: lean steps that make no torch call, as
        # each costs 10-100 us after a step has streamed the weights through the caches.
        steps = None
        if kernel is not None and not self.compiled and device.type == "cpu":
            steps = model.native_greedy_steps(bsz)

        def step_native(picks: list[int]) -> Callable[[], list[list[Any]]]:
            """Feed the last picks; the next ones come back as ``host`` would give them."""
            nonlocal cur_pos
            assert steps is not None
            kv_len = min(max(cur_pos) + 1, self.max_seq_len)
            values: list[list[Any]] = list(steps(picks, cur_pos, kv_len))
            cur_pos = [min(p + 1, last_pos) for p in cur_pos]
            return lambda: values

        def decode_next(tok: torch.Tensor) -> torch.Tensor:
            nonlocal cur_pos
            if seen is not None:
                seen.scatter_(1, tok.view(-1, 1), True)
            if uniform:
                out = self._decode(tok.view(bsz, 1), None, cur_pos[0], cur_pos[0] + 1)
            else:
                kv_len = min(max(cur_pos) + 1, self.max_seq_len)
                if self.compiled:  # a few shapes, each recorded once as a CUDA graph
                    # Below max_seq_len: a view of the whole cache would be another graph (it
                    # is contiguous). Only rows that have finished are fed at the last position.
                    kv_len = max(1, min(kv_bucket(kv_len), self.max_seq_len - 1))
                out = self._decode(tok.view(bsz, 1), positions, 0, kv_len)
            cur_pos = [min(p + 1, self.max_seq_len - 1) for p in cur_pos]
            if not uniform:
                positions.add_(1).clamp_(max=self.max_seq_len - 1)
            return out

        if max_steps == 0:  # echo with logprobs and no new tokens: nothing to sample
            return
        draws = None
        if not sampling.greedy:  # Meta's draws, by row
            order, budgets = [r.index for r in rows], [r.budget for r in rows]
            draws = MetaDraws.for_batch(generator, order, lens, budgets, vocab)
        pick = functools.partial(
            self._pick, sampling=sampling, generator=generator, seen=seen,
            want_logprobs=want_logprobs, kernel=kernel, draws=draws, rows=rows,
        )  # fmt: skip
        tok, host = pick(last_logits)
        for step in range(max_steps):
            more = step + 1 < max_steps
            if overlap and more:
                logits = decode_next(tok)
            values = host()
            emitted: list[tuple[_Row, int | None]] = []
            for i, r in enumerate(rows):
                if r.finish_reason is not None:
                    continue
                if not values[1][i]:
                    raise NumericalError(
                        f"the model produced non-finite logits (NaN/inf) for row {r.index} at "
                        f"generation step {step} (position {lens[i] + step}); the "
                        "weights or the dtype are broken (fp16 overflows easily: try "
                        "dtype='bfloat16' or 'float32')"
                    )
                t = int(values[0][i])
                if t in stops:
                    r.finish_reason = "stop"
                    if reader.texts:  # the final text may hold one: a character left unfinished
                        reader.found(r)
                    emitted.append((r, None))
                    continue
                r.tokens.append(t)
                if want_logprobs:
                    r.logprobs.append(values[2][i])
                emitted.append((r, t))
                if len(r.tokens) >= r.budget:
                    r.finish_reason = "length"
                if reader.texts and reader.found(r):
                    r.finish_reason = "stop"
            yield emitted
            if not more or all(r.finish_reason is not None for r in rows):
                break
            guard.check(owner)  # before reading the cache or the last step's logits
            if steps is not None:
                host = step_native([int(t) for t in values[0]])
                continue
            if not overlap:
                logits = decode_next(tok)
            tok, host = pick(logits)

    def _pick(
        self,
        logits: torch.Tensor,
        sampling: SamplingParams,
        generator: torch.Generator,
        seen: torch.Tensor | None,
        want_logprobs: bool,
        kernel: native.NativeLinear | None,
        draws: MetaDraws | None = None,
        rows: Sequence[_Row] = (),
    ) -> tuple[torch.Tensor, Callable[[], list[list[Any]]]]:
        """Queue the next tokens' pick from ``logits``: (the tokens on the device, a function
        that waits for [tokens, finite, logprobs?] on the host)."""
        device = logits.device
        decoder = self.model.native_decoder
        taken = decoder.picks(logits) if kernel is not None and decoder is not None else None
        if taken is not None:  # the native step picked while the logits were in cache
            taken_values: list[list[Any]] = [taken[0].tolist(), taken[1]]
            return taken[0], lambda: taken_values
        picked = kernel.greedy(logits) if kernel is not None else None
        if picked is not None:
            values: list[list[Any]] = [picked[0], picked[1]]
            return torch.tensor(picked[0], device=device), lambda: values
        noise = None
        if draws is not None:
            active = [i for i, r in enumerate(rows) if r.finish_reason is None]
            noise = functools.partial(draws.take, active)  # the columns the nucleus reads
        tok = sample(logits, sampling, generator, seen, noise)
        tok = distributed.broadcast_tokens(tok)
        finite = rows_finite(logits)
        packed = [tok.to(torch.float64), finite.to(torch.float64)]
        if want_logprobs:
            lp = torch.log_softmax(logits, dim=-1).gather(-1, tok.view(-1, 1))
            packed.append(lp.view(-1).to(torch.float64))
        stacked = torch.stack(packed)
        if device.type != "cuda":
            return tok, stacked.tolist
        # Copy into pinned memory without blocking; the host waits for this copy alone, not
        # for the decoding step queued after it.
        buf = torch.empty(stacked.shape, dtype=stacked.dtype, device="cpu", pin_memory=True)
        buf.copy_(stacked, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(stacked.device))

        def wait() -> list[list[Any]]:
            done.synchronize()
            return buf.tolist()  # type: ignore[no-any-return]

        return tok, wait

    # ------------------------------------------------------------------ Meta's API

    def generate(
        self,
        prompt_tokens: PromptTokens,
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        stop_token: int | None = None,
        stop_strings: str | Sequence[str] = (),
        seed: int | None = None,
        **sampling_kwargs: Unpack[SamplingExtras],
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Meta's ``generate``: (tokens, logprobs or None) per prompt.

        Args:
            prompt_tokens: each prompt's token ids (lists, 1-D tensors or arrays; BOS
                included if wanted), at most ``max_seq_len`` each.
            max_gen_len: most new tokens per row (also bounded by ``max_seq_len``).
            temperature: 0 is greedy; higher flattens the distribution.
            top_p: nucleus sampling: draw among the most likely tokens whose probabilities
                add up to ``top_p`` (1 keeps all; 0 the top token alone).
            logprobs: also return each returned token's log-probability.
            echo: return the prompt before the generation (and its logprobs: the first
                token, which nothing predicts, gets 0).
            stop_token: the token that ends a row, not returned (default: EOS).
            stop_strings: end a row once its text holds one (see :meth:`generate_results`).
            seed: this call's own sampling generator (None: the model's, which advances
                from call to call).
            sampling_kwargs: ``top_k``, ``min_p``, ``repetition_penalty`` (see
                :class:`~codellama.sampling.SamplingParams`).
        """
        sampling = _sampling_params(temperature, top_p, sampling_kwargs)
        stop = self.tokenizer.eos_id if stop_token is None else stop_token
        return self._token_lists(
            prompt_tokens, max_gen_len, sampling, logprobs, echo, stop, stop_strings, seed
        )

    def _token_lists(
        self,
        prompt_tokens: PromptTokens,
        max_gen_len: int,
        sampling: SamplingParams,
        logprobs: bool,
        echo: bool,
        stop_token: int,
        stop_strings: str | Sequence[str],
        seed: int | None,
        decode: Callable[[Sequence[int]], str] | None = None,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """The core's results as Meta's (tokens, logprobs or None) lists."""
        results = self.generate_results(
            prompt_tokens, max_gen_len, sampling, logprobs=logprobs, echo=echo,
            stop_tokens=(stop_token,), seed=seed, stop_strings=stop_strings, decode=decode,
        )  # fmt: skip
        tokens = [r.tokens for r in results]
        return tokens, ([r.logprobs or [] for r in results] if logprobs else None)

    def _cut_echo(
        self, text: str, generated: list[int], prompt: list[int], stops: Sequence[str]
    ) -> str:
        """An echoed ``text`` (prompt and generation) cut where generation stopped: at the
        first stop string in the generation's own text, which generation watched (it lacks
        the space SentencePiece drops before a text's first piece, which the echo keeps)."""
        own = self.tokenizer.decode(generated)
        if not text.endswith(own):  # a character across the seam: search the echo's tail
            return cut_at_stop(text, stops, len(self.tokenizer.decode(prompt)))
        hit = first_stop(own, stops)
        return text if hit is None else text[: len(text) - len(own) + hit[0]]

    def _max_gen_len(self, max_gen_len: int | None) -> int:
        return self.max_seq_len - 1 if max_gen_len is None else max_gen_len

    def _pieces(self, tokens: list[int]) -> list[str]:
        return [self.tokenizer.token_piece(t) for t in tokens]

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        **sampling_kwargs: Unpack[SamplingExtras],
    ) -> list[CompletionPrediction]:
        """Continue each prompt; an empty string generates from BOS.

        Args:
            prompts: texts to continue (BOS is added to each).
            temperature, top_p, seed, sampling_kwargs: sampling, as in :meth:`generate`.
            max_gen_len: most new tokens per row (default: up to ``max_seq_len``).
            logprobs: add each result's ``tokens`` (pieces) and their ``logprobs``.
            echo: the result starts with the prompt (its tokens too, with ``logprobs``).
            stop: a string or a list: a generation ends at the first one, which is cut from
                the text.
        """
        sampling = _sampling_params(temperature, top_p, sampling_kwargs)
        stops = check_stop_strings(stop)
        prompt_tokens = self._completion_prompts(prompts)
        tokens, lps = self._token_lists(
            prompt_tokens, self._max_gen_len(max_gen_len), sampling, logprobs, echo,
            self.tokenizer.eos_id, stops, seed,
        )  # fmt: skip
        out: list[CompletionPrediction] = []
        for i, t in enumerate(tokens):
            text = self.tokenizer.decode(t)
            if echo and stops:
                text = self._cut_echo(text, t[len(prompt_tokens[i]) :], prompt_tokens[i], stops)
            else:
                text = cut_at_stop(text, stops)
            pred = CompletionPrediction(generation=text)
            if lps is not None:
                pred["tokens"] = self._pieces(t)
                pred["logprobs"] = lps[i]
            out.append(pred)
        return out

    def text_infilling(
        self,
        prefixes: list[str],
        suffixes: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        suffix_first: bool = False,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        **sampling_kwargs: Unpack[SamplingExtras],
    ) -> list[InfillingPrediction]:
        """Fill the middle between each prefix and suffix (Code Llama 7B/13B, base and
        Instruct); each result has the ``generation`` (the middle) and the ``full_text``.

        Args:
            prefixes, suffixes: the code before and after the gap, one suffix per prefix.
            suffix_first: Meta's suffix-prefix-middle order instead of prefix-suffix-middle.
            temperature, top_p, max_gen_len, logprobs, stop, seed, sampling_kwargs: as in
                :meth:`text_completion`.
        """
        prompt_tokens, eot = self._infilling_prompts(prefixes, suffixes, suffix_first)
        sampling = _sampling_params(temperature, top_p, sampling_kwargs)
        stops = check_stop_strings(stop)
        tokens, lps = self._token_lists(
            prompt_tokens, self._max_gen_len(max_gen_len), sampling, logprobs, False, eot,
            stops, seed, self.tokenizer.decode_infilling,
        )  # fmt: skip
        out: list[InfillingPrediction] = []
        for i, t in enumerate(tokens):
            middle = cut_at_stop(self.tokenizer.decode_infilling(t), stops)
            full_text = prefixes[i] + middle + suffixes[i]
            if lps is None:
                out.append(InfillingPrediction(generation=middle, full_text=full_text))
            else:  # keys in the order of Meta's dicts
                out.append(
                    InfillingPrediction(
                        generation=middle,
                        logprobs=lps[i],
                        tokens=self._pieces(t),
                        full_text=full_text,
                    )  # fmt: skip
                )
        return out

    def chat_completion(
        self,
        dialogs: Sequence[Sequence[Message]],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        **sampling_kwargs: Unpack[SamplingExtras],
    ) -> list[ChatPrediction]:
        """Answer each dialog as the assistant, in the Instruct model's format
        (``[INST]``/``<<SYS>>``, or 70B's ``Source:``/``<step>``, picked by the tokenizer).

        Args:
            dialogs: each a list of messages: an optional ``system`` one, then ``user`` and
                ``assistant`` alternating, ending with ``user``. A message containing a
                special tag gets Meta's error text as its answer.
            temperature, top_p, max_gen_len, logprobs, stop, seed, sampling_kwargs: as in
                :meth:`text_completion`.
        """
        prompt_tokens, stop_id = self._chat_prompts(dialogs)
        sampling = _sampling_params(temperature, top_p, sampling_kwargs)
        stops = check_stop_strings(stop)
        step_format = self.tokenizer.step_id is not None
        tokens, lps = self._token_lists(
            prompt_tokens, self._max_gen_len(max_gen_len), sampling, logprobs, False, stop_id,
            stops, seed,
        )  # fmt: skip
        out: list[ChatPrediction] = []
        for i, (dialog, t) in enumerate(zip(dialogs, tokens, strict=True)):
            answer = cut_at_stop(self.tokenizer.decode(t), stops)
            content = UNSAFE_ERROR if has_special_tags(dialog, step_format) else answer
            if step_format:  # keys in the order of Meta's dicts
                message = Message(role="assistant", destination="user", content=content)
            else:
                message = Message(role="assistant", content=content)
            pred = ChatPrediction(generation=message)
            if lps is not None:
                pred["tokens"] = self._pieces(t)
                pred["logprobs"] = lps[i]
            out.append(pred)
        return out

    # ------------------------------------------------------------------ prompts

    def _completion_prompts(self, prompts: list[str]) -> list[list[int]]:
        _check_str_list("prompts", prompts)
        return [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]

    def _infilling_prompts(
        self, prefixes: list[str], suffixes: list[str], suffix_first: bool
    ) -> tuple[list[list[int]], int]:
        """The infilling prompts, and the token that ends a middle (▁<EOT>)."""
        require_infilling(self.tokenizer)
        _check_str_list("prefixes", prefixes)
        _check_str_list("suffixes", suffixes)
        if len(prefixes) != len(suffixes):
            raise PromptError(
                f"got {len(prefixes)} prefixes but {len(suffixes)} suffixes; pass one suffix "
                "per prefix"
            )
        _check_flag("suffix_first", suffix_first)
        eot = self.tokenizer.eot_id
        assert eot is not None  # supports_infilling checked it
        prompt_tokens = [
            infilling_prompt_tokens(self.tokenizer, p, s, suffix_first=bool(suffix_first))
            for p, s in zip(prefixes, suffixes, strict=True)
        ]
        return prompt_tokens, eot

    def _chat_prompts(self, dialogs: Sequence[Sequence[Message]]) -> tuple[list[list[int]], int]:
        """The dialogs' prompts, and the token that ends an answer (EOS, or <step>)."""
        if isinstance(dialogs, (str, dict)) or not isinstance(dialogs, Sequence):
            raise PromptError(
                f"dialogs must be a list of dialogs (each a list of messages), got "
                f"{type(dialogs).__name__}: {dialogs!r:.60}"
            )
        for i, dialog in enumerate(dialogs):
            validate_dialog(dialog, index=i)
        prompt_tokens = [chat_prompt_tokens(self.tokenizer, d) for d in dialogs]
        step = self.tokenizer.step_id
        return prompt_tokens, (self.tokenizer.eos_id if step is None else step)

    # ------------------------------------------------------------------ streaming text

    def text_completion_stream(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        logprobs: bool = False,
        **sampling_kwargs: Unpack[SamplingExtras],
    ) -> Iterator[StreamEvent]:
        """:meth:`text_completion` as it happens: a :class:`StreamEvent` per row and step,
        whose texts add up to each ``generation``; with ``logprobs`` each event carries its
        token's log-probability. Arguments as in :meth:`text_completion` (no ``echo``: the
        prompt is yours already)."""
        sampling = _sampling_params(temperature, top_p, sampling_kwargs)
        prompt_tokens = self._completion_prompts(prompts)
        return self._stream_text(
            prompt_tokens, self.tokenizer.eos_id, self.tokenizer.decode, max_gen_len,
            sampling, stop, seed, logprobs,
        )  # fmt: skip

    def text_infilling_stream(
        self,
        prefixes: list[str],
        suffixes: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        suffix_first: bool = False,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        logprobs: bool = False,
        **sampling_kwargs: Unpack[SamplingExtras],
    ) -> Iterator[StreamEvent]:
        """:meth:`text_infilling` as it happens; the texts add up to each ``generation``.
        Arguments as in :meth:`text_infilling`; ``logprobs`` as in
        :meth:`text_completion_stream`."""
        prompt_tokens, eot = self._infilling_prompts(prefixes, suffixes, suffix_first)
        sampling = _sampling_params(temperature, top_p, sampling_kwargs)
        return self._stream_text(
            prompt_tokens, eot, self.tokenizer.decode_infilling, max_gen_len, sampling, stop,
            seed, logprobs,
        )  # fmt: skip

    def chat_completion_stream(
        self,
        dialogs: Sequence[Sequence[Message]],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        logprobs: bool = False,
        **sampling_kwargs: Unpack[SamplingExtras],
    ) -> Iterator[StreamEvent]:
        """:meth:`chat_completion` as it happens; the texts add up to each answer's
        ``content`` (a dialog with special tags gets Meta's error text, at its end).
        Arguments as in :meth:`chat_completion`; ``logprobs`` as in
        :meth:`text_completion_stream`."""
        prompt_tokens, stop_id = self._chat_prompts(dialogs)
        sampling = _sampling_params(temperature, top_p, sampling_kwargs)
        step_format = self.tokenizer.step_id is not None
        unsafe = {i for i, d in enumerate(dialogs) if has_special_tags(d, step_format)}
        return self._stream_text(
            prompt_tokens, stop_id, self.tokenizer.decode, max_gen_len, sampling, stop, seed,
            logprobs, unsafe,
        )  # fmt: skip

    def _stream_text(
        self,
        prompt_tokens: list[list[int]],
        stop_id: int,
        decode: Callable[[Sequence[int]], str],
        max_gen_len: int | None,
        sampling: SamplingParams,
        stop: str | Sequence[str] | None,
        seed: int | None,
        logprobs: bool,
        unsafe: set[int] | frozenset[int] = frozenset(),
    ) -> Iterator[StreamEvent]:
        """Run the core and turn each row's tokens into text pieces (see TextAssembler)."""
        stops = check_stop_strings(stop)
        events = self._generate(
            prompt_tokens, self._max_gen_len(max_gen_len), sampling, logprobs, False,
            (stop_id,), seed, [], stops, decode,
        )  # fmt: skip

        def run() -> Iterator[StreamEvent]:
            texts: dict[int, TextAssembler] = {}
            plain = self.tokenizer.is_plain_piece
            for row, token in events:
                i = row.index
                if i not in texts:
                    texts[i] = TextAssembler(
                        (lambda t: "") if i in unsafe else decode,
                        stops,
                        None if i in unsafe else plain,
                    )
                logprob = row.logprobs[-1] if logprobs and token is not None else None
                if row.finish_reason is None:
                    yield StreamEvent(i, texts[i].push(row.tokens), token, logprob=logprob)
                    continue
                final = UNSAFE_ERROR if i in unsafe else cut_at_stop(decode(row.tokens), stops)
                yield StreamEvent(
                    i, texts[i].push(row.tokens, final), token, row.finish_reason,
                    row.stop_string, logprob,
                )  # fmt: skip

        return run()


def _sampling_params(temperature: float, top_p: float, extras: Mapping[str, Any]) -> SamplingParams:
    """SamplingParams from Meta's two arguments and the extra keywords, which must be
    among ``top_k``, ``min_p``, ``repetition_penalty``."""
    unknown = sorted(set(extras) - _SAMPLING_EXTRAS)
    if unknown:
        raise PromptError(
            f"unknown argument(s) {unknown}: not among this method's arguments (see its "
            f"help), nor the extra sampling keywords {sorted(_SAMPLING_EXTRAS)}"
        )
    return SamplingParams(temperature=temperature, top_p=top_p, **extras)


def _returning_text(decode: Callable[[Sequence[int]], str]) -> Callable[[Sequence[int]], str]:
    """``decode``, checked to return a str (stop strings are searched in what it returns)."""

    def read(ids: Sequence[int]) -> str:
        text = decode(ids)
        if not isinstance(text, str):
            raise PromptError(
                f"decode must return the text (a str) of the token ids it is given, got "
                f"{type(text).__name__}: {text!r:.40}"
            )
        return text

    return read


def _check_flag(name: str, value: object) -> None:
    if not is_flag(value):
        raise PromptError(f"{name} must be True or False, got {value!r:.40}")


def _padded(rows: Sequence[_Row], width: int) -> torch.Tensor:
    """The rows' prompts as one (B, width) tensor, each padded with 0 after its end."""
    prompt = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
    for i, r in enumerate(rows):
        prompt[i, : len(r.prompt)] = torch.tensor(r.prompt, dtype=torch.long, device="cpu")
    return prompt


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _as_lists(value: Any) -> Any:
    """numpy arrays and torch tensors of token ids, as (nested) lists; anything else as is."""
    if isinstance(value, torch.Tensor) and value.is_meta:
        raise PromptError(
            "prompt token ids are in a tensor on the meta device, which holds no values; "
            "make it on the CPU (e.g. torch.tensor(ids)) or on the model's device"
        )
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":
        return value.tolist()
    return value


def _linear_dtype(
    kernel: native.NativeLinear | None, dtype: torch.dtype, paths: Sequence[os.PathLike[str]]
) -> torch.dtype:
    """The dtype the linear weights will be kept in: bf16 for an fp32 CPU model whose
    checkpoint holds only bf16 (NativeLinear.storage_dtype), else ``dtype``."""
    if kernel is None or not kernel.can_pack(dtype) or not paths:
        return dtype
    if any(stored_dtypes(path) != {torch.bfloat16} for path in paths):
        return dtype  # a shard in another dtype (or unreadable): count them in ``dtype``
    return kernel.storage_dtype(dtype, torch.bfloat16)


def _check_memory(
    args: ModelArgs,
    dtype: torch.dtype,
    device: torch.device,
    mp: int,
    linear_dtype: torch.dtype | None = None,
) -> None:
    """Refuse sizes whose weights and KV cache cannot fit, before allocating anything
    (else the allocator fails late or the OS kills the process)."""
    free = distributed.available_memory(device)
    if free is None:
        return
    weights = weight_bytes(args, dtype, mp, linear_dtype)
    cache = kv_cache_bytes(args, dtype, mp) + rope_table_bytes(args)  # both grow with length
    if weights + cache <= free:
        return
    gib = 2**30
    where = f"{device.type} has {free / gib:.1f} GiB free"
    if weights > free:
        raise OutOfMemoryError(
            f"the weights need {_size(weights)} per process but {where}; use a machine "
            "with more memory, more model-parallel processes, or a smaller dtype"
        )
    per_row_token = cache / (args.max_batch_size * args.max_seq_len)
    fits = int((free - weights) // (per_row_token * args.max_batch_size))
    rows = int((free - weights) // (per_row_token * args.max_seq_len))
    if fits >= 1:
        fix = f"lower max_seq_len (at most {fits} fits at this batch size)"
        if rows >= 1:
            fix += f" or max_batch_size (at most {rows} rows fit at this length)"
    else:
        fix = f"lower max_batch_size (not even max_seq_len=1 fits {args.max_batch_size} rows)"
    raise OutOfMemoryError(
        f"max_seq_len={args.max_seq_len} x max_batch_size={args.max_batch_size} needs a "
        f"{_size(cache)} KV cache ({_size(per_row_token * 1024)} per 1K tokens per batch "
        f"row) on top of {_size(weights)} of weights, but {where}; {fix}"
    )


def _size(n: float) -> str:
    """``n`` bytes in GiB, MiB or KiB, whichever reads best."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Hold off Python's cyclic garbage collector while the model is built.

    Building creates a few thousand objects, enough to trigger a full collection, which
    walks every object torch (and any other big library) created at import: 0.1 s of a
    0.6 s build on a 2-core CPU. The build makes no reference cycles worth collecting.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _check_seed_and_compile(seed: object, compile: object) -> None:
    if not _seed_ok(seed):
        raise ConfigError(f"seed must be an integer in [-2**63, 2**64), got {seed!r:.40}")
    if not is_flag(compile):
        raise ConfigError(f"compile must be True or False, got {compile!r}")


def _seed_ok(seed: object) -> bool:
    """Whether torch.Generator.manual_seed takes ``seed``."""
    return _is_int(seed) and -(2**63) <= seed < 2**64  # type: ignore[operator]


def _is_int(value: object) -> bool:
    """An integer, numpy's included; not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(name: str, value: object) -> int:
    if not _is_int(value) or value < 1:  # type: ignore[operator]
        raise ConfigError(f"{name} must be a positive integer (>= 1), got {value!r}")
    return int(value)  # type: ignore[call-overload]


def _check_str_list(name: str, values: object) -> None:
    if isinstance(values, TEXTLIKE) or not isinstance(values, Sequence):
        hint = f"; wrap a single one in a list: [{values!r:.40}]" if isinstance(values, str) else ""
        raise PromptError(
            f"{name} must be a list of strings, got {type(values).__name__}: {values!r:.60}{hint}"
        )
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise PromptError(f"{name}[{i}] must be a str, got {type(v).__name__}: {v!r:.60}")
        check_text(v, f"{name}[{i}]")


def _prefill_groups(lens: list[int], overhead: int) -> list[tuple[int, int]]:
    """Split rows sorted by decreasing length into contiguous groups [a, b) for prefill.

    A group costs ``overhead`` (a pass over the weights) plus its padded tokens
    ``(b - a) * lens[a]``; dynamic programming finds the cheapest split. Equal lengths give
    one group; very different lengths are prefilled apart instead of padded. A cut inside a
    run of equal lengths is never cheaper than at the run's start, so only those starts are
    tried: the work is quadratic in the number of distinct lengths, not of rows.
    """
    n = len(lens)
    points = [i for i in range(n) if i == 0 or lens[i] != lens[i - 1]] + [n]
    best = {0: 0}
    cut = {0: 0}
    for j in points[1:]:
        best[j], cut[j] = min((best[i] + overhead + (j - i) * lens[i], i) for i in points if i < j)
    groups = []
    j = n
    while j > 0:
        groups.append((cut[j], j))
        j = cut[j]
    return groups[::-1]
