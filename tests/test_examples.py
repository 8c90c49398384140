"""Meta's example scripts under torchrun, and the README's demo command, end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from codellama.demo import ensure_demo_checkpoint

from .conftest import GQA_ARGS, REPO, cache_sharing_kernels

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(script: str, ckpt, *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / script), "--ckpt_dir", str(ckpt), "--tokenizer_path", str(ckpt / "tokenizer.model"),
           "--max_gen_len", "6", "--max_seq_len", "512", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=ENV, cwd=REPO)


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,marker",
    [
        ("example_completion.py", "def fizzbuzz(n: int):"),
        ("example_infilling.py", "================= Filled text ================="),
        ("example_instructions.py", "> Assistant:"),
    ],
)
def test_example_runs_under_torchrun(make_checkpoint, script, marker):
    proc = _torchrun(script, make_checkpoint(GQA_ARGS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker in proc.stdout


@pytest.mark.slow
def test_example_runs_with_two_processes(make_checkpoint):
    proc = _torchrun("example_completion.py", make_checkpoint(GQA_ARGS, n_shards=2), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("def fizzbuzz(n: int):") == 1  # only rank 0 prints


def test_demo_command_runs_completion_infilling_and_chat(tmp_path):
    env = {**ENV, "CODELLAMA_CACHE": str(cache_sharing_kernels(tmp_path))}
    cmd = [sys.executable, "-m", "codellama.demo", "--max_gen_len", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANDOM weights" in proc.stdout
    for section in ("[completion]", "[infilling]", "[chat]"):
        assert section in proc.stdout
    assert (tmp_path / "demo" / "consolidated.00.pth").is_file()


def test_the_demo_never_writes_into_a_folder_of_the_users(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty") as info:
        ensure_demo_checkpoint(mine)
    assert "overwrite" not in str(info.value)  # the demo has no such option
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    a_file = tmp_path / "p.jsonl"
    a_file.write_text("data")
    with pytest.raises(FileExistsError, match="is a file"):
        ensure_demo_checkpoint(a_file)
    assert a_file.read_text() == "data"


def test_command_line_tools_print_text_an_ascii_terminal_cannot_show_escaped(tmp_path):
    """Model output holds any character; an ASCII-only stdout must not crash the demo (or
    reshard, convert, humaneval) with UnicodeEncodeError."""
    code = "from codellama.cli import run\nrun(lambda: print('> ' + chr(0xFFFD) + ' done'))\n"
    env = {**ENV, "PYTHONIOENCODING": "ascii", "PYTHONUTF8": "0", "LC_ALL": "C"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "> \\ufffd done" in proc.stdout
