"""Run under torchrun by tests: build, generate, and write this rank's tokens as JSON."""

from __future__ import annotations

import json
import sys

import fire
import torch.distributed as dist

from codellama import Llama


def main(
    ckpt_dir: str | list[str],
    out: str,
    prompts: str,
    max_gen_len: int = 8,
    temperature: float = 0.0,
    per_rank_prompts: bool = False,
    compile: bool = False,
    model_parallel_size: int | None = None,
):
    """``ckpt_dir`` may be a JSON list of folders: each is built in turn in the same
    processes (saving a torchrun launch a checkpoint) and written to ``{out}.{i}``."""
    dirs = ckpt_dir if isinstance(ckpt_dir, list) else [ckpt_dir]
    if isinstance(ckpt_dir, str) and ckpt_dir.startswith("["):
        dirs = json.loads(ckpt_dir)
    for i, d in enumerate(dirs):
        llama = Llama.build(
            d, f"{d}/tokenizer.model", 64, 4, device="cpu", dtype="float32",
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
        name = f"{out}.{i}" if len(dirs) > 1 else out
        with open(f"{name}.rank{dist.get_rank()}.json", "w") as f:
            json.dump({"tokens": tokens, "logprobs": logprobs, "graph_breaks": breaks}, f)
    print(f"worker rank {dist.get_rank()} done")  # shown by the processes Llama.build lets print
    sys.stdout.flush()


if __name__ == "__main__":
    fire.Fire(main)
