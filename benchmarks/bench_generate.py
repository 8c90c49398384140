"""Generation speed and memory of ``codellama`` against Hugging Face ``LlamaForCausalLM``.

Random weights of a real Code Llama shape are written once in Meta's layout (bf16 on disk,
as Meta's checkpoints; cached in codellama's cache folder: ``$CODELLAMA_CACHE/bench``, else
``$XDG_CACHE_HOME/codellama/bench``, else ``~/.cache/codellama/bench``).
Each library runs in its own subprocess (so peak RSS is per library) on the same weights,
device and dtype, with greedy decoding and no stop token, one library at a time (the
default, ``--sequential``). ``--sequential False`` keeps both loaded and alternates them run
by run, so that load from other processes hits both alike; on a 2-core machine the resident
peer then slows the other down (our batch-1 decode measured 19 instead of 32 tok/s). The big
shapes write big checkpoints (7b/13b/34b: 13/26/68 GB); shrink them with --n_layers.

    python benchmarks/bench_generate.py --shape small --dtype float32
    python benchmarks/bench_generate.py --shape tiny --runs 1             # a quick smoke test
    python benchmarks/bench_generate.py --shape 7b --device cuda --dtype bfloat16 \\
        --bandwidth_gbs 3350 --out 7b.json                                 # H100 SXM
    python benchmarks/bench_generate.py --shape 34b --n_layers 4 --peers none

Options: --shape tiny|small|7b|13b|34b, --n_layers N (shrink a shape), --dtype float32|
bfloat16|float16, --device cpu|cuda, --runs 3 (median after one warm-up), --peers hf|none,
--compile False (ours only; HF always runs eagerly), --bandwidth_gbs (skip measuring it),
--threads (default: the CPUs this process may use), --prefill_chunk_size (the library's default),
--max_seq_len 1088 (ours preallocates its KV cache for this many positions: a larger value
shows that decoding does not slow down with it), --disk_dtype bfloat16|float16|float32 (the
checkpoint's, as Meta's are bf16), --sequential True, --build_runs N (fresh-process
builds after the first; default --runs: on a GPU each costs a 13 GB load), --out FILE (JSON
with every timing).

Figures: batch-1 and batch-8 decode tok/s (new tokens after the first / the time from the
first token to the last, within each run), prefill tok/s of one 1024-token prompt, wall time of a mixed batch (8 prompts
of 16..512 tokens, 64 new tokens each), time to first token, build time (the median of
1 + runs builds, each in a fresh process, the libraries alternating), peak RSS (and peak
GPU memory on CUDA), and the fraction of the memory-bandwidth bound reached at batch-1
decode (bandwidth / bytes read per token: weights except the embedding table, plus KV) and
of the matrix-vector pass (one pass of the fastest matrix-vector kernel here, one call per
weight, over the same weight shapes: decoding with no other work, but with a call per
weight, so a decoding step that runs every layer in one call can exceed it).
Tokenizer: ``$CODELLAMA_TOKENIZER`` (Meta's tokenizer.model) if set; else a small one is
trained and padded with unused pieces to 32016 (the prompt ids are random in [3, 32000)).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import random
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

VOCAB = 32016
BASE = {"multiple_of": 256, "rope_theta": 1e6, "norm_eps": 1e-5, "vocab_size": VOCAB}
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2},
    "small": {"dim": 1024, "n_layers": 8, "n_heads": 16, "n_kv_heads": 4},
    "7b": {"dim": 4096, "n_layers": 32, "n_heads": 32},
    "13b": {"dim": 5120, "n_layers": 40, "n_heads": 40},
    "34b": {"dim": 8192, "n_layers": 48, "n_heads": 64, "n_kv_heads": 8, "ffn_dim_multiplier": 1.0},
}
PROMPT_LEN, NEW_TOKENS, BATCH, PREFILL_LEN = 32, 64, 8, 1024
MIXED_LENS = [16, 48, 80, 128, 200, 300, 400, 512]
MAX_SEQ_LEN = PREFILL_LEN + NEW_TOKENS
# generate(prompts, new tokens) -> (tokens, perf_counter() when the first token was there)
GenFn = Callable[[list[list[int]], int], tuple[list[list[int]], float]]
Built = tuple[GenFn, int, int, str]  # generate, parameter bytes, KV bytes, decode kernel
try:
    HF_VERSION: str | None = version("transformers")
except PackageNotFoundError:
    HF_VERSION = None

# (key, label, higher is better); the table shows them in this order.
METRICS = [
    ("decode_b1_tok_s", "decode tok/s, batch 1 (32-token prompt)", True),
    ("decode_b8_tok_s", "decode tok/s, batch 8 (aggregate)", True),
    ("e2e_b8_tok_s", "end-to-end tok/s, batch 8 (incl. prefill)", True),
    ("prefill_tok_s", f"prefill tok/s ({PREFILL_LEN}-token prompt)", True),
    ("mixed_batch_s", "mixed batch wall s (8 prompts 16..512, +64)", False),
    ("ttft_b1_s", "time to first token s (batch 1)", False),
    ("warmup_b1_s", "first batch-1 run s (warm-up; torch.compile compiles here)", False),
    ("warmup_b8_s", "first batch-8 run s (warm-up; a second compile for 8 rows)", False),
    ("build_s", "build/load s (median, fresh processes)", False),
    ("rss_before_build_mb", "RSS before build MB (imports)", False),
    ("peak_rss_build_mb", "peak RSS after build MB", False),
    ("build_rss_over_weights", "build RSS growth / (params + KV)", False),
    ("peak_rss_mb", "peak RSS MB (whole run)", False),
    ("cuda_build_peak_mb", "peak GPU memory after build MB", False),
    ("cuda_peak_mb", "peak GPU memory MB (whole run)", False),
    ("bw_fraction_b1", "fraction of bandwidth bound, batch-1 decode", True),
    ("gemv_fraction_b1", "batch-1 decode / one matrix-vector pass (a call per weight)", True),
]


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _maxrss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (2**20 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _cache_dir() -> Path:
    from codellama.demo import demo_dir

    return demo_dir().parent / "bench"


# --------------------------------------------------------------------- tokenizer, checkpoint


def _pad_tokenizer(model: bytes, have: int, want: int) -> bytes:
    """Append pieces of type UNUSED (5) to a serialized SentencePiece ModelProto: each is a
    field-1 message {1: piece, 2: score (float), 3: type}; lengths < 128 fit in one byte."""
    out = bytearray(model)
    for i in range(have, want):
        piece = f"<unused_{i}>".encode()
        body = bytes([0x0A, len(piece)]) + piece + b"\x15" + struct.pack("<f", 0.0) + b"\x18\x05"
        out += bytes([0x0A, len(body)]) + body
    return bytes(out)


def ensure_tokenizer() -> tuple[str, int, str]:
    """(tokenizer path, n_words, where it came from)."""
    from codellama.tokenizer import Tokenizer

    env = os.environ.get("CODELLAMA_TOKENIZER")
    if env:
        return env, Tokenizer(env).n_words, f"$CODELLAMA_TOKENIZER ({env})"
    path = _cache_dir() / f"tokenizer-{VOCAB}.model"
    if not path.is_file():
        from codellama.demo import train_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            small = train_tokenizer(Path(tmp) / "t.model")
            have = Tokenizer(small).n_words
            padded = Path(tmp) / "padded.model"
            padded.write_bytes(_pad_tokenizer(small.read_bytes(), have, VOCAB))
            try:
                ok = Tokenizer(padded).n_words == VOCAB
            except Exception:
                ok = False
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes((padded if ok else small).read_bytes())
    n = Tokenizer(path).n_words
    how = "padded with unused pieces" if n == VOCAB else f"{n} pieces: padding failed"
    return str(path), n, f"trained demo tokenizer, {how} ({path})"


def write_checkpoint(spec: dict[str, Any]) -> None:
    from codellama.demo import write_random_checkpoint
    from codellama.model import ModelArgs

    args = ModelArgs(**spec["args"])
    d = Path(spec["ckpt"])
    params = d / "params.json"
    want = json.loads(json.dumps(args.to_params()))
    have = json.loads(params.read_text()) if params.is_file() else None
    if (d / "consolidated.00.pth").is_file() and have == want:
        return
    print(f"writing a random {spec['shape']} checkpoint to {d} ...", flush=True)
    dtype = getattr(torch, spec["disk_dtype"])
    write_random_checkpoint(
        d, args, seed=0, dtype=dtype, std=0.02, overwrite=True, device=spec["draw_device"]
    )


def warm_page_cache(ckpt: Path) -> None:
    """Read the checkpoint once, so that every library's build reads it from the page cache
    (else the first library to build pays for the disk)."""
    for path in sorted(ckpt.iterdir()):
        if path.is_file():
            with path.open("rb") as f:
                while f.read(1 << 24):
                    pass


def measure_bandwidth(x: torch.Tensor, passes: int = 5) -> float:
    """Read bandwidth in GB/s: x.sum() over ``x`` (float32), the best of ``passes`` after a
    warm-up (a bound is the best the machine does right now)."""
    times = []
    for _ in range(passes + 1):  # the first is a warm-up
        t = time.perf_counter()
        x.sum().item()
        times.append(time.perf_counter() - t)
    return x.numel() * x.element_size() / min(times[1:]) / 1e9


def measure_gemv_pass(spec: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s of one pass of matrix-vector products over the shape's linear weights (every
    one but the embedding), the issue's "limit" column: the fastest kernel here (F.linear;
    on CPU also oneDNN's prepacked linear and codellama's native kernel), one call per
    weight, median of 5 passes after a warm-up. Decoding one layer at a time cannot beat
    it; codellama's native decoding step (every layer in one call) can."""
    from codellama.model import ModelArgs

    a = ModelArgs(**{k: v for k, v in spec["args"].items() if k != "n_layers"}, n_layers=1)
    dev, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    q, kv, hid = a.n_heads * a.head_dim, a.kv_heads * a.head_dim, a.ffn_hidden_dim
    layer = [(q, a.dim), (kv, a.dim), (kv, a.dim), (a.dim, q), (hid, a.dim), (hid, a.dim),
             (a.dim, hid)]  # fmt: skip
    shapes = layer * spec["args"]["n_layers"] + [(a.vocab_size, a.dim)]
    source = getattr(torch, spec["disk_dtype"])  # values the checkpoint's dtype holds exactly
    weights = [
        torch.empty(s, device=dev, dtype=dtype).uniform_(-0.02, 0.02).to(source).to(dtype)
        for s in shapes
    ]
    Fn = Callable[[torch.Tensor, Any], Any]
    # name -> (kernel, its form of the weights); forms are made only while timed (memory)
    kernels: dict[str, tuple[Fn, Callable[[], list[Any]]]] = {
        "F.linear": (torch.nn.functional.linear, lambda: weights)
    }
    if dev.type == "cpu" and torch.backends.mkldnn.is_available() and dtype != torch.float16:
        from codellama import native

        def packed(hint: int | None) -> list[torch.Tensor]:
            return [torch.ops.mkldnn._reorder_linear_weight(w, hint) for w in weights]

        # oneDNN packs bf16 only with AVX-512 (or AVX-NE-CONVERT); an AVX2 CPU keeps it plain
        onednn = dtype == torch.float32 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if onednn:
            kernels["oneDNN prepacked"] = (
                lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
                lambda: packed(1),
            )
        kernel = native.load()
        if kernel is not None and onednn:  # as the model runs it: on the general packed layout

            def plans() -> list[Any]:
                found = [kernel.plan(w, None) for w in packed(None)]
                return found if all(p is not None for p in found) else []

            kernels["codellama native on oneDNN-packed weights"] = (lambda x, p: p(x), plans)
        if kernel is not None and kernel.can_pack(dtype):  # the model's own packed layout
            stored = kernel.storage_dtype(dtype, source)  # fp32 models: bf16 kept as bf16

            def own() -> list[Any]:
                assert kernel is not None
                packed = [kernel.pack(w, stored) for w in weights]
                return [kernel.plan_packed(p, *w.shape, dtype) for p, w in zip(packed, weights)]

            kernels["codellama native on its packed weights"] = (lambda x, p: p(x), own)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    best: dict[str, Any] = {"gemv_tok_s": 0.0, "gemv_kernel": ""}
    xs = {n: torch.ones(1, n, device=dev, dtype=dtype) for n in {s[1] for s in shapes}}
    with torch.inference_mode():
        for name, (fn, make) in kernels.items():
            ws = make()
            if not ws:
                continue
            times = []
            for _ in range(6):  # the first is a warm-up
                sync()
                t = time.perf_counter()
                for (_, n), w in zip(shapes, ws):
                    fn(xs[n], w)
                sync()
                times.append(time.perf_counter() - t)
            del ws
            tok_s = 1 / statistics.median(times[1:])
            if tok_s > best["gemv_tok_s"]:
                best = {"gemv_tok_s": tok_s, "gemv_kernel": name}
    return best


def _build_ours(spec: dict[str, Any]) -> Built:
    from codellama import Llama, SamplingParams
    from codellama.generation import DEFAULT_PREFILL_CHUNK
    from codellama.model import kv_cache_bytes, parameter_bytes

    llama = Llama.build(
        spec["ckpt"], spec["tokenizer"], spec["max_seq_len"], BATCH,
        device=spec["device"], dtype=spec["dtype"], seed=1, compile=spec["compile"],
        prefill_chunk_size=spec["prefill_chunk_size"] or DEFAULT_PREFILL_CHUNK,
    )  # fmt: skip
    greedy = SamplingParams(temperature=0.0)

    def gen(ps: list[list[int]], n: int) -> tuple[list[list[int]], float]:
        tokens: list[list[int]] = [[] for _ in ps]
        first = None
        for i, token in llama.generate_stream(ps, n, greedy, stop_tokens=()):
            if first is None:  # the host has the first token (the stream syncs for it)
                first = time.perf_counter()
            tokens[i].append(token)
        return tokens, first if first is not None else time.perf_counter()

    model = llama.model
    packed = "oneDNN prepacked" if any(p.is_mkldnn for p in model.parameters()) else "F.linear"
    planned = [m for m in model.modules() if m.__dict__.get("native_plan") is not None]
    kernel = f"codellama native ({len(planned)} layers)" if planned else packed
    from codellama import gpu_kernels

    if model.device.type == "cuda" and gpu_kernels._enabled:
        kernel = f"Triton small_matmul (codellama.gpu_kernels) up to {gpu_kernels.MAX_ROWS} rows"
    if model.native_decoder is not None:
        kernel = f"codellama native decoding step (all {model.params.n_layers} layers, one call)"
    if any(m.native_plan.w16 for m in planned):
        kernel += "; fp32 products on linear weights kept in bf16 (the checkpoint's exact values)"
    return gen, parameter_bytes(model), kv_cache_bytes(model.params, model.dtype), kernel


def _build_hf(spec: dict[str, Any]) -> Built:
    """LlamaForCausalLM (sdpa) from the same Meta checkpoint, mapped tensor by tensor."""
    import transformers

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older 5.x and 4.x
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef]

    from codellama.checkpoint import iter_full_tensors
    from codellama.convert import meta_to_hf_name, permute_rotary
    from codellama.model import ModelArgs

    a = ModelArgs(**spec["args"])
    dev, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    rope: dict[str, Any] = {"rope_theta": a.rope_theta}  # transformers 4
    if int(transformers.__version__.split(".")[0]) >= 5:
        rope = {"rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta}}
    config = transformers.LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_hidden_dim,
        num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
        num_key_value_heads=a.kv_heads, rms_norm_eps=a.norm_eps, max_position_embeddings=16384,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=None, pad_token_id=0, **rope,
    )  # fmt: skip
    with no_init_weights(), dev:
        model = transformers.LlamaForCausalLM._from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
    model.eval().requires_grad_(False)
    params = dict(model.named_parameters())
    heads = {"attention.wq.weight": a.n_heads, "attention.wk.weight": a.kv_heads}
    loaded = set()
    with torch.no_grad():
        for name, t in iter_full_tensors(spec["ckpt"]):
            hf_name = meta_to_hf_name(name)
            n = next((h for suffix, h in heads.items() if name.endswith(suffix)), None)
            if n is not None:
                t = permute_rotary(t, n)  # Meta's interleaved rotary pairs -> HF's halves
            params[hf_name].copy_(t)
            loaded.add(hf_name)
    assert loaded == set(params), f"unloaded HF parameters: {sorted(set(params) - loaded)[:5]}"
    model.generation_config = transformers.GenerationConfig(
        do_sample=False, eos_token_id=None, pad_token_id=0, bos_token_id=1
    )

    class FirstToken(transformers.StoppingCriteria):
        """Notes when generate has its first token (it asks after every step); never stops."""

        first: float | None = None

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            if self.first is None:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                self.first = time.perf_counter()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def gen(ps: list[list[int]], n: int) -> tuple[list[list[int]], float]:
        first = FirstToken()
        width = max(len(p) for p in ps)
        ids = torch.zeros((len(ps), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(ps):  # left padding
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=n,
            min_new_tokens=n, do_sample=False, use_cache=True,
            stopping_criteria=transformers.StoppingCriteriaList([first]),
        )  # fmt: skip
        return out[:, width:].tolist(), first.first or time.perf_counter()

    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return gen, nbytes, 0, "F.linear"  # 0: the dynamic cache grows during generation


# --------------------------------------------------------------------- workers

MARK = "@@bench@@ "  # prefixes a worker's replies on its stdout (other lines are echoed)
# Timed figures: name -> (prompts, new tokens). The first run of each is a warm-up.
MEASURES = {
    "ttft_b1": ("b1", 1),
    "b1": ("b1", NEW_TOKENS),
    "ttft_b8": ("b8", 1),
    "b8": ("b8", NEW_TOKENS),
    "prefill": ("long", 1),
    "mixed": ("mixed", NEW_TOKENS),
}


def _reply(obj: dict[str, Any]) -> None:
    print(MARK + json.dumps(obj), flush=True)


def serve(spec: dict[str, Any]) -> None:
    """A worker: one task (write, gemv), a bandwidth probe that measures on request, or one
    library built and timed on request."""
    torch.set_num_threads(spec["threads"])
    if spec["task"] == "write":
        write_checkpoint(spec)
        return _reply({})
    if spec["task"] == "bandwidth":  # a probe, asked before each batch-1 run
        dev = torch.device(spec["device"])  # 1 GiB; 4 GiB on a GPU, where 1 takes ~0.3 ms
        x = torch.ones(2**30 if dev.type == "cuda" else 2**28, device=dev)
        _reply({})
        for _ in sys.stdin:
            _reply({"bandwidth_gbs": measure_bandwidth(x)})
        return None
    if spec["task"] == "gemv":
        return _reply(measure_gemv_pass(spec))
    cuda = torch.device(spec["device"]).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # Imports are not part of the build: resolve them (and transformers' lazy ones) first.
    if spec["task"] == "hf":
        from transformers import GenerationConfig, LlamaForCausalLM  # noqa: F401
    import codellama.generation  # noqa: F401

    # The imports leave a full garbage collection due (their ~170K objects have never been
    # collected): run it now, so that neither library's build pays ~0.1 s for the imports.
    gc.collect()

    rss0 = _rss_mb()
    t = time.perf_counter()
    build = _build_hf if spec["task"] == "hf" else _build_ours
    gen, param_bytes, kv_bytes, kernel = build(spec)
    sync()
    res: dict[str, Any] = {"build_s": time.perf_counter() - t, "param_bytes": param_bytes}
    res["linear_kernel"] = kernel
    res.update(kv_bytes=kv_bytes, rss_before_build_mb=rss0, peak_rss_build_mb=_maxrss_mb())
    if cuda:
        res["cuda_build_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["gpu"] = torch.cuda.get_device_name()
    else:
        grown = (res["peak_rss_build_mb"] - rss0) * 2**20
        res["build_rss_over_weights"] = grown / (param_bytes + kv_bytes)
    _reply(res)
    p = spec["prompts"]
    batches = {"b1": [p["b1"]], "b8": p["b8"], "long": [p["long"]], "mixed": p["mixed"]}
    with torch.inference_mode():
        for line in sys.stdin:
            name = json.loads(line)["op"]
            if name == "done":
                res = {"peak_rss_mb": _maxrss_mb()}
                if cuda:
                    res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
                return _reply(res)
            prompts, n = MEASURES[name]
            sync()
            t = time.perf_counter()
            tokens, first = gen(batches[prompts], n)
            sync()
            dt = time.perf_counter() - t
            got = {len(r) for r in tokens}
            assert got == {n}, f"{name}: expected {n} new tokens per row, got {got}"
            _reply({"s": dt, "first_s": first - t, "tokens": tokens[0] if name == "b1" else None})


class Worker:
    """A subprocess running :func:`serve`; ``ask`` sends a request (if any), returns a reply."""

    def __init__(self, spec: dict[str, Any]):
        cmd = [sys.executable, __file__, "--worker", "True"]
        self.task = spec["task"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ask(spec, wait=False)  # its first reply: the task's result, or the build's

    def ask(self, request: dict[str, Any] | None = None, wait: bool = True) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        if not wait:
            return {}
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
            sys.stdout.write(line)
        raise SystemExit(f"the {self.task} worker failed (exit {self.proc.wait()})")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Run a one-reply task (write, gemv) in a subprocess."""
    w = Worker(spec)
    reply = w.ask()
    w.close()
    return reply


def benchmark(
    base: dict[str, Any],
    libs: list[str],
    runs: int,
    paired: bool,
    probe: Worker | None = None,
    build_runs: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Time every figure for ``libs``; ``paired`` keeps all workers alive and alternates them
    run by run, so that load from other processes hits every library alike. ``probe`` (a
    bandwidth worker) measures read bandwidth right before each batch-1 run and after the
    last: on a shared machine it drifts by 2x within minutes, so each library's batch-1
    figure is set against the bandwidth of its own minute. Building is timed ``runs`` more
    times, each in a fresh process, the libraries alternating: one build is a single sample
    of something that varies by +-20% here (``build_runs`` times instead, if given)."""
    results: dict[str, dict[str, Any]] = {}
    for group in [libs] if paired else [[lib] for lib in libs]:
        workers = {}
        for lib in group:  # builds one after the other, each timed alone
            print(f"--- building {lib}", flush=True)
            workers[lib] = w = Worker({**base, "task": lib})
            results[lib] = {**w.ask(), "loadavg": [os.getloadavg()[0]]}
            results[lib]["times"] = {name: [] for name in MEASURES}
        for name in MEASURES:
            print(f"--- timing {name} ({', '.join(group)})", flush=True)
            for run in range(runs + 1):
                for lib, w in workers.items():
                    if name == "b1" and run and probe is not None:
                        bandwidth = probe.ask({"op": "probe"})["bandwidth_gbs"]
                        results[lib].setdefault("bandwidth_b1", []).append(bandwidth)
                    reply = w.ask({"op": name})
                    if run:
                        results[lib]["times"][name].append(reply["s"])
                        if name in ("b1", "b8"):  # decoding alone: after this run's first token
                            rows = 1 if name == "b1" else BATCH
                            decode = reply["s"] - reply["first_s"]
                            results[lib].setdefault(f"decode_{name}_all", []).append(
                                rows * (NEW_TOKENS - 1) / max(decode, 1e-9)
                            )
                    elif name in ("b1", "b8"):  # its first decode steps: compiling, if any
                        results[lib][f"warmup_{name}_s"] = reply["s"]
                    if reply["tokens"] is not None:
                        results[lib]["tokens_b1"] = reply["tokens"]
            if name == "b1" and probe is not None:
                for lib in workers:
                    bandwidth = probe.ask({"op": "probe"})["bandwidth_gbs"]
                    results[lib]["bandwidth_b1"].append(bandwidth)
            for lib in workers:  # as measured: a run cut off later still leaves these
                med = statistics.median(results[lib]["times"][name])
                bw = results[lib].get("bandwidth_b1", []) if name == "b1" else []
                print(f"    {lib} {name}: median {med:.4f} s" + (
                    f" (bandwidth probes {', '.join(f'{b:.0f}' for b in bw)} GB/s)" if bw else ""),
                    flush=True)  # fmt: skip
        for lib, w in workers.items():
            results[lib].update(w.ask({"op": "done"}))
            results[lib]["loadavg"].append(os.getloadavg()[0])
            w.close()
    for res in results.values():
        res["build_s_all"] = [res["build_s"]]
    for _ in range(runs if build_runs is None else build_runs):
        for lib in libs:
            print(f"--- building {lib} again (a fresh process)", flush=True)
            w = Worker({**base, "task": lib})
            results[lib]["build_s_all"].append(w.ask()["build_s"])
            w.ask({"op": "done"})
            w.close()
    for res in results.values():
        res["build_s"] = statistics.median(res["build_s_all"])
        med = {k: statistics.median(v) for k, v in res["times"].items()}
        res.update(
            ttft_b1_s=med["ttft_b1"],
            decode_b1_tok_s=statistics.median(res["decode_b1_all"]),
            decode_b8_tok_s=statistics.median(res["decode_b8_all"]),
            e2e_b8_tok_s=BATCH * NEW_TOKENS / med["b8"],
            prefill_tok_s=PREFILL_LEN / med["prefill"],
            mixed_batch_s=med["mixed"],
        )
    return results


# --------------------------------------------------------------------- report


def machine_info(device: str, dtype: str, threads: int, gpu: str | None) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": threads, "device": device,
            "gpu": gpu, "dtype": dtype, "torch": torch.__version__,
            "transformers": HF_VERSION, "python": platform.python_version()}  # fmt: skip
    return {k: v for k, v in info.items() if v is not None}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def table(results: dict[str, dict[str, Any]]) -> str:
    ours, hf = results.get("ours", {}), results.get("hf", {})
    lines = ["| metric | ours | HF | ours/HF | better |", "|---|---|---|---|---|"]
    for key, label, higher in METRICS:
        a, b = ours.get(key), hf.get(key)
        if a is None and b is None:
            continue
        ratio, better = None, "-"
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            ratio = a / b
            better = "=" if a == b else ("ours" if (ratio > 1) == higher else "HF")
        lines.append(f"| {label} | {_fmt(a)} | {_fmt(b)} | {_fmt(ratio)} | {better} |")
    return "\n".join(lines)


def main(
    shape: str = "small",
    dtype: str = "float32",
    device: str = "cpu",
    runs: int = 3,
    peers: str = "hf",
    compile: bool = False,
    out: str | None = None,
    n_layers: int | None = None,
    bandwidth_gbs: float | None = None,
    threads: int | None = None,
    prefill_chunk_size: int | None = None,
    max_seq_len: int = MAX_SEQ_LEN,
    disk_dtype: str = "bfloat16",
    sequential: bool = True,
    build_runs: int | None = None,
    worker: bool = False,
) -> None:
    """Benchmark generation; see the module docstring."""
    if worker:  # internal: this process is a worker; its spec is the first line of stdin
        return serve(json.loads(sys.stdin.readline()))
    _check_options(runs, build_runs, n_layers, threads, prefill_chunk_size, max_seq_len,
                   bandwidth_gbs, disk_dtype, device, compile, sequential)  # fmt: skip
    if int(max_seq_len) < MAX_SEQ_LEN:
        raise SystemExit(f"--max_seq_len must be at least {MAX_SEQ_LEN} (the longest prompt + "
                         f"new tokens), got {max_seq_len}")  # fmt: skip
    if shape not in SHAPES:
        raise SystemExit(f"--shape must be one of {sorted(SHAPES)}, got {shape!r}")
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if isinstance(peers, (list, tuple)):  # fire parses "--peers hf,x" as a tuple
        peers = " ".join(map(str, peers))
    peer_list = [p for p in str(peers).replace(",", " ").split() if p not in ("none", "")]
    unknown = set(peer_list) - {"hf"}
    if unknown:
        raise SystemExit(f"--peers knows only 'hf' (or 'none'), got {sorted(unknown)}")
    threads = threads or _threads()
    notes: list[str] = []
    tok_path, n_words, tok_src = ensure_tokenizer()
    args = {**BASE, **SHAPES[shape]}
    if n_layers:
        args["n_layers"] = int(n_layers)
    if n_words != VOCAB:
        notes.append(f"tokenizer has {n_words} pieces, not {VOCAB}: vocab_size set to {n_words}")
        args["vocab_size"] = n_words
    # A GPU draws the random weights (a 7B model's in seconds, not a minute); other values.
    draw = "cuda" if torch.device(device).type == "cuda" else "cpu"
    tag = f"{shape}-L{args['n_layers']}-V{args['vocab_size']}-{disk_dtype}"
    tag += "-cuda" if draw == "cuda" else ""
    ckpt = str(_cache_dir() / tag)
    rng = random.Random(0)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, min(32000, args["vocab_size"])) for _ in range(n)]

    prompts = {"b1": prompt(PROMPT_LEN), "b8": [prompt(PROMPT_LEN) for _ in range(BATCH)],
               "long": prompt(PREFILL_LEN), "mixed": [prompt(n) for n in MIXED_LENS]}  # fmt: skip
    base = {"args": args, "ckpt": ckpt, "tokenizer": tok_path, "shape": shape, "device": device,
            "dtype": dtype, "threads": threads, "runs": int(runs), "compile": bool(compile),
            "prefill_chunk_size": prefill_chunk_size, "disk_dtype": disk_dtype,
            "draw_device": draw, "max_seq_len": int(max_seq_len), "prompts": prompts}  # fmt: skip
    run_one({**base, "task": "write"})
    warm_page_cache(Path(ckpt))
    gemv = run_one({**base, "task": "gemv"})
    libs = ["ours"] + (["hf"] if "hf" in peer_list and HF_VERSION else [])
    if "hf" in peer_list and not HF_VERSION:
        notes.append("transformers is not installed: no HF comparison")
    print(f"--- {shape} {dtype} on {device}: {runs} runs of each figure", flush=True)
    probe = None
    if bandwidth_gbs is None:
        probe = Worker({**base, "task": "bandwidth"})
        probe.ask()
    try:
        results = benchmark(
            base, libs, int(runs), paired=not sequential, probe=probe,
            build_runs=None if build_runs is None else int(build_runs),
        )  # fmt: skip
    finally:
        if probe is not None:
            probe.close()

    # Bytes each library reads per batch-1 decode token: every weight but the embedding
    # table (one row is read), as that library keeps it (an fp32 codellama model keeps a
    # bf16 checkpoint's linear weights in bf16), plus the K and V of the average context
    # (prompt + half the new tokens).
    elem = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    dim, heads = args["dim"], args["n_heads"]
    kv_heads = args.get("n_kv_heads") or heads
    kv_per_pos = 2 * args["n_layers"] * kv_heads * (dim // heads) * elem
    param_bytes = results["ours"]["param_bytes"]
    kv_read = kv_per_pos * (PROMPT_LEN + NEW_TOKENS // 2)
    for res in results.values():
        res["bytes_per_token_b1"] = res["param_bytes"] - args["vocab_size"] * dim * elem + kv_read
    read = results["ours"]["bytes_per_token_b1"]
    for res in results.values():
        # The bandwidth of each library's own batch-1 runs (the median of the probes around
        # them), unless given: then the same for every library.
        res["bandwidth_gbs"] = bandwidth_gbs or statistics.median(res["bandwidth_b1"])
        res["bound_tok_s_b1"] = res["bandwidth_gbs"] * 1e9 / res["bytes_per_token_b1"]
        res["bw_fraction_b1"] = res["decode_b1_tok_s"] / res["bound_tok_s_b1"]
        res["gemv_fraction_b1"] = res["decode_b1_tok_s"] / gemv["gemv_tok_s"]
    if bandwidth_gbs is None:
        size = "4 GiB" if torch.device(device).type == "cuda" else "1 GiB"
        bw_src = f"measured: x.sum() over {size} float32, best of 5, before each batch-1 run"
        bw_text = "; ".join(
            f"{lib} {res['bandwidth_gbs']:.1f} GB/s (probes "
            + ", ".join(f"{b:.1f}" for b in res["bandwidth_b1"])
            + f") -> bound {res['bound_tok_s_b1']:.1f} tok/s"
            for lib, res in results.items()
        )
    else:
        bw_src = "given with --bandwidth_gbs"
        bw_text = f"{bandwidth_gbs:.1f} GB/s -> bound " + ", ".join(
            f"{lib} {res['bound_tok_s_b1']:.1f} tok/s" for lib, res in results.items()
        )
    bound = results["ours"]["bound_tok_s_b1"]
    loads = [x for res in results.values() for x in res["loadavg"]]
    if max(loads) > threads + 0.5:
        notes.append(
            f"the 1-min load average reached {max(loads):.1f} on {threads} threads: other work "
            "competed for the CPU, so the figures are noisy"
        )
    agree = None
    if "hf" in results:
        a, b = results["ours"]["tokens_b1"], results["hf"]["tokens_b1"]
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))

    info = machine_info(device, dtype, threads, results["ours"].get("gpu"))
    from codellama.model import ModelArgs, weight_bytes

    n_params = weight_bytes(ModelArgs(**args), torch.float32) // 4
    print(f"\n## codellama generate benchmark: {shape} ({n_params / 1e6:.0f}M params), {dtype}")
    print(", ".join(f"{k}: {v}" for k, v in info.items()))
    print(f"shape: {json.dumps(args)}; tokenizer: {tok_src}")
    how = "one library at a time" if sequential else "the libraries alternating run by run"
    print(f"runs: median of {runs} after 1 warm-up, {how}; ours compile={bool(compile)}, HF eager")
    per_lib = ", ".join(
        f"{lib} {res['bytes_per_token_b1'] / 1e6:.0f}" for lib, res in results.items()
    )
    print(f"memory bandwidth ({bw_src}), batch-1 MB read per token {per_lib}: {bw_text}")
    print(f"matrix-vector pass over the weights: {gemv['gemv_tok_s']:.1f} tok/s "
          f"({gemv['gemv_kernel']}, the fastest kernel here, one call per weight; measured "
          "before the runs)")  # fmt: skip
    print(f"ours: linear kernel for decoding: {results['ours'].get('linear_kernel')}")
    print(f"ours: params {param_bytes / 2**20:.0f} MiB, KV cache {results['ours']['kv_bytes'] / 2**20:.0f} "
          f"MiB (preallocated {BATCH} x {max_seq_len}); HF's cache grows dynamically")  # fmt: skip
    if agree is not None:
        same = "all agree" if agree == NEW_TOKENS else f"first difference at token {agree}"
        print(f"greedy batch-1 tokens ours vs HF: {min(agree, NEW_TOKENS)}/{NEW_TOKENS} "
              f"({same}){'' if dtype == 'float32' else ' (low precision: may diverge)'}")  # fmt: skip
    for note in notes:
        print(f"note: {note}")
    print()
    print(table(results))
    if out:
        doc = {"machine": info, "shape": shape, "args": args, "runs": runs, "notes": notes,
               "bandwidth_source": bw_src, "bytes_per_token_b1": read,
               "bound_tok_s_b1": bound, **gemv,
               "greedy_agree_tokens": agree, "results": results}  # fmt: skip
        Path(out).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {out}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_options(
    runs: Any, build_runs: Any, n_layers: Any, threads: Any, prefill_chunk_size: Any,
    max_seq_len: Any, bandwidth_gbs: Any, disk_dtype: Any, device: Any, compile: Any,
    sequential: Any,
) -> None:  # fmt: skip
    """Refuse bad options before anything is written or built (SystemExit naming the flag)."""
    for flag, value, low, optional in (
        ("runs", runs, 1, False), ("build_runs", build_runs, 0, True),
        ("n_layers", n_layers, 1, True), ("threads", threads, 1, True),
        ("prefill_chunk_size", prefill_chunk_size, 1, True), ("max_seq_len", max_seq_len, 1, False),
    ):  # fmt: skip
        if (value is not None or not optional) and (not _is_int(value) or value < low):
            raise SystemExit(f"--{flag} must be an integer >= {low}, got {value!r}")
    if bandwidth_gbs is not None and (
        isinstance(bandwidth_gbs, bool)
        or not isinstance(bandwidth_gbs, (int, float))
        or not bandwidth_gbs > 0
    ):
        raise SystemExit(f"--bandwidth_gbs must be a number of GB/s > 0, got {bandwidth_gbs!r}")
    if disk_dtype not in ("bfloat16", "float16", "float32"):
        raise SystemExit(f"--disk_dtype must be bfloat16, float16 or float32, got {disk_dtype!r}")
    for flag, value in (("compile", compile), ("sequential", sequential)):
        if not isinstance(value, bool):
            raise SystemExit(f"--{flag} must be True or False, got {value!r}")
    try:
        kind = torch.device(str(device)).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda (cuda:N), got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no CUDA GPU; use --device cpu")


def _refuse_unknown_flags(argv: list[str]) -> None:
    """Fire reports a flag that main lacks only after main returns (a whole benchmark later,
    a 13 GB checkpoint written): refuse it first."""
    from codellama.cli import unknown_options

    problem = unknown_options(main, argv)
    if problem:
        raise SystemExit(problem)
    values = [a for a in argv if not a.startswith("-")]
    flags = [a for a in argv if a.startswith("--")]
    if values and not flags:
        raise SystemExit(f"bench_generate takes options only (e.g. --shape small), got {values}")


if __name__ == "__main__":
    import fire

    _refuse_unknown_flags(sys.argv[1:])
    main.__doc__ = __doc__  # so that --help shows the usage
    fire.Fire(main)
