"""Decoding's matrix products on CUDA: F.linear (cuBLAS) against codellama's Triton kernels.

For each weight shape of a 7B-shaped layer (q/k/v and w1/w3 fused, as the model runs them)
and 1-16 rows: the time per product, the bandwidth it reads the weight at, and the error
against an fp32 product. Several copies of each weight are cycled so that no run reads
from the 50-60 MB L2 cache. Ends with the time of one token's products (32 layers + output)
against a plain read of the same bytes.

    python benchmarks/bench_gpu_matmul.py [--rows 1,8] [--dim 4096] [--layers 32]
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from bench_generate import measure_bandwidth  # this folder: the same probe

from codellama import gpu_kernels


def time_per_call(fn, xs, ws, reps: int = 20) -> float:
    """Median seconds per product: one CUDA graph holds a product with every copy, and its
    replays are timed, as decoding replays its graph. Timing calls launched from Python
    would time the launches instead: a Triton launch costs more than the product (40-80 us
    against 17-80 us here), so an earlier version of this script reported the launches."""
    fn(xs[0], ws[0])  # warm-up (and autotune, which cannot run inside a capture)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for x, w in zip(xs, ws):
            fn(x, w)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / len(ws))
    return statistics.median(times)


def _first(t: float | list[float]) -> float:
    return t[0] if isinstance(t, (list, tuple)) else t


def main(rows: str = "1,2,4,8,16", dim: int = 4096, hidden: int = 11008, layers: int = 32,
         vocab: int = 32016) -> None:  # fmt: skip
    assert gpu_kernels.enable(), "Triton or CUDA is missing"
    row_list = [int(r) for r in str(rows).replace("(", "").replace(")", "").split(",") if r]
    shapes = {"wqkv": (3 * dim, dim), "wo": (dim, dim), "w13": (2 * hidden, dim),
              "w2": (dim, hidden), "output": (vocab, dim)}  # fmt: skip
    per_layer = ["wqkv", "wo", "w13", "w2"]
    bw = measure_bandwidth(torch.ones(2**30, device="cuda"))  # as bench_generate's probe
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; read bandwidth "
          f"(x.sum over 4 GiB) {bw:.0f} GB/s")  # fmt: skip
    print("| weight | rows | cuBLAS us | Triton us | cuBLAS GB/s | Triton GB/s | Triton/cuBLAS "
          "| rel err cuBLAS | rel err Triton |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    token: dict[int, list[float]] = {m: [0.0, 0.0] for m in row_list}
    tuned: dict[tuple[str, str], dict] = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in shapes.items():
        nbytes = n * k * 2
        copies = max(2, -(-(512 * 2**20) // nbytes))
        ws = [torch.randn(n, k, device="cuda", generator=g).to(torch.bfloat16) * 0.02
              for _ in range(copies)]  # fmt: skip
        for m in row_list:
            xs = [torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
                  for _ in range(copies)]  # fmt: skip
            ref = xs[0].float() @ ws[0].float().T
            errs = []
            for fn in (F.linear, gpu_kernels.small_matmul):
                out = fn(xs[0], ws[0]).float()
                errs.append(((out - ref).norm() / ref.norm()).item())
            label = "one row" if m == 1 else "2-16 rows"
            tuner = gpu_kernels._kernels()[0 if m == 1 else 1]
            if (label, f"{n}x{k}") not in tuned and getattr(tuner, "configs_timings", None):
                tuned[(label, f"{n}x{k}")] = dict(tuner.configs_timings)
            t_cublas = time_per_call(F.linear, xs, ws)
            t_triton = time_per_call(gpu_kernels.small_matmul, xs, ws)
            count = layers if name in per_layer else 1
            token[m][0] += count * t_cublas
            token[m][1] += count * t_triton
            print(f"| {name} {n}x{k} | {m} | {t_cublas * 1e6:.1f} | {t_triton * 1e6:.1f} | "
                  f"{nbytes / t_cublas / 1e9:.0f} | {nbytes / t_triton / 1e9:.0f} | "
                  f"{t_cublas / t_triton:.2f}x | {errs[0]:.1e} | {errs[1]:.1e} |",
                  flush=True)  # fmt: skip
        del ws
    print("\nautotuned configs, each as Triton timed it (us), best first:")
    for (label, shape), timings in tuned.items():
        ranked = sorted(timings.items(), key=lambda kv: _first(kv[1]))
        print(f"  {label} {shape}: " + "; ".join(
            f"{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']} w{c.num_warps} s{c.num_stages} "
            f"{_first(t) * 1e3:.1f}" for c, t in ranked), flush=True)  # fmt: skip
    total = sum(n * k * 2 * (layers if name in per_layer else 1) for name, (n, k) in shapes.items())
    print(
        f"\none token's products ({layers} layers + output, {total / 1e9:.2f} GB), "
        f"against a plain read at {bw:.0f} GB/s ({total / bw / 1e6:.2f} ms):"
    )
    for m, (a, b) in token.items():
        print(f"  rows {m}: cuBLAS {a * 1e3:.2f} ms ({total / a / 1e9 / bw:.0%} of the read), "
              f"Triton {b * 1e3:.2f} ms ({total / b / 1e9 / bw:.0%})")  # fmt: skip


if __name__ == "__main__":
    import fire

    fire.Fire(main)
