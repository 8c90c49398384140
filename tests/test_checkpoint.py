"""Loading Meta-layout checkpoints: strict keys, safe unpickling, any shard count."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from codellama import CheckpointError, Llama
from codellama.checkpoint import load_shard, merge_shards, shard_paths, shard_state_dict

from .conftest import GQA_ARGS


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy checkpoint ``src`` to ``dst`` with ``edit(state_dict)`` applied to shard 00."""
    shutil.copytree(src, dst)
    shard = dst / "consolidated.00.pth"
    sd = torch.load(shard, weights_only=True)
    edit(sd)
    torch.save(sd, shard)
    return dst


def test_unexpected_key_is_reported_with_its_file(make_checkpoint, build, tmp_path):
    d = _rewrite(
        make_checkpoint(GQA_ARGS), tmp_path / "c", lambda sd: sd.update(extra=torch.ones(3))
    )
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra \(in consolidated.00.pth\)"):
        build(d)


def test_missing_key_is_reported(make_checkpoint, build, tmp_path):
    d = _rewrite(
        make_checkpoint(GQA_ARGS), tmp_path / "c", lambda sd: sd.pop("layers.1.ffn_norm.weight")
    )
    with pytest.raises(CheckpointError, match=r"missing keys: layers.1.ffn_norm.weight"):
        build(d)


def test_every_shape_mismatch_is_reported_with_its_file(make_checkpoint, build, tmp_path):
    def edit(sd):
        sd["layers.0.attention.wq.weight"] = sd["layers.0.attention.wq.weight"][:-1]
        sd["norm.weight"] = torch.ones(3)

    d = _rewrite(make_checkpoint(GQA_ARGS), tmp_path / "c", edit)
    with pytest.raises(CheckpointError) as e:
        build(d)
    msg = str(e.value)
    assert "layers.0.attention.wq.weight in consolidated.00.pth" in msg
    assert "norm.weight in consolidated.00.pth: (3,)" in msg


def test_llama1_rope_freqs_key_is_tolerated(make_checkpoint, build, tmp_path):
    src = make_checkpoint(GQA_ARGS)
    d = _rewrite(src, tmp_path / "c", lambda sd: sd.update({"rope.freqs": torch.ones(4)}))
    prompt = [[1, 5, 9]]
    assert (
        build(d).generate(prompt, 4, temperature=0)[0]
        == build(src).generate(prompt, 4, temperature=0)[0]
    )


class _RunsCode:
    """Unpickling this calls os.system: a checkpoint that would execute code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_does_not_run(make_checkpoint, build, tmp_path):
    marker = tmp_path / "pwned"
    d = _rewrite(
        make_checkpoint(GQA_ARGS), tmp_path / "c", lambda sd: sd.update(evil=_RunsCode(str(marker)))
    )
    with pytest.raises(CheckpointError, match="refusing to load .*consolidated.00.pth"):
        build(d)
    assert not marker.exists()


def test_truncated_shard_error_names_the_file(make_checkpoint, build, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(make_checkpoint(GQA_ARGS, n_shards=2), d)
    shard = d / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="consolidated.01.pth.*truncated or corrupt"):
        build(d)


def test_shard_layout_splits_meta_dimensions(make_checkpoint):
    sd = merge_shards(load_shard(p) for p in shard_paths(make_checkpoint(GQA_ARGS)))
    two = shard_state_dict(sd, 2)
    assert two[0]["tok_embeddings.weight"].shape[1] == sd["tok_embeddings.weight"].shape[1] // 2
    assert (
        two[0]["layers.0.attention.wq.weight"].shape[0]
        == sd["layers.0.attention.wq.weight"].shape[0] // 2
    )
    assert (
        two[0]["layers.0.attention.wo.weight"].shape[1]
        == sd["layers.0.attention.wo.weight"].shape[1] // 2
    )
    assert (
        two[0]["layers.0.feed_forward.w2.weight"].shape[1]
        == sd["layers.0.feed_forward.w2.weight"].shape[1] // 2
    )
    assert two[0]["output.weight"].shape[0] == sd["output.weight"].shape[0] // 2
    assert torch.equal(two[1]["norm.weight"], sd["norm.weight"])
    assert all(torch.equal(merge_shards(two)[k], v) for k, v in sd.items())


def test_checkpoint_files_are_not_modified_by_loading(make_checkpoint, build):
    d = make_checkpoint(GQA_ARGS, n_shards=2)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    build(d).generate([[1, 2, 3]], 3, temperature=0)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_llama_build_is_usable_without_torchrun_environment(make_checkpoint, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    d = make_checkpoint(GQA_ARGS)
    llama = Llama.build(str(d), str(d / "tokenizer.model"), 32, 1, device="cpu")
    assert llama.model.dtype == torch.float32  # CPU default


def test_iter_full_tensors_gives_the_same_tensors_from_one_or_two_shards(make_checkpoint):
    from codellama.checkpoint import iter_full_tensors

    one = dict(iter_full_tensors(make_checkpoint(GQA_ARGS, n_shards=1)))
    two = dict(iter_full_tensors(make_checkpoint(GQA_ARGS, n_shards=2)))
    assert one.keys() == two.keys()
    for name, t in one.items():
        assert torch.equal(t, two[name]), name
