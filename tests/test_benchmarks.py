"""The benchmark and GPU-check scripts keep working (they run on GPUs only now and then)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO, cache_sharing_kernels

pytestmark = pytest.mark.slow


def _run(args: list[str], tmp_path, timeout: float = 600) -> subprocess.CompletedProcess:
    cache = cache_sharing_kernels(tmp_path / "cache")
    env = {**os.environ, "CODELLAMA_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("CODELLAMA_TOKENIZER", None)  # the bench trains and pads its own tokenizer
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
        cwd=REPO,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    """One run of the bench on a one-layer tiny model (2 timed runs of each figure, 1 build),
    shared by the tests that read its report: the script takes about a minute on 2 cores."""
    pytest.importorskip("transformers", reason="the HF peer needs `transformers`")
    tmp_path = tmp_path_factory.mktemp("bench")
    out = tmp_path / "tiny.json"
    proc = _run(["benchmarks/bench_generate.py", "--shape", "tiny", "--n_layers", "1", "--runs",
                 "2", "--build_runs", "1", "--threads", "1", "--out", str(out)], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_bench_script_reports_every_figure_for_both_libraries(tiny_bench):
    proc, doc = tiny_bench
    for lib in ("ours", "hf"):
        res = doc["results"][lib]
        for key in ("decode_b1_tok_s", "decode_b8_tok_s", "prefill_tok_s", "mixed_batch_s",
                    "build_s", "bw_fraction_b1", "warmup_b1_s"):  # fmt: skip
            assert res[key] > 0, (lib, key)
    assert doc["greedy_agree_tokens"] == 64  # fp32: the same greedy tokens as HF
    assert "| decode tok/s, batch 1 (32-token prompt) |" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n_layer", "2"], "unknown option '--n_layer'"),
        (["--runs", "0"], "--runs must be an integer >= 1, got 0"),
        (["--n_layers", "-1"], "--n_layers must be an integer >= 1, got -1"),
        (["--device", "foo"], "--device must be cpu or cuda"),
        (["--disk_dtype", "foo"], "--disk_dtype must be bfloat16, float16 or float32"),
    ],
    ids=["typo", "runs", "n_layers", "device", "disk_dtype"],
)
def test_bench_script_refuses_bad_options_before_writing_anything(tmp_path, args, message):
    proc = _run(["benchmarks/bench_generate.py", "--shape", "tiny", *args], tmp_path, timeout=60)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert not (tmp_path / "cache" / "bench").exists()  # no checkpoint written, no tokenizer


def test_bench_decode_rate_is_timed_from_each_runs_first_token(tiny_bench):
    _, doc = tiny_bench
    for lib, res in doc["results"].items():
        rates = res["decode_b1_all"]
        assert len(rates) == 2 and res["decode_b1_tok_s"] == pytest.approx(
            sorted(rates)[1] / 2 + sorted(rates)[0] / 2
        )
        b1 = res["times"]["b1"]
        assert all(63 / r < t for r, t in zip(rates, b1, strict=True)), (
            lib
        )  # decoding is part of a run


def test_cuda_check_script_passes_its_cpu_smoke_run(tmp_path):
    pytest.importorskip("transformers", reason="the HF comparison needs `transformers`")
    proc = _run(["benchmarks/cuda_check.py", "cpu"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all CUDA checks passed" in proc.stdout
    assert "FAIL" not in proc.stdout


def test_sampling_bench_reports_every_shape_with_metas_tokens(tmp_path):
    proc = _run(["benchmarks/bench_sampling.py", "--vocab", "3000", "--reps", "2"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| ") and "codellama ms" not in line]
    assert len(rows) == 4, proc.stdout
    assert all(row.endswith("| yes |") for row in rows), proc.stdout


def test_decode_profile_script_prints_step_times_and_a_kernel_table(tmp_path):
    """run_gpu.sh profiles compiled decoding with it; on the CPU it lists torch ops."""
    args = ["benchmarks/profile_decode.py", "--device", "cpu", "--dim", "128", "--n_heads",
            "4", "--n_layers", "1", "--batches", "1,2", "--tokens", "4"]  # fmt: skip
    proc = _run(args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    steps = [line for line in proc.stdout.splitlines() if " us a step (" in line]
    assert [line.split(":")[0] for line in steps] == ["batch 1", "batch 2"], proc.stdout
    assert proc.stdout.count("| kernel | count a step | us a step |") == 2


def test_attention_bench_checks_each_variant_against_the_torch_steps(tmp_path):
    """run_gpu.sh times the attention kernel's variants with it; on the CPU (Triton's
    interpreter) it only checks their outputs, and names no fastest one."""
    pytest.importorskip("triton", reason="Triton is not installed (CPU builds of torch)")
    out = tmp_path / "attention.json"
    args = ["benchmarks/bench_gpu_attention.py", "--device", "cpu", "--shapes", "gqa", "--out",
            str(out)]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = [r for variant in report["results"].values() for rs in variant.values() for r in rs]
    assert len(report["results"]) == 2 and len(runs) == 4  # 2 variants at 2 positions
    assert all(r["err"] < 2e-2 for r in runs), runs
    assert report["best"] == ""  # nothing timed on the CPU
