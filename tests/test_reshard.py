"""Tests for codellama.reshard: N -> M shards, exact, atomic, input untouched."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codellama.checkpoint import (
    load_shard,
    merge_shards,
    read_params,
    shard_paths,
    shard_state_dict,
    write_checkpoint,
)
from codellama.demo import random_state_dict, write_random_checkpoint
from codellama.errors import CheckpointError, ConfigError
from codellama.generation import Llama
from codellama.model import ModelArgs
from codellama.reshard import reshard, valid_model_parallel_sizes
from codellama.tokenizer import Tokenizer

from .conftest import GQA_ARGS

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def args(tokenizer_path: Path) -> ModelArgs:
    # GQA_ARGS has 4 KV heads, so 4-way sharding is valid.
    return dataclasses.replace(GQA_ARGS, vocab_size=Tokenizer(str(tokenizer_path)).n_words)


@pytest.fixture(scope="module")
def checkpoints(
    tmp_path_factory: pytest.TempPathFactory, args: ModelArgs, tokenizer_path: Path
) -> dict[int, Path]:
    """The same random weights written as 1, 2 and 4 shards."""
    root = tmp_path_factory.mktemp("ckpts")
    return {
        n: write_random_checkpoint(
            root / f"mp{n}", args, n_shards=n, seed=3, std=0.3, tokenizer_path=tokenizer_path
        )
        for n in (1, 2, 4)
    }


def tree_hashes(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def assert_same_state_dict(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(("n", "m"), [(1, 2), (2, 1), (2, 4), (4, 2), (1, 4)])
def test_reshard_matches_shard_state_dict(
    checkpoints: dict[int, Path], tmp_path: Path, n: int, m: int
) -> None:
    src = checkpoints[n]
    before = tree_hashes(src)
    out = reshard(src, tmp_path / "out", m)
    assert out == tmp_path / "out"
    assert tree_hashes(src) == before  # the input is never modified

    paths = shard_paths(out)
    assert [p.name for p in paths] == [f"consolidated.{i:02d}.pth" for i in range(m)]
    expected = shard_state_dict(merge_shards(load_shard(p) for p in shard_paths(src)), m)
    for path, want in zip(paths, expected, strict=True):
        assert_same_state_dict(load_shard(path), want)
    assert read_params(out) == read_params(src)
    assert (out / "params.json").read_text() == (src / "params.json").read_text()
    assert (out / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in paths] + ["params.json", "tokenizer.model"]
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_reshard_keeps_dtype_and_copes_without_tokenizer(tmp_path: Path, args: ModelArgs) -> None:
    src = write_random_checkpoint(tmp_path / "bf16", args, n_shards=2, dtype=torch.bfloat16)
    out = reshard(src, tmp_path / "out", 4)
    shards = [load_shard(p) for p in shard_paths(out)]
    assert {t.dtype for sd in shards for t in sd.values()} == {torch.bfloat16}
    assert_same_state_dict(
        merge_shards(shards), merge_shards(load_shard(p) for p in shard_paths(src))
    )
    assert not (out / "tokenizer.model").exists()


def test_reshard_keeps_rope_freqs_buffer(tmp_path: Path, args: ModelArgs) -> None:
    sd = {"rope.freqs": torch.rand(args.head_dim // 2), **random_state_dict(args, seed=4)}
    src = write_checkpoint(tmp_path / "in", shard_state_dict(sd, 2), args.to_params())
    for m in (1, 4):
        out = reshard(src, tmp_path / f"mp{m}", m)
        for path, want in zip(shard_paths(out), shard_state_dict(sd, m), strict=True):
            assert_same_state_dict(load_shard(path), want)


def test_resharded_checkpoint_generates_the_same(
    checkpoints: dict[int, Path], tokenizer_path: Path, tmp_path: Path
) -> None:
    out = reshard(checkpoints[4], tmp_path / "mp1", 1)
    tok = str(tokenizer_path)
    original = Llama.build(str(checkpoints[4]), tok, 64, 2, 1, device="cpu", dtype="float32")
    resharded = Llama.build(str(out), tok, 64, 2, 1, device="cpu", dtype="float32")
    prompts = [[1, 40, 41, 42, 43], [1, 100, 7]]
    ref = original.generate(prompts, max_gen_len=12, temperature=0)[0]
    got = resharded.generate(prompts, max_gen_len=12, temperature=0)[0]
    assert got == ref
    assert len(set(ref[0])) > 1  # the weights are not degenerate
    tokens = torch.tensor([[1, 40, 41, 42, 43, 44]])
    assert torch.equal(original.model.forward(tokens, 0), resharded.model.forward(tokens, 0))


@pytest.mark.parametrize("bad", [3, 0, -2, 1.5, True, "2"])
def test_invalid_model_parallel_size(tmp_path: Path, tokenizer_path: Path, bad: object) -> None:
    gqa = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, multiple_of=16, vocab_size=64)
    src = write_random_checkpoint(tmp_path / "gqa", gqa)
    with pytest.raises(ConfigError, match=r"n_kv_heads=2.*valid values: \[1, 2\]"):
        reshard(src, tmp_path / "out", bad)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["gqa"]  # no temp folder left behind


def test_valid_sizes_follow_every_split_dimension() -> None:
    shapes = {"tok_embeddings.weight": (32016, 8192), "output.weight": (32016, 8192)}
    assert valid_model_parallel_sizes(8, shapes) == [1, 2, 4, 8]
    assert valid_model_parallel_sizes(8, {"output.weight": (6, 4)}) == [1, 2]
    assert valid_model_parallel_sizes(3, {"norm.weight": (4,)}) == [1, 3]


def test_non_empty_out_dir_refused_unless_overwrite(
    checkpoints: dict[int, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        reshard(checkpoints[2], out, 1)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"

    with pytest.raises(FileExistsError, match="not a checkpoint's.*keep.txt"):
        reshard(checkpoints[2], out, 1, overwrite=True)  # never deletes a file of the user's
    assert (out / "keep.txt").read_text() == "precious"

    (out / "keep.txt").unlink()
    reshard(checkpoints[2], out, 2)
    reshard(checkpoints[2], out, 1, overwrite=True)  # a checkpoint folder is replaced
    assert sorted(p.name for p in out.iterdir()) == [
        "consolidated.00.pth",
        "params.json",
        "tokenizer.model",
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    reshard(checkpoints[2], empty, 2)  # an existing empty folder is fine
    assert len(shard_paths(empty)) == 2


def test_out_dir_must_differ_from_input(checkpoints: dict[int, Path]) -> None:
    src = checkpoints[2]
    before = tree_hashes(src)
    for out in (src, src.parent, src / "mp1"):
        with pytest.raises(ConfigError, match="input folder"):
            reshard(src, out, 1, overwrite=True)
    assert tree_hashes(src) == before


def test_cli(checkpoints: dict[int, Path], tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "codellama.reshard", "--ckpt_dir", str(checkpoints[1])]
    cmd += ["--out_dir", str(out), "--model_parallel_size", "2"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Wrote 2 shards" in proc.stdout
    assert len(shard_paths(out)) == 2
    assert json.loads((out / "params.json").read_text()) == read_params(checkpoints[1])


@pytest.mark.parametrize("flag", ["false", "0", "no", 0, None])
def test_non_bool_overwrite_is_refused_and_the_output_is_kept(
    checkpoints: dict[int, Path], tmp_path: Path, flag: object
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match=f"overwrite must be True or False, got {flag!r}"):
        reshard(checkpoints[2], out, 1, overwrite=flag)  # type: ignore[arg-type]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left


@pytest.mark.parametrize("flag", ["--overwrite=false", "--overwrite=no"])
def test_cli_overwrite_false_keeps_the_output(
    checkpoints: dict[int, Path], tmp_path: Path, flag: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    cmd = [sys.executable, "-m", "codellama.reshard", "--ckpt_dir", str(checkpoints[1])]
    cmd += ["--out_dir", str(out), "--model_parallel_size", "2", flag]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "overwrite must be True or False" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_empty_out_dir_is_reported_as_not_given(checkpoints: dict[int, Path]) -> None:
    with pytest.raises(ConfigError, match=r"output folder \(out_dir\) is not given"):
        reshard(checkpoints[2], "", 1, overwrite=True)


@pytest.mark.parametrize("key", ["norm.weight", "layers.1.attention_norm.weight"])
def test_replicated_weight_differing_between_shards_is_refused(
    tmp_path: Path, args: ModelArgs, key: str
) -> None:
    shards = shard_state_dict(random_state_dict(args, seed=4), 2)
    shards[1][key] = shards[1][key] + 1
    src = write_checkpoint(tmp_path / "in", shards, args.to_params())
    with pytest.raises(
        CheckpointError, match=rf"{key} differs between consolidated.00.pth and consolidated.01.pth"
    ):
        reshard(src, tmp_path / "out", 1)
    assert not (tmp_path / "out").exists()


def test_params_json_without_n_heads_is_refused_naming_the_file(
    checkpoints: dict[int, Path], tmp_path: Path
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for p in checkpoints[2].iterdir():
        (src / p.name).symlink_to(p)
    params = read_params(checkpoints[2])
    del params["n_heads"]
    (src / "params.json").unlink()
    (src / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match=r"params\.json' is missing n_heads"):
        reshard(src, tmp_path / "out", 1)


@pytest.mark.parametrize("n_shards", [3, 0, True])
def test_a_random_checkpoint_is_only_written_in_shards_that_split_evenly(
    tmp_path: Path, n_shards: object
) -> None:
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, multiple_of=16, vocab_size=64)
    with pytest.raises(ConfigError, match="not divisible by 3|n_shards must be a positive integer"):
        write_random_checkpoint(tmp_path / "c", args, n_shards=n_shards)
    assert not (tmp_path / "c").exists()


def test_the_cli_prints_a_codellama_error_as_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "codellama.reshard", str(tmp_path / "none"),
                           str(tmp_path / "out"), "2"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith("CheckpointNotFoundError: checkpoint directory")
    assert "Traceback" not in proc.stderr
