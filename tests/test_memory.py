"""Memory bounds, measured as peak RSS in fresh subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from codellama import ModelArgs

from .conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _linux_only():
    if not sys.platform.startswith("linux"):
        pytest.skip("peak RSS is read from /proc/self/status (Linux)")


def _run(code: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# VmHWM (peak RSS of this process image; ru_maxrss would include the forking parent's).
PEAK = """
import json
def peak_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
"""

# A small GQA checkpoint (and its tokenizer) in a temporary folder: d / "ckpt", tok.
SMALL_CHECKPOINT = """
import tempfile, torch
from pathlib import Path
from codellama import Llama, ModelArgs, Tokenizer
from codellama.demo import train_tokenizer, write_random_checkpoint
d = Path(tempfile.mkdtemp())
tok = train_tokenizer(d / "tokenizer.model")
args = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=Tokenizer(tok).n_words)
write_random_checkpoint(d / "ckpt", args, tokenizer_path=tok)
"""


def _build_growth(ckpt, dtype: str) -> dict:
    """Peak RSS before and after building ``ckpt`` in ``dtype`` in a fresh process, and what
    the built model needs: its parameters (as stored) and KV cache, MiB."""
    return _run(
        PEAK
        + f"""
import torch
from codellama import Llama
from codellama.model import parameter_bytes, kv_cache_bytes
torch.ones(1) @ torch.ones(1)  # runtime warm-up
base = peak_mib()
llama = Llama.build({str(ckpt)!r}, {str(ckpt / "tokenizer.model")!r}, 256, 1, device="cpu", dtype={dtype!r})
after = peak_mib()
need = (parameter_bytes(llama.model) + kv_cache_bytes(llama.model.params, llama.model.dtype)) / 2**20
print(json.dumps({{"base": base, "after": after, "need": need}}))
"""
    )


def test_build_peak_rss_stays_within_1_2x_model_and_cache(make_checkpoint):
    """A bf16 checkpoint of ~180 MB built in fp32 (179 MB: the linear weights stay bf16, the
    embedding becomes fp32; 356 MB all fp32): no double allocation, and the checkpoint's
    pages are released as they are copied."""
    args = ModelArgs(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, multiple_of=256)
    out = _build_growth(make_checkpoint(args, dtype=torch.bfloat16, std=0.02), "float32")
    assert out["need"] > 170
    assert out["after"] - out["base"] <= 1.2 * out["need"], out


def test_an_fp32_checkpoint_built_in_bf16_stays_within_1_2x_model_and_cache(make_checkpoint):
    """Converting while loading (fp32 file, bf16 model): the file's pages are dropped a few
    MB at a time as they are converted, not once a whole matrix is (which held each fp32
    source beside its bf16 copy: 1.4-1.5x for checkpoints of a few hundred MB)."""
    args = ModelArgs(dim=2048, n_layers=2, n_heads=16, n_kv_heads=4, multiple_of=256)
    out = _build_growth(make_checkpoint(args, dtype=torch.float32, std=0.02), "bfloat16")
    assert out["need"] > 170, out
    assert out["after"] - out["base"] <= 1.2 * out["need"], out


def test_long_prompt_peak_rss_growth_is_bounded():
    """A 16K-token prompt needs no more memory beyond the KV cache than a 1K-token one."""
    out = _run(
        PEAK
        + SMALL_CHECKPOINT
        + """
llama = Llama.build(str(d / "ckpt"), str(tok), 16500, 1, device="cpu", dtype="float32")
g = torch.Generator().manual_seed(0)
def prompt(n):
    return [[1] + torch.randint(3, 500, (n - 1,), generator=g).tolist()]
llama.generate(prompt(64), 2, temperature=0)
base = peak_mib()
llama.generate(prompt(1024), 2, temperature=0)
short = peak_mib()
llama.generate(prompt(16384), 2, temperature=0)
long = peak_mib()
print(json.dumps({"base": base, "short": short, "long": long}))
"""
    )
    assert out["long"] - out["base"] < 512, out
    assert out["long"] - out["short"] < 128, out


def test_a_cpu_kv_cache_takes_memory_only_as_positions_are_used():
    """The cache for 100K positions (390 MiB here) is an anonymous memory map: building
    touches none of it, and a short generation only a few pages."""
    out = _run(
        PEAK
        + SMALL_CHECKPOINT
        + """
from codellama.model import kv_cache_bytes
base = peak_mib()
llama = Llama.build(str(d / "ckpt"), str(tok), 100_000, 4, device="cpu", dtype="float32")
built = peak_mib()
tokens, _ = llama.generate([[1, 5, 9, 13]] * 4, 8, temperature=0, stop_token=-1)
cache = kv_cache_bytes(llama.model.params, torch.float32) / 2**20
k = llama.model.layers[0].attention.cache.k
print(json.dumps({"base": base, "built": built, "after": peak_mib(), "cache": cache,
                  "n": [len(t) for t in tokens], "unused_zero": k[:, :, 20:].abs().sum().item()}))
"""
    )
    assert out["cache"] > 350
    assert out["built"] - out["base"] < 100, out
    assert out["after"] - out["base"] < 120, out
    assert out["n"] == [8] * 4
    assert out["unused_zero"] == 0.0


def test_a_prefill_chunk_far_into_the_context_needs_no_more_memory_than_one_near_its_start():
    """A 1024-token chunk at position 60K attends 61K keys: with a (chunk, keys) mask SDPA
    would take ~300 MB more than at position 1K (its CPU kernels widen masks to floats)."""
    out = _run(
        PEAK
        + SMALL_CHECKPOINT
        + """
llama = Llama.build(str(d / "ckpt"), str(tok), 62_000, 1, device="cpu", dtype="float32")
model = llama.model
with torch.inference_mode():
    for layer in model.layers:  # the cache as a long prompt leaves it: every page written
        layer.attention.cache.k.normal_()
        layer.attention.cache.v.normal_()
    chunk = torch.randint(3, 500, (1, 1024), generator=torch.Generator().manual_seed(0))
    model.fill_cache(chunk, 0)
    base = peak_mib()
    model.fill_cache(chunk, 1024)
    near = peak_mib()
    model.fill_cache(chunk, 60_000)
    far = peak_mib()
print(json.dumps({"base": base, "near": near, "far": far}))
"""
    )
    assert out["far"] - out["near"] < 32, out
