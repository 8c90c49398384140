"""Tests for codellama.convert: Meta <-> Hugging Face LlamaForCausalLM, exact both ways."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

try:
    import safetensors.torch as st
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(
        f"Hugging Face conversion tests need transformers and safetensors "
        f"(pip install 'codellama[test]'): {exc}",
        allow_module_level=True,
    )

from codellama.checkpoint import (
    load_shard,
    merge_shards,
    read_params,
    shard_paths,
    shard_state_dict,
    write_checkpoint,
)
from codellama.convert import (
    find_ffn_params,
    from_hf,
    meta_to_hf_name,
    permute_rotary,
    to_hf,
    unpermute_rotary,
)
from codellama.demo import random_state_dict, write_random_checkpoint
from codellama.errors import CheckpointError, ConfigError, UnsupportedError
from codellama.generation import Llama
from codellama.model import ModelArgs
from codellama.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
HF5 = int(transformers.__version__.split(".")[0]) >= 5
HF_FP32: dict[str, Any] = {("dtype" if HF5 else "torch_dtype"): torch.float32}
TOKENS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 300, 301], [1, 7, 8, 9, 200, 201, 5, 6, 99]])


@pytest.fixture(scope="module")
def args(tokenizer_path: Path) -> ModelArgs:
    return ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        multiple_of=16,
        ffn_dim_multiplier=1.3,
        rope_theta=1e6,
        vocab_size=Tokenizer(str(tokenizer_path)).n_words,
    )


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, args: ModelArgs, tokenizer_path: Path) -> Path:
    return write_random_checkpoint(
        tmp_path_factory.mktemp("meta") / "mp1",
        args,
        seed=5,
        std=0.2,
        tokenizer_path=tokenizer_path,
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, ckpt: Path) -> Path:
    return to_hf(ckpt, tmp_path_factory.mktemp("hf") / "model")


def state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return merge_shards(load_shard(p) for p in shard_paths(ckpt_dir))


def assert_same_state_dict(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("model*.safetensors")):
        out.update(st.load_file(str(f)))
    return out


def tree_hashes(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def hf_logits(model_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = LlamaForCausalLM.from_pretrained(str(model_dir), **HF_FP32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def our_logits(ckpt_dir: Path, tokenizer_path: Path, tokens: torch.Tensor) -> torch.Tensor:
    llama = Llama.build(
        str(ckpt_dir), str(tokenizer_path), 64, tokens.shape[0], device="cpu", dtype="float32"
    )
    return llama.model.forward(tokens, 0)


def test_to_hf_logits_match(hf_dir: Path, ckpt: Path, tokenizer_path: Path) -> None:
    ours = our_logits(ckpt, tokenizer_path, TOKENS)
    theirs = hf_logits(hf_dir, TOKENS)
    assert theirs.shape == ours.shape
    assert ours.abs().max() > 0.5  # the logits are not trivially small
    assert (theirs - ours).abs().max().item() <= 1e-4


def test_to_hf_layout_and_config(hf_dir: Path, ckpt: Path, args: ModelArgs) -> None:
    assert sorted(p.name for p in hf_dir.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.model",
    ]
    assert (hf_dir / "tokenizer.model").read_bytes() == (ckpt / "tokenizer.model").read_bytes()
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["rope_theta"] == 1e6
    assert config["rope_parameters"]["rope_theta"] == 1e6
    assert config["vocab_size"] == args.vocab_size
    assert config["hidden_size"] == 64
    assert config["intermediate_size"] == args.ffn_hidden_dim == 224
    assert config["num_hidden_layers"] == 2
    assert config["num_attention_heads"] == 4
    assert config["num_key_value_heads"] == 2
    assert config["head_dim"] == 16
    assert config["max_position_embeddings"] == 16384
    assert config["rms_norm_eps"] == args.norm_eps
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert config["codellama_params"] == read_params(ckpt)
    parsed = LlamaConfig.from_pretrained(str(hf_dir))
    theta = (getattr(parsed, "rope_parameters", None) or {}).get("rope_theta")
    assert (theta if theta is not None else parsed.rope_theta) == 1e6


def test_to_hf_weights_vocab_32016_without_tokenizer(tmp_path: Path) -> None:
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, multiple_of=16, vocab_size=32016)
    sd = random_state_dict(args, seed=1)
    src = write_checkpoint(tmp_path / "meta", shard_state_dict(sd, 1), args.to_params())
    out = to_hf(src, tmp_path / "hf", max_position_embeddings=16384)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 32016
    assert config["max_position_embeddings"] == 16384
    assert config["intermediate_size"] == args.ffn_hidden_dim
    assert not (out / "tokenizer.model").exists()

    tensors = hf_tensors(out)
    assert set(tensors) == {meta_to_hf_name(k) for k in sd}
    assert torch.equal(tensors["model.embed_tokens.weight"], sd["tok_embeddings.weight"])
    assert torch.equal(tensors["lm_head.weight"], sd["output.weight"])
    assert torch.equal(tensors["model.norm.weight"], sd["norm.weight"])
    p = "model.layers.0."
    for hf, meta in [
        ("self_attn.v_proj", "attention.wv"),
        ("self_attn.o_proj", "attention.wo"),
        ("mlp.gate_proj", "feed_forward.w1"),
        ("mlp.up_proj", "feed_forward.w3"),
        ("mlp.down_proj", "feed_forward.w2"),
        ("input_layernorm", "attention_norm"),
        ("post_attention_layernorm", "ffn_norm"),
    ]:
        assert torch.equal(tensors[f"{p}{hf}.weight"], sd[f"layers.0.{meta}.weight"]), hf
    # Hugging Face's rotate_half layout: within each head, even rows first, then odd rows.
    hd = args.head_dim
    for hf, meta, n in [("q_proj", "wq", 4), ("k_proj", "wk", 2)]:
        w = sd[f"layers.0.attention.{meta}.weight"]
        want = w.view(n, hd // 2, 2, 64).transpose(1, 2).reshape(n * hd, 64)
        assert torch.equal(tensors[f"{p}self_attn.{hf}.weight"], want)
        assert torch.equal(tensors[f"{p}self_attn.{hf}.weight"][: hd // 2], w[0:hd:2])


def test_rotary_permutation_round_trips() -> None:
    w = torch.randn(6 * 8, 5)
    assert torch.equal(unpermute_rotary(permute_rotary(w, 6), 6), w)
    assert not torch.equal(permute_rotary(w, 6), w)


def test_two_shards_convert_like_one(
    tmp_path: Path, args: ModelArgs, ckpt: Path, hf_dir: Path, tokenizer_path: Path
) -> None:
    two = write_random_checkpoint(
        tmp_path / "mp2", args, n_shards=2, seed=5, std=0.2, tokenizer_path=tokenizer_path
    )
    out = to_hf(two, tmp_path / "hf2")
    assert (out / "config.json").read_text() == (hf_dir / "config.json").read_text()
    a, b = hf_tensors(out), hf_tensors(hf_dir)
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(
    tmp_path: Path, args: ModelArgs, tokenizer_path: Path, dtype: torch.dtype
) -> None:
    src = write_random_checkpoint(
        tmp_path / "meta", args, n_shards=2, seed=9, dtype=dtype, tokenizer_path=tokenizer_path
    )
    before = tree_hashes(src)
    hf = to_hf(src, tmp_path / "hf")
    assert json.loads((hf / "config.json").read_text())["dtype"] == str(dtype).split(".")[1]
    assert {t.dtype for t in hf_tensors(hf).values()} == {dtype}
    back = from_hf(hf, tmp_path / "back")
    assert tree_hashes(src) == before
    assert len(shard_paths(back)) == 1
    assert_same_state_dict(load_shard(shard_paths(back)[0]), state_dict(src))
    assert (back / "params.json").read_text() == (src / "params.json").read_text()
    assert (back / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()


def test_round_trip_keeps_rope_freqs_buffer(
    tmp_path: Path, args: ModelArgs, tokenizer_path: Path
) -> None:
    """Llama 2 / Code Llama checkpoints carry an unused ``rope.freqs`` buffer; it survives."""
    sd = random_state_dict(args, seed=2, dtype=torch.bfloat16)
    items = list(sd.items())
    items.insert(3, ("rope.freqs", torch.rand(args.head_dim // 2)))
    sd = dict(items)
    src = write_checkpoint(
        tmp_path / "meta", shard_state_dict(sd, 2), args.to_params(), tokenizer_path
    )
    hf = to_hf(src, tmp_path / "hf")
    assert (hf / "codellama_extra.safetensors").is_file()  # beside the model, not in it
    assert all(
        k.startswith(("model.", "lm_head.")) for k in st.load_file(str(hf / "model.safetensors"))
    )
    LlamaForCausalLM.from_pretrained(str(hf), **HF_FP32)  # loads cleanly
    back = from_hf(hf, tmp_path / "back")
    assert_same_state_dict(load_shard(shard_paths(back)[0]), sd)
    two = from_hf(hf, tmp_path / "back2", model_parallel_size=2)
    for path, want in zip(shard_paths(two), shard_state_dict(sd, 2), strict=True):
        assert_same_state_dict(load_shard(path), want)


def test_dtype_option(tmp_path: Path, ckpt: Path) -> None:
    hf = to_hf(ckpt, tmp_path / "hf", dtype="bfloat16")
    assert {t.dtype for t in hf_tensors(hf).values()} == {torch.bfloat16}
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = from_hf(hf, tmp_path / "back", dtype="float32")
    want = {k: v.to(torch.bfloat16).float() for k, v in state_dict(ckpt).items()}
    assert_same_state_dict(state_dict(back), want)


def test_from_hf_index_sharded(tmp_path: Path, ckpt: Path) -> None:
    hf = to_hf(ckpt, tmp_path / "hf", max_shard_size=60_000)
    files = sorted(p.name for p in hf.glob("*.safetensors"))
    assert len(files) > 2
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in hf_tensors(hf).values()
    )
    assert not (hf / "model.safetensors").exists()
    back = from_hf(hf, tmp_path / "back")
    assert_same_state_dict(state_dict(back), state_dict(ckpt))
    assert read_params(back) == read_params(ckpt)


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_from_hf_refuses_integer_weights_before_writing(
    tmp_path: Path, hf_dir: Path, dtype: str | None
) -> None:
    quantized = tmp_path / "hf"
    shutil.copytree(hf_dir, quantized)
    tensors = st.load_file(quantized / "model.safetensors")
    tensors["model.norm.weight"] = torch.full_like(
        tensors["model.norm.weight"], 3, dtype=torch.int8
    )
    st.save_file(tensors, quantized / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.norm.weight in .* has dtype I8; Code Llama"):
        from_hf(quantized, tmp_path / "meta", dtype=dtype)  # float32 would hide the integers
    assert not (tmp_path / "meta").exists()


def test_from_hf_two_shards(tmp_path: Path, hf_dir: Path, ckpt: Path) -> None:
    out = from_hf(hf_dir, tmp_path / "mp2", model_parallel_size=2)
    paths = shard_paths(out)
    assert [p.name for p in paths] == ["consolidated.00.pth", "consolidated.01.pth"]
    for path, want in zip(paths, shard_state_dict(state_dict(ckpt), 2), strict=True):
        assert_same_state_dict(load_shard(path), want)
    with pytest.raises(ConfigError, match=r"valid values: \[1, 2\]"):
        from_hf(hf_dir, tmp_path / "mp3", model_parallel_size=3)
    assert not (tmp_path / "mp3").exists()


@pytest.fixture(scope="module")
def transformers_saved(
    tmp_path_factory: pytest.TempPathFactory, args: ModelArgs, tokenizer_path: Path
) -> tuple[Path, torch.Tensor]:
    """A folder written by transformers itself, and its logits on TOKENS."""
    rope_kw: dict[str, Any] = (
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
        if HF5
        else {"rope_theta": 1e6}
    )
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=False,
        **rope_kw,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so that a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
        logits = model(TOKENS).logits.float()
    d = tmp_path_factory.mktemp("transformers") / "saved"
    model.save_pretrained(str(d))
    shutil.copyfile(tokenizer_path, d / "tokenizer.model")
    return d, logits


def test_from_hf_of_transformers_folder(
    transformers_saved: tuple[Path, torch.Tensor], tmp_path: Path, tokenizer_path: Path
) -> None:
    src, theirs = transformers_saved
    out = from_hf(src, tmp_path / "meta")
    params = read_params(out)
    assert "codellama_params" not in json.loads((src / "config.json").read_text())
    args = ModelArgs.from_params(params)
    assert args.ffn_hidden_dim == 224
    assert (args.dim, args.n_layers, args.n_heads, args.kv_heads) == (64, 2, 4, 2)
    assert args.rope_theta == 1e6 and args.norm_eps == 1e-5
    assert (out / "tokenizer.model").is_file()
    ours = our_logits(out, tokenizer_path, TOKENS)
    assert (theirs - ours).abs().max().item() <= 1e-4


def test_from_hf_pytorch_bin(transformers_saved: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    src, _ = transformers_saved
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copyfile(src / "config.json", bin_dir / "config.json")
    torch.save(st.load_file(str(src / "model.safetensors")), bin_dir / "pytorch_model.bin")
    a = from_hf(bin_dir, tmp_path / "from_bin")
    b = from_hf(src, tmp_path / "from_safetensors")
    assert_same_state_dict(state_dict(a), state_dict(b))
    assert read_params(a) == read_params(b)


def test_find_ffn_params_code_llama_sizes() -> None:
    assert find_ffn_params(4096, 11008) == (256, None)  # 7B
    assert find_ffn_params(8192, 28672) == (4096, 1.3)  # 70B
    for dim, hidden in [(4096, 11008), (5120, 13824), (8192, 22016), (8192, 28672), (64, 224)]:
        mo, mult = find_ffn_params(dim, hidden)
        assert ModelArgs(dim=dim, multiple_of=mo, ffn_dim_multiplier=mult).ffn_hidden_dim == hidden
    for dim, hidden in [(64, 100), (64, 37), (4096, 14336)]:  # always solvable
        mo, mult = find_ffn_params(dim, hidden)
        assert ModelArgs(dim=dim, multiple_of=mo, ffn_dim_multiplier=mult).ffn_hidden_dim == hidden


def test_stale_codellama_params_are_ignored(tmp_path: Path, hf_dir: Path, ckpt: Path) -> None:
    edited = tmp_path / "edited"
    shutil.copytree(hf_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    config["codellama_params"]["multiple_of"] = 4096  # no longer gives intermediate_size
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="disagrees"):
        out = from_hf(edited, tmp_path / "meta")
    args = ModelArgs.from_params(read_params(out))
    assert args.ffn_hidden_dim == 224
    assert_same_state_dict(state_dict(out), state_dict(ckpt))


def test_non_empty_out_dir_refused(tmp_path: Path, ckpt: Path, hf_dir: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        to_hf(ckpt, out)
    with pytest.raises(FileExistsError, match="not empty"):
        from_hf(hf_dir, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left

    with pytest.raises(FileExistsError, match="keep.txt"):
        to_hf(ckpt, out, overwrite=True)  # overwrite never deletes a file of the user's
    (out / "keep.txt").unlink()
    from_hf(hf_dir, out)
    to_hf(ckpt, out, overwrite=True)  # a checkpoint folder is replaced
    assert not (out / "params.json").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="input folder"):
        from_hf(out, out, overwrite=True)


def test_missing_safetensors_is_a_clear_import_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ckpt: Path
) -> None:
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"codellama\[hf\]"):
        to_hf(ckpt, tmp_path / "hf")
    with pytest.raises(ImportError, match="pip install safetensors"):
        from_hf(tmp_path, tmp_path / "meta")


def test_cli(tmp_path: Path, ckpt: Path) -> None:
    hf, meta = tmp_path / "hf", tmp_path / "meta"
    py = [sys.executable, "-m", "codellama.convert"]
    script = [
        py + ["to_hf", "--ckpt_dir", str(ckpt), "--out_dir", str(hf), "--dtype", "bfloat16"],
        py + ["from_hf", "--hf_dir", str(hf), "--out_dir", str(meta), "--model_parallel_size", "2"],
    ]
    for cmd in script:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert len(shard_paths(meta)) == 2
    assert read_params(meta) == read_params(ckpt)
    assert {t.dtype for t in state_dict(meta).values()} == {torch.bfloat16}


@pytest.mark.parametrize("flag", ["false", "0", "no", 0])
def test_non_bool_overwrite_is_refused_and_the_output_is_kept(
    tmp_path: Path, ckpt: Path, hf_dir: Path, flag: object
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match=f"overwrite must be True or False, got {flag!r}"):
        to_hf(ckpt, out, overwrite=flag)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=f"overwrite must be True or False, got {flag!r}"):
        from_hf(hf_dir, out, overwrite=flag)  # type: ignore[arg-type]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left


def test_cli_overwrite_false_keeps_the_output(tmp_path: Path, ckpt: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    cmd = [sys.executable, "-m", "codellama.convert", "to_hf", "--ckpt_dir", str(ckpt)]
    cmd += ["--out_dir", str(out), "--overwrite=false"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "overwrite must be True or False, got 'false'" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_config_without_rms_norm_eps_gets_hugging_face_default(
    tmp_path: Path, hf_dir: Path
) -> None:
    edited = tmp_path / "edited"
    shutil.copytree(hf_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    del config["rms_norm_eps"], config["codellama_params"]
    (edited / "config.json").write_text(json.dumps(config))
    out = from_hf(edited, tmp_path / "meta")
    assert read_params(out)["norm_eps"] == LlamaConfig().rms_norm_eps == 1e-6


def test_empty_paths_are_reported_as_not_given(tmp_path: Path, ckpt: Path, hf_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"output folder \(out_dir\) is not given"):
        to_hf(ckpt, "")
    with pytest.raises(ConfigError, match=r"checkpoint directory \(ckpt_dir\) is not given"):
        to_hf("", tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"Hugging Face folder \(hf_dir\) is not given"):
        from_hf("", tmp_path / "meta")
    with pytest.raises(ConfigError, match=r"output folder \(out_dir\) is not given"):
        from_hf(hf_dir, "")
    assert list(tmp_path.iterdir()) == []


def test_to_hf_refuses_replicated_weight_differing_between_shards(
    tmp_path: Path, args: ModelArgs
) -> None:
    sd = random_state_dict(args, seed=2)
    shards = shard_state_dict(sd, 2)
    shards[1]["layers.0.ffn_norm.weight"] = shards[1]["layers.0.ffn_norm.weight"] * 2
    src = write_checkpoint(tmp_path / "in", shards, args.to_params())
    with pytest.raises(
        CheckpointError,
        match="layers.0.ffn_norm.weight differs between consolidated.00.pth and consolidated.01",
    ):
        to_hf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "edit, error, match",
    [
        (
            {"num_key_value_heads": 0},
            ConfigError,
            "num_key_value_heads must be a positive integer, got 0",
        ),
        ({"head_dim": "8"}, ConfigError, "head_dim must be a positive integer, got '8'"),
        ({"rope_scaling": "linear"}, ConfigError, "rope_scaling must be an object .* got 'linear'"),
        (
            {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
            UnsupportedError,
            "RoPE scaling 'linear'",
        ),
    ],
    ids=["kv-heads-0", "head-dim-str", "rope-scaling-str", "rope-scaling-linear"],
)
def test_a_config_from_hugging_face_is_checked_field_by_field(tmp_path, hf_dir, edit, error, match):
    edited = tmp_path / "edited"
    shutil.copytree(hf_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    config.pop("codellama_params", None)
    (edited / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(error, match=match):
        from_hf(edited, tmp_path / "meta")
    assert not (tmp_path / "meta").exists()
