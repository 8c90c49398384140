"""Run under torchrun by tests: build, generate, and write this rank's tokens as JSON."""

from __future__ import annotations

import json
import sys

import fire
import torch.distributed as dist

from codellama import Llama


def main(
    ckpt_dir: str,
    out: str,
    prompts: str,
    max_gen_len: int = 8,
    temperature: float = 0.0,
    per_rank_prompts: bool = False,
    compile: bool = False,
    model_parallel_size: int | None = None,
):
    llama = Llama.build(
        ckpt_dir, f"{ckpt_dir}/tokenizer.model", 64, 4, device="cpu", dtype="float32",
        compile=compile, model_parallel_size=model_parallel_size,
    )  # fmt: skip
    batch = prompts if isinstance(prompts, list) else json.loads(prompts)
    if per_rank_prompts:  # a caller's bug: every rank reads its own prompts
        batch = [p + [dist.get_rank() + 3] for p in batch]
    tokens, logprobs = llama.generate(
        batch, max_gen_len, temperature=temperature, logprobs=True, stop_token=-1
    )
    from torch._dynamo.utils import counters

    breaks = sum(counters["graph_break"].values())
    with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump({"tokens": tokens, "logprobs": logprobs, "graph_breaks": breaks}, f)
    print(f"worker rank {dist.get_rank()} done")  # shown by the processes Llama.build lets print
    sys.stdout.flush()


if __name__ == "__main__":
    fire.Fire(main)
