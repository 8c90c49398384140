"""Loading Meta-layout checkpoints: strict keys, safe unpickling, any shard count."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from codellama import CheckpointError, Llama
from codellama.checkpoint import (
    check_replicated,
    load_shard,
    merge_shards,
    read_params,
    refuse_non_empty,
    release_pages,
    shard_paths,
    shard_state_dict,
    write_checkpoint,
)
from codellama.errors import ConfigError
from codellama.model import ModelArgs

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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_model_keeps_working_after_its_checkpoint_is_deleted(
    make_checkpoint, build, tmp_path, dtype
):
    # The embedding stays in the checkpoint's file mapping (an embedding over 1 MiB is not
    # copied): deleting the files must not break the model, nor change its answers.
    args = dataclasses.replace(GQA_ARGS, dim=576 if dtype == "float32" else 1152, n_layers=1)
    src = make_checkpoint(args, dtype=getattr(torch, dtype))
    llama = build(shutil.copytree(src, tmp_path / "copy"), dtype=dtype)
    assert llama.model.tok_embeddings.weight.nbytes > 1 << 20
    prompts = [[1, 5, 9, 30], [1, 7]]
    before, _ = llama.generate(prompts, 8, temperature=0, stop_token=-1)
    shutil.rmtree(tmp_path / "copy")
    after, _ = llama.generate(prompts, 8, temperature=0, stop_token=-1)
    assert after == before
    fresh, _ = build(src, dtype=dtype).generate(prompts, 8, temperature=0, stop_token=-1)
    assert after == fresh


def test_editing_a_mapped_embedding_in_place_leaves_the_checkpoint_file_as_it_was(
    make_checkpoint, build
):
    src = make_checkpoint(dataclasses.replace(GQA_ARGS, dim=576, n_layers=1))
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    weight = build(src).model.tok_embeddings.weight
    assert weight.nbytes > 1 << 20  # kept in the file mapping (copy-on-write), not copied
    with torch.no_grad():
        weight.mul_(2)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


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


# --------------------------------------------------------------------------- overwrite flag


@pytest.mark.parametrize("flag", ["false", "0", "no", "", 0, 1, None])
def test_non_bool_overwrite_is_refused_and_the_output_is_kept(tmp_path, flag):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match=f"overwrite must be True or False, got {flag!r}"):
        refuse_non_empty(out, flag)
    with pytest.raises(ConfigError, match="overwrite must be True or False"):
        write_checkpoint(out, [{"norm.weight": torch.ones(2)}], {}, overwrite=flag)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"


def test_non_bool_overwrite_is_refused_even_for_a_missing_output(tmp_path):
    with pytest.raises(ConfigError, match="overwrite must be True or False, got 'false'"):
        refuse_non_empty(tmp_path / "absent", "false")  # type: ignore[arg-type]


def test_numpy_bool_overwrite_is_accepted(tmp_path):
    np = pytest.importorskip("numpy")
    out = tmp_path / "out"
    out.mkdir()
    (out / "params.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not empty"):
        refuse_non_empty(out, np.bool_(False))
    refuse_non_empty(out, np.bool_(True))


# --------------------------------------------------------------------------- output folders

SHARD = [{"norm.weight": torch.ones(2)}]


def test_overwrite_never_deletes_files_that_are_not_a_checkpoints(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "params.json").write_text("{}")
    (out / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"not a checkpoint's \('notes.txt'\)"):
        write_checkpoint(out, SHARD, {"dim": 2}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "params.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_overwrite_replaces_a_checkpoint_folder(tmp_path):
    out = write_checkpoint(tmp_path / "out", SHARD * 2, {"dim": 1})
    write_checkpoint(out, SHARD, {"dim": 2}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json"]
    assert json.loads((out / "params.json").read_text()) == {"dim": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_file_given_as_the_output_folder_is_kept_even_with_overwrite(tmp_path):
    target = tmp_path / "p.jsonl"
    target.write_text("data")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        write_checkpoint(target, SHARD, {}, overwrite=True)
    assert target.read_text() == "data"


def test_the_current_folder_is_refused_as_an_output_to_replace(tmp_path, monkeypatch):
    out = write_checkpoint(tmp_path / "out", SHARD, {"dim": 1})
    monkeypatch.chdir(out)
    with pytest.raises(FileExistsError, match="current folder"):
        write_checkpoint(".", SHARD, {"dim": 2}, overwrite=True)
    assert json.loads((out / "params.json").read_text()) == {"dim": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no backup left beside it


def test_an_output_that_cannot_be_created_names_the_path_given(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match=f"cannot write the output '{blocker}/out'"):
        write_checkpoint(blocker / "out", SHARD, {})


# --------------------------------------------------------------------------- params.json


@pytest.mark.parametrize("key", ["dim", "n_layers", "n_heads"])
def test_params_json_without_a_size_key_names_the_file_and_the_key(make_checkpoint, tmp_path, key):
    d = tmp_path / "c"
    shutil.copytree(make_checkpoint(GQA_ARGS), d)
    params = json.loads((d / "params.json").read_text())
    del params[key]
    (d / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match=rf"params\.json'? is missing {key}\b") as e:
        read_params(d)
    assert str(d / "params.json") in str(e.value)


def test_build_with_params_json_without_dim_is_a_config_error(make_checkpoint, build, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(make_checkpoint(GQA_ARGS), d)
    params = json.loads((d / "params.json").read_text())
    del params["dim"], params["n_layers"]
    (d / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match="params.json' is missing dim, n_layers"):
        build(d)


@pytest.mark.parametrize("key", ["dim", "n_layers", "n_heads"])
def test_model_args_from_params_requires_the_size_keys(key):
    params = {"dim": 64, "n_layers": 2, "n_heads": 4}
    del params[key]
    with pytest.raises(ConfigError, match=f"params.json is missing {key}"):
        ModelArgs.from_params(params)


META_7B = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
           "rope_theta": 1000000, "vocab_size": 32016}  # fmt: skip
META_34B = {"dim": 8192, "n_layers": 48, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 32000,
            "multiple_of": 256, "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5,
            "rope_theta": 1000000}  # fmt: skip
LLAMA2_7B = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
             "vocab_size": -1}  # fmt: skip


@pytest.mark.parametrize("params", [META_7B, META_34B, LLAMA2_7B], ids=["7b", "34b", "llama2"])
def test_meta_params_json_files_still_load(tmp_path, params):
    (tmp_path / "params.json").write_text(json.dumps(params))
    args = ModelArgs.from_params(read_params(tmp_path))
    assert (args.dim, args.n_layers, args.n_heads) == (
        params["dim"],
        params["n_layers"],
        params["n_heads"],
    )
    assert args.vocab_size == params["vocab_size"]  # -1: filled from the tokenizer later


def test_model_args_built_in_python_keep_their_defaults():
    args = ModelArgs(dim=64, n_heads=4)
    assert (args.dim, args.n_layers, args.n_heads, args.vocab_size) == (64, 32, 4, -1)
    args.validate()


# --------------------------------------------------------------------------- shard files


def test_legacy_format_shard_loads_like_the_zip_one(make_checkpoint, build, tmp_path):
    src = make_checkpoint(GQA_ARGS, n_shards=2)
    d = tmp_path / "c"
    shutil.copytree(src, d)
    for shard in shard_paths(d):
        sd = torch.load(shard, weights_only=True)
        torch.save(sd, shard, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(d / "consolidated.00.pth")
    tokens = torch.tensor([[1, 5, 9, 13]])
    assert torch.equal(build(d).model.forward(tokens, 0), build(src).model.forward(tokens, 0))


def test_legacy_format_shard_keeps_its_values_after_loading(make_checkpoint, tmp_path):
    src = make_checkpoint(GQA_ARGS)
    shard = tmp_path / "consolidated.00.pth"
    sd = torch.load(src / "consolidated.00.pth", weights_only=True)
    torch.save(sd, shard, _use_new_zipfile_serialization=False)
    loaded = load_shard(shard)
    for t in loaded.values():
        release_pages(t)  # in ordinary memory: dropping its pages would zero it
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


@pytest.mark.parametrize(
    ("content", "what"),
    [(b"", "is empty"), (b"not a checkpoint at all " * 10, "not a PyTorch checkpoint")],
    ids=["empty", "garbage"],
)
def test_unreadable_shard_error_names_the_file_without_torch_hints(
    make_checkpoint, build, tmp_path, content, what
):
    d = tmp_path / "c"
    shutil.copytree(make_checkpoint(GQA_ARGS), d)
    (d / "consolidated.00.pth").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"consolidated.00.pth.*{what}") as e:
        build(d)
    assert "mmap" not in str(e.value)
    assert "_use_new_zipfile_serialization" not in str(e.value)
    assert "checklist.chk" in str(e.value)


def test_stray_pth_file_beside_the_shards_is_ignored_with_a_warning(
    make_checkpoint, build, tmp_path
):
    src = make_checkpoint(GQA_ARGS)
    d = tmp_path / "c"
    shutil.copytree(src, d)
    (d / "backup.pth").write_bytes(b"anything")
    with pytest.warns(UserWarning, match=r"ignoring \['backup.pth'\].*only consolidated.NN.pth"):
        assert shard_paths(d) == [d / "consolidated.00.pth"]
    tokens = torch.tensor([[1, 5, 9]])
    with pytest.warns(UserWarning, match="backup.pth"):
        llama = build(d)
    assert torch.equal(llama.model.forward(tokens, 0), build(src).model.forward(tokens, 0))


def test_only_the_first_process_warns_of_a_stray_pth_file(make_checkpoint, tmp_path, monkeypatch):
    d = tmp_path / "c"
    shutil.copytree(make_checkpoint(GQA_ARGS), d)
    (d / "backup.pth").write_bytes(b"anything")
    from codellama import distributed

    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)  # before the group
    monkeypatch.setenv("RANK", "1")  # torchrun's second process: the first says it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert shard_paths(d) == [d / "consolidated.00.pth"]


def test_pth_files_with_other_names_alone_are_used_like_meta_does(make_checkpoint, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(make_checkpoint(GQA_ARGS), d)
    (d / "consolidated.00.pth").rename(d / "model.pth")
    assert shard_paths(d) == [d / "model.pth"]


def test_gap_in_shard_numbers_names_the_missing_shard(make_checkpoint, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(make_checkpoint(GQA_ARGS, n_shards=2), d)
    (d / "consolidated.01.pth").rename(d / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match=r"missing \['consolidated.01.pth'\]"):
        shard_paths(d)


def test_empty_ckpt_dir_is_reported_as_not_given(tokenizer_path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # "" would otherwise mean this folder
    with pytest.raises(ConfigError, match="checkpoint directory .* is not given") as e:
        Llama.build("", str(tokenizer_path), 32, 1, device="cpu")
    assert "in '.'" not in str(e.value)
    with pytest.raises(ConfigError, match="checkpoint directory .* is not given"):
        read_params("")


# --------------------------------------------------------------------------- weight values


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.bool, torch.complex64], ids=["int64", "bool", "complex64"]
)
def test_non_floating_weight_is_refused_naming_tensor_and_file(
    make_checkpoint, build, tmp_path, dtype
):
    def edit(sd):
        sd["layers.1.ffn_norm.weight"] = torch.ones_like(sd["layers.1.ffn_norm.weight"]).to(dtype)

    d = _rewrite(make_checkpoint(GQA_ARGS), tmp_path / "c", edit)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(
        CheckpointError, match=rf"layers.1.ffn_norm.weight in .*consolidated.00.pth.* {name}"
    ):
        build(d)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: torch.empty_like(t, device="meta"), "is a meta tensor, which holds no data"),
        (lambda t: t.to_sparse(), "is a sparse_coo tensor; Code Llama weights are dense"),
    ],
    ids=["meta", "sparse"],
)
def test_a_weight_without_dense_data_is_refused_naming_tensor_and_file(
    make_checkpoint, build, tmp_path, make, message
):
    def edit(sd):
        sd["norm.weight"] = make(sd["norm.weight"])

    d = _rewrite(make_checkpoint(GQA_ARGS), tmp_path / "c", edit)
    with pytest.raises(CheckpointError, match=rf"norm.weight in .*consolidated.00.pth.* {message}"):
        build(d)


@pytest.mark.parametrize("key", ["norm.weight", "layers.1.attention_norm.weight"])
def test_replicated_weight_differing_between_shards_is_refused(
    make_checkpoint, build, tmp_path, key
):
    d = tmp_path / "c"
    shutil.copytree(make_checkpoint(GQA_ARGS, n_shards=2), d)
    shard = d / "consolidated.01.pth"
    sd = torch.load(shard, weights_only=True)
    sd[key] = sd[key] + 1
    torch.save(sd, shard)
    with pytest.raises(
        CheckpointError, match=rf"{key} differs between consolidated.00.pth and consolidated.01.pth"
    ):
        build(d)


def test_iter_full_tensors_refuses_replicated_weights_that_differ(make_checkpoint, tmp_path):
    from codellama.checkpoint import iter_full_tensors

    d = tmp_path / "c"
    shutil.copytree(make_checkpoint(GQA_ARGS, n_shards=2), d)
    shard = d / "consolidated.01.pth"
    sd = torch.load(shard, weights_only=True)
    sd["norm.weight"] = -sd["norm.weight"]
    torch.save(sd, shard)
    with pytest.raises(CheckpointError, match="norm.weight differs between"):
        dict(iter_full_tensors(d))


def test_replicated_weights_equal_up_to_nan_bits_load(make_checkpoint, build, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(make_checkpoint(GQA_ARGS, n_shards=2), d)
    for shard in shard_paths(d):  # the same NaN in both shards is not a disagreement
        sd = torch.load(shard, weights_only=True)
        sd["norm.weight"][0] = float("nan")
        torch.save(sd, shard)
    assert torch.isnan(build(d).model.norm.weight[0])


def test_a_stray_shard_is_reported_as_a_shard_count_that_does_not_split_the_weights(
    make_checkpoint, tmp_path
):
    src = make_checkpoint(GQA_ARGS, n_shards=2)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    shutil.copyfile(ckpt / "consolidated.01.pth", ckpt / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match="do not split into 3 equal shards.*stray or missing"):
        Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), 32, 1, device="cpu")


def test_replicated_weights_of_different_dtypes_name_both(tmp_path):
    a, b = torch.ones(4), torch.full((4,), 2.0, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"torch.float32 against torch.bfloat16"):
        check_replicated("norm.weight", a, tmp_path / "consolidated.00.pth", b, tmp_path / "x.pth")


def test_an_output_folder_gets_the_umasks_modes_not_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        out = write_checkpoint(tmp_path / "out", SHARD, {"dim": 1})
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755  # mkdtemp's folder is 0700
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in out.iterdir())


def test_sigterm_during_a_command_line_write_leaves_no_temporary_folder(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import time, torch\n"
        "from codellama.checkpoint import exit_on_sigterm, write_checkpoint\n"
        "exit_on_sigterm()\n"
        "def shards():\n"
        "    yield {'norm.weight': torch.ones(2)}\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        "    yield {'norm.weight': torch.ones(2)}\n"
        f"write_checkpoint({str(tmp_path / 'out')!r}, shards(), {{}})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(0.1)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary folder
