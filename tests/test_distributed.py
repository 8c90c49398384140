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
