"""Picking sampled tokens: codellama's top-p against Meta's and Hugging Face's, same logits.

For (batch, vocab) float32 logits of several shapes, from a trained model's peaky next-token
distribution to the flat ones of random weights: the median time of one pick by

- codellama's ``sampling.sample`` (on the CPU without sorting whole rows, see
  ``sampling._sorted_head``),
- Meta's steps (softmax of logits / T, sort, nucleus mask, ``torch.multinomial``), written
  here from their description as the tests' oracle is,
- Hugging Face's (``TemperatureLogitsWarper``, ``TopPLogitsWarper``, softmax,
  ``torch.multinomial``), when transformers is installed,

the widest nucleus, and whether codellama's tokens equal Meta's for the same seed (they
must: it spends the random numbers as ``torch.multinomial`` does).

    python benchmarks/bench_sampling.py [--batch 8] [--vocab 32016] [--temperature 0.2]
        [--top_p 0.95] [--reps 50] [--device cpu]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import fire
import torch

from codellama.sampling import SamplingParams, sample

# Scales of randn logits: from the spread of a trained model sure of its next token (~12) to
# that of the benchmarks' random weights (~0.64); the table gives the nuclei they make.
SCALES = (12.0, 5.0, 2.5, 0.64)


def meta_pick(logits: torch.Tensor, t: float, p: float, g: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits / t, dim=-1)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[probs_sum - probs_sort > p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return torch.gather(probs_idx, -1, torch.multinomial(probs_sort, 1, generator=g)).view(-1)


def hf_picker() -> Callable[..., torch.Tensor] | None:
    try:
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )
    except ImportError:
        return None

    def pick(logits: torch.Tensor, t: float, p: float, g: torch.Generator) -> torch.Tensor:
        scores = TopPLogitsWarper(p)(None, TemperatureLogitsWarper(t)(None, logits))
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=g).view(-1)

    return pick


def timed(reps: int, fn: Callable[..., object], *args: object) -> float:
    def call() -> None:
        fn(*args)
        if torch.cuda.is_available():  # wait for the device's work, not just its launch
            torch.cuda.synchronize()

    call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(batch: int = 8, vocab: int = 32016, temperature: float = 0.2, top_p: float = 0.95,
         reps: int = 50, device: str = "cpu") -> None:  # fmt: skip
    params = SamplingParams(temperature=temperature, top_p=top_p)
    hf = hf_picker()
    print(f"{batch} x {vocab} float32 logits on {device}, temperature {temperature}, top_p "
          f"{top_p}, torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
          f"{reps} picks")  # fmt: skip
    print("| logits | widest nucleus | codellama ms | Meta ms | HF ms "
          "| Meta / codellama | HF / codellama | same tokens as Meta |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for scale in SCALES:
        g = torch.Generator().manual_seed(0)
        logits = (torch.randn(batch, vocab, generator=g) * scale).to(device)
        probs = torch.softmax(logits / temperature, dim=-1)
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values
        widest = int(((sorted_probs.cumsum(-1) - sorted_probs) <= top_p).sum(-1).max())
        same = all(
            torch.equal(
                sample(logits, params, torch.Generator(device).manual_seed(s)),
                meta_pick(logits, temperature, top_p, torch.Generator(device).manual_seed(s)),
            )
            for s in range(5)
        )
        gens = [torch.Generator(device).manual_seed(1) for _ in range(3)]
        ours = timed(reps, sample, logits, params, gens[0])
        meta = timed(reps, meta_pick, logits, temperature, top_p, gens[1])
        theirs = timed(reps, hf, logits, temperature, top_p, gens[2]) if hf else None
        hf_ms = f"{theirs * 1e3:.2f}" if theirs else "-"
        hf_ratio = f"{theirs / ours:.1f}x" if theirs else "-"
        print(f"| randn x {scale} | {widest} | {ours * 1e3:.2f} | {meta * 1e3:.2f} | {hf_ms} "
              f"| {meta / ours:.1f}x | {hf_ratio} | {'yes' if same else 'NO'} |")  # fmt: skip


if __name__ == "__main__":
    fire.Fire(main)
