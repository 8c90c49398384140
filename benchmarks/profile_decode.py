"""Where a compiled decoding step spends its GPU time: kernels by name, per token.

Builds a 7B-shaped model (random bf16 weights drawn on the GPU, no checkpoint; fewer layers
with --n_layers), compiles it as ``Llama.build(..., compile=True)`` does, decodes to warm up,
then profiles greedy decoding at each batch size. Prints, per token: the wall time of a step,
the sum of its kernels' times (the rest is the GPU waiting between kernels), and the kernels
grouped by name with their count and time, so a reader sees which products, norms and
attention kernels cost what.

    python benchmarks/profile_decode.py [--n_layers 8] [--batches 1,8] [--tokens 32]
    python benchmarks/profile_decode.py --device cpu --dim 256 --n_heads 8  # a smoke run
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from bench_generate import BASE, ensure_tokenizer  # this folder

from codellama import Llama, SamplingParams, distributed, gpu_kernels
from codellama.model import ModelArgs, build_empty
from codellama.tokenizer import Tokenizer


def random_model(
    n_layers: int, max_batch_size: int, max_seq_len: int, dtype: torch.dtype, device: str,
    dim: int = 4096, n_heads: int = 32,
):  # fmt: skip
    args = ModelArgs(
        **BASE, dim=dim, n_layers=n_layers, n_heads=n_heads, max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
    )  # fmt: skip
    model = build_empty(args, device, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=g)
    model.fuse_projections()
    gpu_kernels.enable()
    model.setup_cache(dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


def kernel_table(
    prof: torch.profiler.profile, steps: int, kind: torch.autograd.DeviceType
) -> tuple[float, list[tuple]]:
    per: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    total = 0.0
    for e in prof.events():
        if e.device_type == kind:
            us = e.time_range.elapsed_us()
            per[e.name][0] += 1
            per[e.name][1] += us
            total += us
    rows = sorted(((n, c / steps, t / steps) for n, (c, t) in per.items()), key=lambda r: -r[2])
    return total / steps, rows


def main(
    n_layers: int = 8, batches: str = "1,8", tokens: int = 32, prompt_len: int = 32,
    device: str = "cuda", dim: int = 4096, n_heads: int = 32, attention: str = "",
) -> None:  # fmt: skip
    """Profile compiled greedy decoding; ``device="cpu"`` (with small dims) is a smoke run:
    on the CPU the table lists torch ops (CPU time), not kernels. ``attention``: how the
    attention kernel is launched (``chunk=64,dot=0,warps=8,block=0``, see
    ``bench_gpu_attention.py``), else as ``gpu_kernels.ATTENTION_CONFIG`` says."""
    if attention:
        from bench_gpu_attention import parse  # this folder

        gpu_kernels.ATTENTION_CONFIG.update(parse(attention))
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    distributed.setup_model_parallel(1, dev)
    tok_path, _, _ = ensure_tokenizer()
    batch_list = [int(b) for b in str(batches).replace("(", "").replace(")", "").split(",") if b]
    model = random_model(n_layers, max(batch_list), 1088, torch.bfloat16, device, dim, n_heads)
    llama = Llama(model, Tokenizer(tok_path), compile=True)
    greedy = SamplingParams(temperature=0.0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{name}, torch {torch.__version__}, dim {dim}, {n_heads} heads, {n_layers} layers, "
          f"bf16, compile=True, attention {gpu_kernels.ATTENTION_CONFIG}", flush=True)  # fmt: skip
    for bsz in batch_list:
        prompts = [[1] + [100 + i + j for j in range(prompt_len - 1)] for i in range(bsz)]

        def run(n: int, prompts: list[list[int]] = prompts) -> float:
            sync()
            t = time.perf_counter()
            llama.generate_results(prompts, max_gen_len=n, sampling=greedy, stop_tokens=())
            sync()
            return time.perf_counter() - t

        t0 = time.perf_counter()
        run(tokens)  # compiles and records the graphs
        print(f"batch {bsz}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        run(tokens)
        # wall per step from two lengths (the prefill cancels out)
        short, long_ = min(run(4) for _ in range(3)), min(run(4 + tokens) for _ in range(3))
        wall = (long_ - short) / tokens * 1e6
        with torch.profiler.profile(activities=[activity]) as prof:
            run(4 + tokens)
        with torch.profiler.profile(activities=[activity]) as prof4:
            run(4)
        kern_long, rows = kernel_table(prof, 1, kind)
        kern_short, rows4 = kernel_table(prof4, 1, kind)
        per_step = (kern_long - kern_short) / tokens  # the decoding steps' kernels alone
        short_rows = {n: (c, t) for n, c, t in rows4}
        rows = sorted(
            (
                (
                    n,
                    (c - short_rows.get(n, (0, 0))[0]) / tokens,
                    (t - short_rows.get(n, (0, 0))[1]) / tokens,
                )
                for n, c, t in rows
            ),
            key=lambda r: -r[2],
        )
        print(f"\nbatch {bsz}: {wall:.0f} us a step ({1e6 / wall * bsz:.0f} tok/s), kernels "
              f"{per_step:.0f} us a step (GPU idle between kernels ~{wall - per_step:.0f} us)")  # fmt: skip
        print("| kernel | count a step | us a step |\n|---|---|---|")
        for name, count, us in rows[:30]:
            print(f"| {name[:110]} | {count:.1f} | {us:.1f} |")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
