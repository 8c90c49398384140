"""Convert between Meta's checkpoint layout and Hugging Face's ``LlamaForCausalLM`` layout.

``python -m codellama.convert to_hf --ckpt_dir CodeLlama-7b --out_dir CodeLlama-7b-hf`` writes
config.json, model.safetensors (index-sharded above ``max_shard_size``) and tokenizer.model;
``python -m codellama.convert from_hf --hf_dir CodeLlama-7b-hf --out_dir CodeLlama-7b
[--model_parallel_size M]`` writes Meta's ``consolidated.NN.pth`` shards and params.json.

Both need the ``safetensors`` package (``pip install codellama[hf]``); neither needs
``transformers``. ``from_hf(to_hf(x))`` is bit-exact: same keys, dtypes and values, and the
same params.json (to_hf keeps the original params.json in config.json under
``"codellama_params"``, and Meta's unused ``rope.freqs`` buffer, if any, in
``codellama_extra.safetensors``, a file transformers ignores). Outputs are written atomically (a temporary folder beside the
output, renamed at the end); a non-empty output folder is refused unless ``overwrite``.

Hugging Face rotates query/key halves (``rotate_half``) where Meta rotates interleaved
pairs, so ``wq``/``wk`` rows are permuted on the way (and back).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    TOLERATED_EXTRA_KEYS,
    atomic_dir,
    check_overwrite,
    check_path_given,
    exit_on_sigterm,
    load_shard,
    read_params,
    refuse_non_empty,
    release_pages,
    shard_paths,
    split_dim,
    write_checkpoint,
)
from .distributed import resolve_dtype
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    UnknownWeightError,
    UnsupportedError,
)
from .model import ModelArgs
from .reshard import (
    TOKENIZER_FILE,
    check_distinct_dirs,
    check_model_parallel_size,
    consolidated_shapes,
)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
PARAMS_KEY = "codellama_params"  # config.json key holding the original params.json
# Meta buffers Hugging Face's model has no place for (rope.freqs), kept for an exact round trip;
# transformers never reads this file.
EXTRA_FILE = "codellama_extra.safetensors"
POSITIONS_KEY = "codellama_positions"  # its metadata: each buffer's index in Meta's key order
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes, as Hugging Face's default "5GB"
DEFAULT_MAX_POSITION_EMBEDDINGS = 16384  # Code Llama's training context
HF_DEFAULT_RMS_NORM_EPS = 1e-6  # transformers' LlamaConfig default, when config.json omits it

_LAYER_NAMES = {  # Meta suffix -> Hugging Face suffix, inside layers.{i}
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_LAYER_NAMES = {v: k for k, v in _LAYER_NAMES.items()}
_HF_TOP_NAMES = {v: k for k, v in _TOP_NAMES.items()}
_META_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # buffers of old transformers
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


# --------------------------------------------------------------------------- helpers


def _safetensors() -> Any:
    """The ``safetensors.torch`` module, or an ImportError saying how to install it."""
    try:
        import safetensors.torch as st
    except ImportError as exc:
        raise ImportError(
            "converting to or from Hugging Face's format needs the safetensors package: "
            "pip install 'codellama[hf]' (or: pip install safetensors)"
        ) from exc
    return st


def meta_to_hf_name(name: str) -> str:
    """Hugging Face ``LlamaForCausalLM`` name of a Meta parameter name."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _META_LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise UnknownWeightError(f"{name!r} is not a Code Llama (Meta) parameter name")


def hf_to_meta_name(name: str) -> str:
    """Meta parameter name of a Hugging Face ``LlamaForCausalLM`` name."""
    if name in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[name]
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _HF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{_HF_LAYER_NAMES[m.group(2)]}"
    raise UnknownWeightError(f"{name!r} is not a Hugging Face Llama parameter name")


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary rows -> Hugging Face's half-split rows, per head."""
    rows, dim = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_rotary`."""
    rows, dim = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(rows, dim)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Consolidated Meta parameter shapes of ``args`` (vocab_size set), in Meta's order."""
    dim, kv, hidden = args.dim, args.kv_heads * args.head_dim, args.ffn_hidden_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wq.weight"] = (args.n_heads * args.head_dim, dim)
        shapes[p + "attention.wk.weight"] = (kv, dim)
        shapes[p + "attention.wv.weight"] = (kv, dim)
        shapes[p + "attention.wo.weight"] = (dim, args.n_heads * args.head_dim)
        shapes[p + "feed_forward.w1.weight"] = (hidden, dim)
        shapes[p + "feed_forward.w2.weight"] = (dim, hidden)
        shapes[p + "feed_forward.w3.weight"] = (hidden, dim)
        shapes[p + "attention_norm.weight"] = (dim,)
        shapes[p + "ffn_norm.weight"] = (dim,)
    shapes["norm.weight"] = (dim,)
    shapes["output.weight"] = (args.vocab_size, dim)
    return shapes


def _check_shapes(
    actual: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    where: str,
    name_of: Callable[[str], str] = str,
) -> None:
    missing = [name_of(k) for k in expected if k not in actual]
    unexpected = [name_of(k) for k in actual if k not in expected and k not in TOLERATED_EXTRA_KEYS]
    mismatched = [
        f"{name_of(k)}: {tuple(actual[k])}, expected {expected[k]}"
        for k in expected
        if k in actual and tuple(actual[k]) != expected[k]
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
                parts.append(f"{label}: " + ", ".join(items[:10]) + more)
        raise CheckpointError(
            f"the weights in {where} do not match its configuration: " + " | ".join(parts)
        )


def parse_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"``."""
    if isinstance(size, bool):
        raise ConfigError(f"max_shard_size must be a size in bytes, got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE_RE.match(str(size))
        if not m:
            raise ConfigError(
                f"max_shard_size={size!r} is not a size; use bytes or e.g. '5GB', '500MB'"
            )
        unit = (m.group(2) or "").lower()
        base = _UNITS.get(unit[:1], 1)
        if "i" in unit:
            base = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit[0]]
        value = int(float(m.group(1)) * base)
    if value < 1:
        raise ConfigError(f"max_shard_size must be positive, got {size!r}")
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _hf_config(
    args: ModelArgs,
    params: Mapping[str, Any],
    dtype: torch.dtype,
    max_position_embeddings: int,
) -> dict[str, Any]:
    """config.json of ``LlamaForCausalLM`` (readable by transformers 4.x and 5.x)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,  # transformers 4.x
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},  # 5.x
        "vocab_size": args.vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": _dtype_name(dtype),  # transformers 4.x
        "dtype": _dtype_name(dtype),  # transformers 5.x
        PARAMS_KEY: dict(params),  # the original params.json, for an exact from_hf
    }


def _plan_files(sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Group (name, bytes) in order into files of at most ``max_shard_size`` bytes each."""
    groups: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes:
        if current and current_size + size > max_shard_size:
            groups.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        groups.append(current)
    return groups


# --------------------------------------------------------------------------- to_hf


def to_hf(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    overwrite: bool = False,
    dtype: torch.dtype | str | None = None,
    max_position_embeddings: int = DEFAULT_MAX_POSITION_EMBEDDINGS,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Convert a Meta checkpoint (any shard count) to a Hugging Face ``LlamaForCausalLM`` folder.

    Args:
        ckpt_dir: folder with ``consolidated.NN.pth`` and ``params.json``.
        out_dir: output folder (absent or empty unless ``overwrite``).
        overwrite: replace a non-empty ``out_dir``.
        dtype: convert the weights ('float32', 'bfloat16', 'float16'); None keeps them.
        max_position_embeddings: the context length written to config.json.
        max_shard_size: above this many bytes the weights are split into
            ``model-0000i-of-0000n.safetensors`` files with ``model.safetensors.index.json``.

    Returns:
        The output folder.
    """
    overwrite = check_overwrite(overwrite)  # before any slow work
    check_path_given(ckpt_dir, "the checkpoint directory (ckpt_dir)")
    check_path_given(out_dir, "the output folder (out_dir)")
    st = _safetensors()
    if (
        isinstance(max_position_embeddings, bool)
        or not isinstance(max_position_embeddings, int)
        or max_position_embeddings < 1
    ):
        raise ConfigError(
            f"max_position_embeddings must be a positive integer, got {max_position_embeddings!r}"
        )
    limit = parse_size(max_shard_size)
    target = None if dtype is None else resolve_dtype(dtype, torch.device("cpu"))
    paths = shard_paths(ckpt_dir)
    params = read_params(ckpt_dir)
    out = Path(out_dir)
    check_distinct_dirs(ckpt_dir, out)
    refuse_non_empty(out, overwrite)

    shards = [load_shard(p) for p in paths]
    shapes = consolidated_shapes(shards, paths)
    if "tok_embeddings.weight" not in shapes:
        raise CheckpointError(f"{str(paths[0])!r} has no tok_embeddings.weight")
    vocab = shapes["tok_embeddings.weight"][0]
    declared = params.get("vocab_size", -1)
    if declared not in (-1, None) and declared != vocab:
        raise CheckpointError(
            f"params.json has vocab_size={declared} but the embedding has {vocab} rows"
        )
    args = ModelArgs.from_params({**params, "vocab_size": vocab})
    expected = expected_shapes(args)
    _check_shapes(shapes, expected, repr(str(ckpt_dir)))
    src_dtype = shards[0]["tok_embeddings.weight"].dtype
    out_dtype = target or src_dtype
    n = len(shards)

    def full(name: str) -> torch.Tensor:
        dim = split_dim(name)
        if dim is None or n == 1:
            t = shards[0][name]
        else:
            t = torch.cat([sd[name] for sd in shards], dim=dim)
        if name.endswith("attention.wq.weight"):
            t = permute_rotary(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute_rotary(t, args.kv_heads)
        return t.to(out_dtype).contiguous()

    item = out_dtype.itemsize
    names = list(expected)  # Meta's order: embeddings, layers, norm, output
    groups = _plan_files([(k, math.prod(expected[k]) * item) for k in names], limit)
    total = sum(math.prod(expected[k]) * item for k in names)
    config = _hf_config(args, params, out_dtype, max_position_embeddings)
    tokenizer = Path(ckpt_dir) / TOKENIZER_FILE
    with atomic_dir(out, overwrite) as tmp:
        weight_map: dict[str, str] = {}
        for i, group in enumerate(groups):
            fname = (
                SAFETENSORS_FILE
                if len(groups) == 1
                else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            )
            tensors = {meta_to_hf_name(k): full(k) for k in group}
            st.save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
            for k in group:  # drop the input's mmap'd pages once copied
                for sd in shards:
                    release_pages(sd[k])
            weight_map.update({meta_to_hf_name(k): fname for k in group})
        if len(groups) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        extras = [k for k in shards[0] if k not in expected]  # tolerated buffers only
        if extras:
            order = list(shards[0])
            positions = json.dumps({k: order.index(k) for k in extras})
            st.save_file(
                {k: shards[0][k].contiguous() for k in extras},
                str(tmp / EXTRA_FILE),
                metadata={"format": "pt", POSITIONS_KEY: positions},
            )
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
    return out


# --------------------------------------------------------------------------- from_hf


class _HFWeights:
    """Lazy access to the weights of a Hugging Face folder (safetensors or .bin)."""

    def __init__(self, hf_dir: Path):
        self.dir = hf_dir
        self._files: dict[str, Any] = {}
        self.where: dict[str, str] = {}  # name -> file name
        if (hf_dir / SAFETENSORS_INDEX).is_file():
            self.kind = "safetensors"
            self.where = dict(self._read_index(hf_dir / SAFETENSORS_INDEX))
        elif (hf_dir / SAFETENSORS_FILE).is_file():
            self.kind = "safetensors"
            keys = self._open(SAFETENSORS_FILE).keys()
            self.where = dict.fromkeys(keys, SAFETENSORS_FILE)
        else:
            self.kind = "bin"
            if (hf_dir / BIN_INDEX).is_file():
                self.where = dict(self._read_index(hf_dir / BIN_INDEX))
            else:
                bins = sorted(p.name for p in hf_dir.glob("pytorch_model*.bin"))
                if not bins:
                    raise CheckpointNotFoundError(
                        f"no weights in {str(hf_dir)!r}: expected model.safetensors, "
                        f"{SAFETENSORS_INDEX} or pytorch_model*.bin"
                    )
                for b in bins:
                    self.where.update({k: b for k in self._open(b)})

    @staticmethod
    def _read_index(path: Path) -> dict[str, str]:
        try:
            index = json.loads(path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{str(path)!r} is not a valid index (needs a weight_map): {exc}"
            ) from exc
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{str(path)!r}: weight_map must be an object")
        return weight_map

    def _open(self, fname: str) -> Any:
        if fname in self._files:
            return self._files[fname]
        path = self.dir / fname
        if not path.is_file():
            raise CheckpointNotFoundError(f"weights file {str(path)!r} does not exist")
        if self.kind == "safetensors":
            st = _safetensors()
            try:
                handle = st.safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read {str(path)!r}: {exc}") from exc
        else:
            handle = _load_bin(path)
        self._files[fname] = handle
        return handle

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        f = self._open(self.where[name])
        if self.kind == "safetensors":
            return tuple(f.get_slice(name).get_shape())
        return tuple(f[name].shape)

    def dtype(self, name: str) -> str:
        """The stored dtype's name: safetensors' (``BF16``, ``I8``) or torch's (``int8``)."""
        f = self._open(self.where[name])
        if self.kind == "safetensors":
            return str(f.get_slice(name).get_dtype())
        return str(f[name].dtype).removeprefix("torch.")

    def get(self, name: str) -> torch.Tensor:
        f = self._open(self.where[name])
        return f.get_tensor(name) if self.kind == "safetensors" else f[name]


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model*.bin`` state dict, loaded safely (tensors only)."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it holds objects other than tensors (a pickle "
            f"that could run code). Only load checkpoints from sources you trust. ({exc})"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"cannot read {str(path)!r}: {exc}") from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{str(path)!r} is not a state dict of tensors")
    return sd


def _read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"{str(path)!r} does not exist; pass a Hugging Face model folder"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{str(path)!r} must hold a JSON object")
    return config


def _rope_theta(config: Mapping[str, Any]) -> float:
    """rope_theta of a config (transformers 4.x or 5.x); non-default RoPE is refused."""
    rope = config.get("rope_parameters")
    scaling = config.get("rope_scaling")
    for key, spec in (("rope_parameters", rope), ("rope_scaling", scaling)):
        if spec is not None and not isinstance(spec, dict):
            raise ConfigError(
                f'config.json\'s {key} must be an object (e.g. {{"rope_type": "default"}}) '
                f"or null, got {spec!r:.60}"
            )
        if isinstance(spec, dict):
            kind = spec.get("rope_type", spec.get("type", "default"))
            if kind not in (None, "default"):
                raise UnsupportedError(
                    f"RoPE scaling {kind!r} is not supported by Code Llama's model; only "
                    "plain rotary embeddings (rope_type 'default') convert"
                )
    if isinstance(rope, dict) and rope.get("rope_theta") is not None:
        theta = rope["rope_theta"]
    else:
        theta = config.get("rope_theta", 10000.0)
    if isinstance(theta, float) and theta.is_integer():
        return int(theta)  # as Meta writes it (1000000)
    return theta


def _ffn_candidates() -> Iterator[tuple[int, float | None]]:
    """(multiple_of, ffn_dim_multiplier) pairs, Meta's own choices first."""
    yield from ((256, None), (4096, 1.3))
    powers = [2**k for k in range(14, -1, -1)]
    steps = list(range(100, 401, 5)) + list(range(25, 100, 5))  # 1.0..4.0, then 0.25..0.95
    steps += [k for k in range(25, 401) if k % 5]
    multipliers: list[float | None] = [None, 1.3]
    multipliers += [k / 100 for k in steps if k != 130]
    for mult in multipliers:
        for mo in powers:
            yield mo, mult


def find_ffn_params(dim: int, intermediate_size: int) -> tuple[int, float | None]:
    """A (multiple_of, ffn_dim_multiplier) for which Meta's formula gives ``intermediate_size``.

    Code Llama 7B (dim 4096 -> 11008) and 13B (5120 -> 13824) give (256, None); 34B
    (8192 -> 22016) gives (256, None), which is equivalent to its params.json's
    ``ffn_dim_multiplier: 1.0``; 70B (8192 -> 28672) gives (4096, 1.3).
    """
    for mo, mult in _ffn_candidates():
        args = ModelArgs(dim=dim, multiple_of=mo, ffn_dim_multiplier=mult)
        if args.ffn_hidden_dim == intermediate_size:
            return mo, mult
    # Always possible: round nothing and scale exactly.
    base = int(2 * (4 * dim) / 3)
    mult = (intermediate_size + 0.5) / base
    args = ModelArgs(dim=dim, multiple_of=1, ffn_dim_multiplier=mult)
    if args.ffn_hidden_dim != intermediate_size:  # pragma: no cover - float corner case
        raise ConfigError(
            f"cannot find multiple_of/ffn_dim_multiplier giving intermediate_size="
            f"{intermediate_size} for hidden_size={dim}"
        )
    return 1, mult


def _meta_params(config: Mapping[str, Any], vocab: int, where: str) -> dict[str, Any]:
    """params.json for a Hugging Face Llama config; the stored original when consistent."""

    def need_int(key: str) -> int:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
        return value

    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        raise UnsupportedError(
            f"{where}: model_type {model_type!r} is not supported; only Llama models convert"
        )
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedError(f"{where}: hidden_act {act!r} is not supported (only silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise UnsupportedError(f"{where}: {key}=true is not supported (no biases)")
    dim = need_int("hidden_size")
    n_heads = need_int("num_attention_heads")
    kv = n_heads if config.get("num_key_value_heads") is None else need_int("num_key_value_heads")
    hidden = need_int("intermediate_size")
    head_dim = None if config.get("head_dim") is None else need_int("head_dim")
    if head_dim is not None and head_dim * n_heads != dim:
        raise UnsupportedError(
            f"{where}: head_dim={head_dim} with {n_heads} heads does not equal hidden_size "
            f"{dim}; Code Llama's model needs head_dim = hidden_size / num_attention_heads"
        )
    mo, mult = find_ffn_params(dim, hidden)
    derived = ModelArgs(
        dim=dim,
        n_layers=need_int("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=kv if kv != n_heads else None,
        vocab_size=vocab,
        multiple_of=mo,
        ffn_dim_multiplier=mult,
        norm_eps=config.get("rms_norm_eps", HF_DEFAULT_RMS_NORM_EPS),
        rope_theta=_rope_theta(config),
    )
    derived.validate()

    stored = config.get(PARAMS_KEY)
    if isinstance(stored, dict):
        try:
            args = ModelArgs.from_params({**stored, "vocab_size": vocab})
            same = (
                stored.get("vocab_size", -1) in (-1, None, vocab)
                and args.dim == derived.dim
                and args.n_layers == derived.n_layers
                and args.n_heads == derived.n_heads
                and args.kv_heads == derived.kv_heads
                and args.ffn_hidden_dim == hidden
                and args.norm_eps == derived.norm_eps
                and args.rope_theta == derived.rope_theta
            )
        except ConfigError:
            same = False
        if same:
            return dict(stored)
        warnings.warn(
            f"{where}: {PARAMS_KEY} disagrees with the rest of config.json; "
            "deriving params.json from the Hugging Face fields instead",
            stacklevel=3,
        )
    return derived.to_params()


def _read_extras(path: Path) -> dict[str, tuple[int, torch.Tensor]]:
    """Meta buffers saved by :func:`to_hf` beside the weights: name -> (position, tensor)."""
    if not path.is_file():
        return {}
    st = _safetensors()
    try:
        with st.safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            metadata = f.metadata() or {}
        positions = json.loads(metadata.get(POSITIONS_KEY, "{}"))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {str(path)!r}: {exc}") from exc
    unknown = sorted(set(tensors) - TOLERATED_EXTRA_KEYS)
    if unknown:
        raise CheckpointError(f"{str(path)!r} holds unexpected tensors {unknown}")
    return {
        k: (int(positions.get(k, 10**9)) if isinstance(positions, dict) else 10**9, t)
        for k, t in tensors.items()
    }


def from_hf(
    hf_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    model_parallel_size: int = 1,
    overwrite: bool = False,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Convert a Hugging Face ``LlamaForCausalLM`` folder to Meta's layout with M shards.

    Reads config.json and model.safetensors, an index-sharded safetensors set, or
    ``pytorch_model*.bin`` (loaded with ``weights_only``: tensors only, never code).

    Args:
        hf_dir: the Hugging Face model folder.
        out_dir: output folder (absent or empty unless ``overwrite``).
        model_parallel_size: number of ``consolidated.NN.pth`` shards to write.
        overwrite: replace a non-empty ``out_dir``.
        dtype: convert the weights ('float32', 'bfloat16', 'float16'); None keeps them.

    Returns:
        The output folder.
    """
    overwrite = check_overwrite(overwrite)  # before any slow work
    src = check_path_given(hf_dir, "the Hugging Face folder (hf_dir)")
    check_path_given(out_dir, "the output folder (out_dir)")
    _safetensors()
    if not src.is_dir():
        raise CheckpointNotFoundError(f"Hugging Face folder {str(src)!r} does not exist")
    target = None if dtype is None else resolve_dtype(dtype, torch.device("cpu"))
    out = Path(out_dir)
    check_distinct_dirs(src, out)
    refuse_non_empty(out, overwrite)
    config = _read_hf_config(src)
    weights = _HFWeights(src)
    where = repr(str(src))

    hf_names = [k for k in weights.names() if not _HF_IGNORED.search(k)]
    meta_of: dict[str, str] = {}  # Meta name -> HF name
    unknown = []
    for k in hf_names:
        try:
            meta_of[hf_to_meta_name(k)] = k
        except KeyError:
            unknown.append(k)
    if unknown:
        raise CheckpointError(
            f"{where} has weights that are not Llama's: {unknown[:10]}"
            + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else "")
        )
    if "output.weight" not in meta_of and config.get("tie_word_embeddings"):
        meta_of["output.weight"] = meta_of.get("tok_embeddings.weight", "")
    if "tok_embeddings.weight" not in meta_of:
        raise CheckpointError(f"{where} has no model.embed_tokens.weight")
    vocab = weights.shape(meta_of["tok_embeddings.weight"])[0]
    declared = config.get("vocab_size")
    if declared is not None and declared != vocab:
        raise CheckpointError(
            f"{where}: config.json has vocab_size={declared} but the embedding has {vocab} rows"
        )
    params = _meta_params(config, vocab, where)
    args = ModelArgs.from_params({**params, "vocab_size": vocab})
    expected = expected_shapes(args)
    _check_shapes(
        {k: weights.shape(v) for k, v in meta_of.items()},
        expected,
        where,
        name_of=lambda k: meta_of.get(k) or meta_to_hf_name(k),
    )
    for k in sorted(meta_of):  # integers (a quantized export) would convert to nonsense
        stored = weights.dtype(meta_of[k])
        if not stored.upper().startswith(("F", "BF")):
            raise CheckpointError(
                f"{meta_of[k]} in {where} has dtype {stored}; Code Llama weights are floating "
                "point (bfloat16, float16 or float32): a quantized model cannot be converted, "
                "convert the full-precision one"
            )
    mp = check_model_parallel_size(model_parallel_size, args.kv_heads, expected)
    extras = _read_extras(src / EXTRA_FILE)
    names = list(expected)
    for name, (pos, _) in sorted(extras.items(), key=lambda kv: kv[1][0]):
        names.insert(min(pos, len(names)), name)

    def full(name: str) -> torch.Tensor:
        if name in extras:
            return extras[name][1]
        t = weights.get(meta_of[name])
        if name.endswith("attention.wq.weight"):
            t = unpermute_rotary(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = unpermute_rotary(t, args.kv_heads)
        return t if target is None else t.to(target)

    def shards() -> Iterator[dict[str, torch.Tensor]]:
        for r in range(mp):
            sd: dict[str, torch.Tensor] = {}
            for name in names:
                t = full(name)
                dim = split_dim(name)
                if dim is not None and mp > 1:
                    t = torch.chunk(t, mp, dim=dim)[r]
                sd[name] = t.clone(memory_format=torch.contiguous_format)
            yield sd
            sd.clear()

    tokenizer = src / TOKENIZER_FILE
    return write_checkpoint(
        out,
        shards(),  # consumed lazily
        params,
        tokenizer if tokenizer.is_file() else None,
        overwrite,
    )


def main() -> None:
    from .cli import run

    exit_on_sigterm()
    run({"to_hf": to_hf, "from_hf": from_hf})


if __name__ == "__main__":
    main()
