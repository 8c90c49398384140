"""Model parallelism on CPU (gloo): torchrun with 2 and 4 processes, any shard count."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import REPO
from .test_generation import _prompts

pytestmark = pytest.mark.slow

# n_kv_heads 4: MP 1, 2 and 4 all divide it.
from codellama import ModelArgs  # noqa: E402

MP_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, multiple_of=16,
                    ffn_dim_multiplier=1.3, rope_theta=1e6)  # fmt: skip


def torchrun(
    nproc: int, script: Path, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--standalone", str(script), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def run_mp(
    ckpt: Path, nproc: int, prompts, tmp_path: Path, temperature: float = 0.0, *extra: str
) -> list[dict]:
    out = tmp_path / f"out-{nproc}-{ckpt.name}"
    proc = torchrun(nproc, REPO / "tests" / "mp_worker.py", "--ckpt_dir", str(ckpt), "--out", str(out),
                    "--prompts", json.dumps(prompts), "--temperature", str(temperature), *extra,
                    timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def mp1_tokens(make_checkpoint, tokenizer_path):
    from codellama import Llama

    ckpt = make_checkpoint(MP_ARGS, n_shards=1)
    llama = Llama.build(str(ckpt), str(tokenizer_path), 64, 4, device="cpu", dtype="float32")
    prompts = _prompts(llama.model.params.vocab_size, [3, 11, 6])
    tokens, logprobs = llama.generate(prompts, 8, temperature=0, logprobs=True, stop_token=-1)
    return prompts, tokens, logprobs


@pytest.fixture(scope="module")
def mp_outputs(make_checkpoint, mp1_tokens, tmp_path_factory) -> dict[tuple[int, str], list[dict]]:
    """One torchrun per process count, building every checkpoint the tests below compare in
    turn in the same processes (a launch costs ~10 s of imports on 2 cores): (processes,
    checkpoint) -> each rank's tokens and logprobs for mp1_tokens' prompts."""
    ckpts = {f"{n}sh": make_checkpoint(MP_ARGS, n_shards=n) for n in (1, 2, 4)}
    ckpts["2sh-bf16"] = make_checkpoint(MP_ARGS, n_shards=2, dtype=torch.bfloat16)
    runs = {2: list(ckpts), 4: ["1sh", "2sh", "4sh"]}
    tmp = tmp_path_factory.mktemp("mp")
    out: dict[tuple[int, str], list[dict]] = {}
    for nproc, names in runs.items():
        base = tmp / f"out-{nproc}"
        proc = torchrun(nproc, REPO / "tests" / "mp_worker.py", "--ckpt_dir",
                        json.dumps([str(ckpts[n]) for n in names]), "--out", str(base),
                        "--prompts", json.dumps(mp1_tokens[0]), timeout=400)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        for i, name in enumerate(names):
            out[nproc, name] = [
                json.loads(Path(f"{base}.{i}.rank{r}.json").read_text()) for r in range(nproc)
            ]
    return out


@pytest.mark.parametrize("n_shards,nproc", [(2, 2), (4, 4), (1, 2), (4, 2), (2, 4), (1, 4)],
                         ids=["2sh-mp2", "4sh-mp4", "1sh-mp2", "4sh-mp2", "2sh-mp4", "1sh-mp4"])  # fmt: skip
def test_torchrun_greedy_tokens_equal_mp1(mp_outputs, mp1_tokens, n_shards, nproc):
    _, want, want_lp = mp1_tokens
    for out in mp_outputs[nproc, f"{n_shards}sh"]:  # every rank returns the same as MP=1
        assert out["tokens"] == want
        for a, b in zip(out["logprobs"], want_lp, strict=True):
            assert a == pytest.approx(b, abs=1e-4)


def test_torchrun_on_a_bf16_checkpoint_in_fp32_equals_mp1(make_checkpoint, mp_outputs, build):
    """Each rank keeps its pieces of a bf16 checkpoint's linear weights in bf16 (fp32
    products), as one process does."""
    ckpt = make_checkpoint(MP_ARGS, n_shards=2, dtype=torch.bfloat16)
    llama = build(ckpt, max_seq_len=64)
    assert all(m.native_plan.w16 for m in llama.model.linear_layers())
    prompts = _prompts(llama.model.params.vocab_size, [3, 11, 6])
    want, want_lp = llama.generate(prompts, 8, temperature=0, logprobs=True, stop_token=-1)
    for out in mp_outputs[2, "2sh-bf16"]:
        assert out["tokens"] == want
        for a, b in zip(out["logprobs"], want_lp, strict=True):
            assert a == pytest.approx(b, abs=1e-4)


def test_compiled_model_parallel_decode_equals_mp1_without_graph_breaks(
    make_checkpoint, mp1_tokens, tmp_path
):
    """The all-reduces and gathers are functional collectives under torch.compile, so a
    model-parallel step is one graph (one CUDA graph on GPUs), not one per linear."""
    prompts, want, want_lp = mp1_tokens
    outs = run_mp(make_checkpoint(MP_ARGS, n_shards=2), 2, prompts, tmp_path, 0.0, "--compile")
    for out in outs:
        assert out["tokens"] == want
        for a, b in zip(out["logprobs"], want_lp, strict=True):
            assert a == pytest.approx(b, abs=1e-4)
        assert out["graph_breaks"] == 0


@pytest.mark.parametrize("n_shards", [2, 4])
def test_multi_shard_checkpoint_loads_at_mp1(make_checkpoint, mp1_tokens, build, n_shards):
    prompts, want, _ = mp1_tokens
    llama = build(make_checkpoint(MP_ARGS, n_shards=n_shards), max_seq_len=64)
    assert llama.generate(prompts, 8, temperature=0, stop_token=-1)[0] == want


def test_every_rank_samples_the_same_tokens(make_checkpoint, mp1_tokens, tmp_path):
    prompts, _, _ = mp1_tokens
    outs = run_mp(make_checkpoint(MP_ARGS, n_shards=2), 2, prompts, tmp_path, temperature=1.0)
    assert outs[0]["tokens"] == outs[1]["tokens"]


def test_corrupt_shard_on_one_rank_fails_every_process_quickly(make_checkpoint, tmp_path):
    import shutil

    src = make_checkpoint(MP_ARGS, n_shards=2)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    shard = bad / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    start = time.monotonic()
    proc = torchrun(2, REPO / "tests" / "mp_worker.py", "--ckpt_dir", str(bad),
                    "--out", str(tmp_path / "x"), "--prompts", "[[1, 5]]", timeout=90)  # fmt: skip
    assert time.monotonic() - start < 60
    assert proc.returncode != 0
    assert "consolidated.01.pth" in proc.stderr


def test_prompts_that_differ_between_ranks_fail_every_process(make_checkpoint, tmp_path):
    start = time.monotonic()
    proc = torchrun(2, REPO / "tests" / "mp_worker.py", "--ckpt_dir", str(make_checkpoint(MP_ARGS, n_shards=2)),
                    "--out", str(tmp_path / "x"), "--prompts", "[[1, 5]]", "--per_rank_prompts", "True",
                    timeout=90)  # fmt: skip
    assert time.monotonic() - start < 60
    assert proc.returncode != 0
    assert (
        "differ between model-parallel ranks (prompts: rank 0 [[1, 5, 3]], rank 1 [[1, 5, 4]])"
        in proc.stderr
    )


def test_model_parallel_size_below_the_process_count_runs_a_copy_a_process(
    make_checkpoint, build, tmp_path
):
    """Meta's data parallelism: 2 processes at model_parallel_size 1 each hold the whole
    model (from a 2-shard checkpoint) and may run prompts of their own."""
    ckpt = make_checkpoint(MP_ARGS, n_shards=2)
    prompts = [[1, 5, 9], [1, 7]]
    outs = run_mp(ckpt, 2, prompts, tmp_path, 0.0, "--model_parallel_size", "1",
                  "--per_rank_prompts", "True")  # fmt: skip
    llama = build(ckpt, max_seq_len=64, max_batch_size=4)
    for rank, out in enumerate(outs):
        own = [p + [rank + 3] for p in prompts]  # mp_worker's per-rank prompts
        want, _ = llama.generate(own, 8, temperature=0, stop_token=-1)
        assert out["tokens"] == want, rank


@pytest.mark.parametrize(("mp", "printing"), [(1, {0, 1}), (2, {0})], ids=["copies", "one-model"])
def test_the_first_process_of_each_copy_of_the_model_prints(
    make_checkpoint, tmp_path, mp, printing
):
    """As Meta's code, the other processes of a model are silenced; but each copy prints its
    own results (Meta's silenced every process but each node's first)."""
    proc = torchrun(2, REPO / "tests" / "mp_worker.py", "--ckpt_dir", str(make_checkpoint(MP_ARGS)),
                    "--out", str(tmp_path / "x"), "--prompts", "[[1, 5]]",
                    "--model_parallel_size", str(mp), timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {int(r) for r in re.findall(r"worker rank (\d) done", proc.stdout)} == printing


def test_a_model_parallel_size_that_does_not_divide_the_processes_is_refused(
    make_checkpoint, tmp_path
):
    proc = torchrun(2, REPO / "tests" / "mp_worker.py", "--ckpt_dir", str(make_checkpoint(MP_ARGS)),
                    "--out", str(tmp_path / "x"), "--prompts", "[[1, 5]]",
                    "--model_parallel_size", "4", timeout=90)  # fmt: skip
    assert proc.returncode != 0
    assert "model_parallel_size=4 but 2 process(es) are running" in proc.stderr
