"""Process and device setup (codellama.distributed), without launching processes."""

from __future__ import annotations

import pytest
import torch

from codellama import distributed


@pytest.mark.parametrize(
    ("device", "local_rank", "want"),
    [("cuda:1", "0", [1]), ("cuda:0", "1", [0]), ("cuda", "1", [1]), ("cuda", None, [0]),
     ("cpu", "1", [])],
)  # fmt: skip
def test_the_cuda_device_named_becomes_current_else_torchruns_local_rank(
    monkeypatch, device, local_rank, want
):
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    distributed.select_cuda_device(torch.device(device))
    assert chosen == want


def test_a_difference_between_ranks_in_short_values_shows_each_value():
    got = distributed.describe_difference("prompts", [[[1, 5, 3]], [[1, 5, 4]]])
    assert got == "prompts: rank 0 [[1, 5, 3]], rank 1 [[1, 5, 4]]"


def test_a_difference_between_ranks_deep_in_long_prompts_is_located():
    base = list(range(100, 140))
    other = [*base[:25], 7, *base[26:]]
    got = distributed.describe_difference("prompts", [[[1], base], [[1], other]])
    assert got == "prompts[1][25]: rank 0 125, rank 1 7"


def test_long_prompts_that_differ_only_in_length_say_so():
    base = list(range(100, 140))
    got = distributed.describe_difference("prompts", [[base], [base + [3]]])
    assert got == "prompts[0]: the same first 40 items, lengths rank 0 40, rank 1 41"


def test_a_single_process_build_leaves_the_excepthook_alone(make_checkpoint, tmp_path):
    """The private one-process group a build starts must not make every later traceback of
    the user's program read "[rank0]: ..." (torch's init_process_group installs that)."""
    import subprocess
    import sys

    from .conftest import GQA_ARGS, REPO

    script = (
        "import sys\n"
        "from codellama import Llama\n"
        "before = sys.excepthook\n"
        "Llama.build(sys.argv[1], sys.argv[1] + '/tokenizer.model', 32, 1)\n"
        "print('SAME HOOK' if sys.excepthook is before else 'HOOK REPLACED')\n"
        "raise KeyError('boom')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(make_checkpoint(GQA_ARGS))],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert "SAME HOOK" in proc.stdout, proc.stderr[-2000:]
    assert "KeyError: 'boom'" in proc.stderr and "[rank0]" not in proc.stderr


def test_long_values_that_differ_late_are_shown_where_they_differ():
    from codellama import SamplingParams

    a = SamplingParams(temperature=0.6, top_p=0.9, repetition_penalty=1.1)
    b = SamplingParams(temperature=0.6, top_p=0.9, repetition_penalty=1.2)
    got = distributed.describe_difference("sampling", [a, b])
    assert "repetition_penalty=1.1" in got and "repetition_penalty=1.2" in got
