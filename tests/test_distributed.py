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
