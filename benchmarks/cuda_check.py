"""Correctness of the CUDA paths, for a machine with a GPU (the test suite runs on CPU).

Checks, each printed as PASS/FAIL with its figures, going on after a failure:
  1. logits on CUDA equal Hugging Face ``LlamaForCausalLM`` on the same random weights
     (fp32: relative error < 1e-4; bf16: no further from HF's fp32 logits than HF's bf16
     is), with GQA, ffn_dim_multiplier and rope_theta;
  2. greedy tokens of a mixed-length batch on CUDA equal the CPU's (fp32), also with the
     prompts prefilled in chunks of 7 tokens;
  3. ``compile=True`` (torch.compile, CUDA graphs) gives the eager tokens and logprobs, with
     one graph per batch size and no CUDA-graph skips, also across the cache-length buckets
     up to the end of the cache; the Triton products equal F.linear's; one row through the
     fused layers gives eager's bf16 tokens, and the Triton attention SDPA's (bf16 tokens:
     equal, or apart only where the eager logits are nearly tied);
  4. seeded sampling on CUDA repeats itself, and the overlapped decode loop (the next step
     queued before the host reads tokens) gives what the plain loop gives.

    python benchmarks/cuda_check.py          # or: ... cpu (a smoke test of this script)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from codellama import Llama, SamplingParams
from codellama.demo import train_tokenizer, write_random_checkpoint
from codellama.model import ModelArgs
from codellama.tokenizer import Tokenizer

FAILED: list[str] = []
DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def prompts(vocab: int, lens: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lens]


def hf_logits(ckpt: Path, tokens: list[int], dtype: torch.dtype, tmp: Path) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    from codellama.convert import to_hf

    hf_dir = to_hf(ckpt, tmp / f"hf-{dtype}".replace("torch.", ""), dtype=dtype)
    model = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, attn_implementation="sdpa")
    model = model.to(DEVICE).eval()
    with torch.inference_mode():
        return model(torch.tensor([tokens], device=DEVICE)).logits[0].float().cpu()


def near_ties(ref: Llama, ps: list[list[int]], want: list, got: list) -> tuple[bool, str]:
    """Whether two bf16 runs' greedy tokens differ only at near-ties: where a row first
    differs, ``ref``'s logits (a fresh forward pass over the shared prefix) rank the two
    tokens within 0.3 standard deviations of its logits. Two roundings of bf16 pick apart
    there; a wrong kernel picks tokens far apart."""
    rows, worst = [], 0.0
    for prompt, a, b in zip(ps, want, got):
        if a.tokens == b.tokens:
            rows.append(True)
            continue
        i = next(i for i, (x, y) in enumerate(zip(a.tokens + [-1], b.tokens + [-1])) if x != y)
        eos = ref.tokenizer.eos_id
        x_tok = a.tokens[i] if i < len(a.tokens) else eos
        y_tok = b.tokens[i] if i < len(b.tokens) else eos
        ref.model.setup_cache()
        with torch.inference_mode():
            x = torch.tensor([prompt + a.tokens[:i]], device=DEVICE)
            logits = ref.model.forward(x)[0, -1].float()
        gap = abs((logits[x_tok] - logits[y_tok]).item()) / logits.std().item()
        worst = max(worst, gap)
        rows.append(gap <= 0.3)
    detail = f"rows equal or near-ties {rows}, widest gap where they differ {worst:.2f} std"
    return all(rows), detail


def main() -> int:
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    # SDPA is the reference: the Triton attention (on by default for one-row batches) is
    # compared against it in 3d, for every batch size
    os.environ["CODELLAMA_TRITON_ATTENTION"] = "0"
    print(f"torch {torch.__version__}, {gpu}", flush=True)
    tmp = Path(tempfile.mkdtemp())
    tok = train_tokenizer(tmp / "tokenizer.model")
    vocab = Tokenizer(tok).n_words
    args = ModelArgs(
        dim=256, n_layers=3, n_heads=8, n_kv_heads=2, multiple_of=64, ffn_dim_multiplier=1.3,
        rope_theta=1e6, norm_eps=1e-5, vocab_size=vocab,
    )  # fmt: skip
    ckpt = write_random_checkpoint(tmp / "ckpt", args, seed=0, std=0.3, tokenizer_path=tok)
    ps = prompts(vocab, [5, 17, 9, 30])
    greedy = SamplingParams(temperature=0.0)

    def build(**kw: Any) -> Llama:
        kw = {"max_seq_len": 96, "max_batch_size": 4, "device": DEVICE, **kw}
        return Llama.build(str(ckpt), str(tok), **kw)

    # 1. logits against HF: fp32 equal; bf16 no further from HF's fp32 than HF's bf16 is
    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        return ((x - y).norm() / y.norm()).item()

    try:
        x = torch.tensor([ps[3]], device=DEVICE)
        ref = hf_logits(ckpt, ps[3], torch.float32, tmp)
        ours = build(dtype="float32").model.forward(x)[0].float().cpu()
        err = rel(ours, ref)
        check("logits vs HF (fp32)", err < 1e-4, f"relative error {err:.2e}")
        ours16 = build(dtype="bfloat16").model.forward(x)[0].float().cpu()
        hf16 = hf_logits(ckpt, ps[3], torch.bfloat16, tmp)
        e_ours, e_hf = rel(ours16, ref), rel(hf16, ref)
        detail = f"bf16 error against HF fp32: ours {e_ours:.2e}, HF bf16 {e_hf:.2e}"
        check("logits vs HF (bf16)", e_ours <= 1.5 * e_hf + 1e-3, detail)
    except Exception as exc:  # report and go on
        check("logits vs HF", False, repr(exc))

    # 2. CUDA greedy equals CPU greedy (fp32)
    eager = build(dtype="float32")
    fused = eager.model.layers[0].attention.wqkv is not None  # type: ignore[union-attr]
    check("q/k/v and w1/w3 fused off the CPU", fused == (DEVICE != "cpu"), f"fused: {fused}")
    want = eager.generate_results(ps, 12, greedy, logprobs=True)
    cpu = Llama.build(str(ckpt), str(tok), 96, 4, device="cpu", dtype="float32")
    got = cpu.generate_results(ps, 12, greedy, logprobs=True)
    same = [a.tokens == b.tokens for a, b in zip(want, got)]
    lp = max(
        abs(x - y) for a, b in zip(want, got) for x, y in zip(a.logprobs or [], b.logprobs or [])
    )
    check("CUDA greedy == CPU greedy (fp32)", all(same), f"rows {same}, logprob diff {lp:.1e}")
    # prompts prefilled in chunks of 7: past position 0 a chunk attends in blocks of rows
    chunked = build(dtype="float32", prefill_chunk_size=7).generate_results(
        ps, 12, greedy, logprobs=True
    )
    same = [a.tokens == b.tokens for a, b in zip(want, chunked)]
    lp = max(
        abs(x - y)
        for a, b in zip(want, chunked)
        for x, y in zip(a.logprobs or [], b.logprobs or [])
    )
    check(
        "chunked prefill == whole prefill (fp32)",
        all(same) and lp < 1e-4,
        f"rows {same}, logprob diff {lp:.1e}",
    )

    # 3. compile=True (CUDA graphs) equals eager
    from torch._dynamo.utils import counters

    try:
        counters.clear()
        compiled = build(dtype="float32", compile=True)
        t = time.perf_counter()
        got = compiled.generate_results(ps, 12, greedy, logprobs=True)
        first = time.perf_counter() - t
        got1 = compiled.generate_results(ps[:1], 12, greedy, logprobs=True)
        got = compiled.generate_results(ps, 12, greedy, logprobs=True)  # replays
        same = [a.tokens == b.tokens for a, b in zip(want, got)]
        same.append(got1[0].tokens == want[0].tokens)
        lp = max(
            abs(x - y)
            for a, b in zip(want, got)
            for x, y in zip(a.logprobs or [], b.logprobs or [])
        )
        skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
        breaks = sum(counters["graph_break"].values())
        graphs = counters["stats"]["unique_graphs"]
        ok = all(same) and lp < 1e-3 and skips == 0 and breaks == 0 and graphs == 2
        detail = (
            f"rows {same}, logprob diff {lp:.1e}, graphs {graphs}, graph breaks {breaks}, "
            f"cudagraph skips {skips}; first call (compiling) {first:.1f} s"
        )
        check("compile=True == eager on CUDA", ok, detail)
    except Exception as exc:
        check("compile=True == eager on CUDA", False, repr(exc))

    # 3b. the Triton matrix products (bf16, up to 16 rows) against F.linear's
    try:
        from codellama import gpu_kernels

        b16 = build(dtype="bfloat16")
        x = torch.tensor([[t] for t in ps[3][:4]], device=DEVICE)  # 4 rows of one token
        runs = []
        for on in (True, False):
            gpu_kernels._enabled = on and DEVICE == "cuda"
            b16.model.setup_cache()
            runs.append(b16.model.forward(x)[:, -1].float().cpu())
        gpu_kernels._enabled = DEVICE == "cuda"
        err = rel(runs[0], runs[1])
        check("Triton products == F.linear (bf16)", err < 1e-2, f"relative error {err:.2e}")
        compiled16 = build(dtype="bfloat16", compile=True)
        a16 = b16.generate_results(ps, 12, greedy, logprobs=True)
        c16 = compiled16.generate_results(ps, 12, greedy, logprobs=True)
        check("compile=True == eager (bf16, Triton products)", *near_ties(b16, ps, a16, c16))
    except Exception as exc:
        check("Triton products", False, repr(exc))

    # 3c. compiled steps attend over cache buckets: crossing them neither recompiles nor
    # changes tokens, up to the end of the cache
    try:
        kw = {"max_seq_len": 700, "max_batch_size": 2, "dtype": "float32"}
        eager_long, compiled_long = build(**kw), build(**kw, compile=True)
        counters.clear()
        same = []
        for lens, n in (([250, 10], 20), ([500, 3], 40), ([690, 30], 10)):
            long_ps = prompts(vocab, lens)
            want_long = eager_long.generate_results(long_ps, n, greedy)
            got_long = compiled_long.generate_results(long_ps, n, greedy)
            same += [a.tokens == b.tokens for a, b in zip(want_long, got_long)]
        graphs = counters["stats"]["unique_graphs"]
        ok = all(same) and graphs == 1 and not counters["graph_break"]
        check("compile=True across cache buckets == eager", ok, f"rows {same}, graphs {graphs}")
    except Exception as exc:
        check("compile=True across cache buckets", False, repr(exc))

    # 3d. one row decodes through the fused layers (norms, SwiGLU, residuals inside the
    # products: rounded differently, so compared on tokens); the Triton attention
    # (rotary, cache store, attention in one kernel) against the default, rows at
    # different positions
    try:
        from codellama import gpu_kernels

        one = ps[1:2]
        a1 = b16.generate_results(one, 12, greedy, logprobs=True)
        c1 = compiled16.generate_results(one, 12, greedy, logprobs=True)
        check("compile=True == eager (bf16, one row, fused layers)", *near_ties(b16, one, a1, c1))
        torch._dynamo.reset()
        os.environ["CODELLAMA_TRITON_ATTENTION"] = "1"  # every batch size (Llama.build reads it)
        launches: list[int] = []
        launch = gpu_kernels.launch_attention
        gpu_kernels.launch_attention = lambda *a, **k: launches.append(1) or launch(*a, **k)
        try:
            with_kernel = build(dtype="bfloat16", compile=True)
            k16 = with_kernel.generate_results(ps, 12, greedy, logprobs=True)
            k1 = with_kernel.generate_results(one, 12, greedy, logprobs=True)
        finally:
            os.environ["CODELLAMA_TRITON_ATTENTION"] = "0"
            gpu_kernels.launch_attention = launch
            gpu_kernels._attention_rows = 0
        ties, detail = near_ties(b16, ps + one, c16 + c1, k16 + k1)
        failed = gpu_kernels._failed
        ran = bool(launches) or DEVICE == "cpu"  # the CPU (a smoke run) never launches it
        detail += f", kernel launches {len(launches)}, kernel failure: {failed!r:.200}"
        check("Triton attention == SDPA (bf16, compiled)", ties and failed is None and ran, detail)
    except Exception as exc:
        check("fused layers / Triton attention", False, repr(exc))

    # 4. seeded sampling and the overlapped loop
    sampling = SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.2)
    a = eager.generate_results(ps, 16, sampling, seed=7, logprobs=True)
    b = eager.generate_results(ps, 16, sampling, seed=7, logprobs=True)
    check("seeded sampling repeats on CUDA", a == b, f"{sum(len(r.tokens) for r in a)} tokens")
    eager._overlap = False
    c = eager.generate_results(ps, 16, sampling, seed=7, logprobs=True)
    same = [x.tokens == y.tokens for x, y in zip(a, c)]
    check("overlapped loop == plain loop on CUDA", all(same), f"rows {same}")
    print(f"\n{len(FAILED)} failed: {FAILED}" if FAILED else "\nall CUDA checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
