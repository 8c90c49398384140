"""Checkpoint I/O in Meta's layout: ``consolidated.NN.pth`` shards, ``params.json``.

Loading is safe (``weights_only``: a checkpoint is data, never code) and lean (``mmap``:
each rank copies only the slices it needs, and pages are released as soon as they are
copied). Any shard count N loads at any model-parallel size M whose slices line up.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import mmap
import os
import pickle
import re
import shutil
import stat
import sys
import tempfile
import warnings
import weakref
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    OutputExistsError,
    OutputNotWritableError,
    UnknownWeightError,
    is_bool,
)

PARAMS_FILE = "params.json"
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads")  # in every params.json Meta ships
SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")  # Meta's shard file names
TOLERATED_EXTRA_KEYS = frozenset({"rope.freqs"})  # Llama 1 checkpoints carry this buffer
_PROGRESS_MIN_BYTES = 300 * 2**20

# Parameter-name suffix -> the dimension Meta's model-parallel shards split (None: replicated).
_SPLIT_DIMS = {
    "tok_embeddings.weight": 1,  # ParallelEmbedding splits the embedding dimension
    "output.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
}


def split_dim(name: str) -> int | None:
    """Dimension along which ``name`` is sharded in Meta's layout; None if replicated.

    Unknown names raise :class:`UnknownWeightError` (a ``KeyError``); the tolerated Llama 1
    ``rope.freqs`` is replicated.
    """
    if name in TOLERATED_EXTRA_KEYS:
        return None
    for suffix, dim in _SPLIT_DIMS.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    raise UnknownWeightError(f"{name!r} is not a Code Llama parameter name")


def check_path_given(path: object, what: str) -> Path:
    """``path`` as a :class:`Path`; an empty string (which would mean the current folder)
    or None is a :class:`ConfigError` naming ``what``."""
    if path is None or (isinstance(path, (str, os.PathLike)) and not os.fspath(path)):
        raise ConfigError(
            f"{what} is not given (got {path!r}); pass the path of the folder, "
            "e.g. CodeLlama-7b/ (use '.' for the current folder)"
        )
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"{what} must be a path (str or os.PathLike), {path_type_hint(path)}")
    return Path(path)


def path_type_hint(path: object) -> str:
    """'got int: 123', and for a number the command-line reason and fix."""
    text = f"got {type(path).__name__}: {path!r:.60}"
    if isinstance(path, (int, float)) and not isinstance(path, bool):
        text += f" (a command line reads a name of digits as a number: write ./{path})"
    return text


def shard_paths(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """The ``consolidated.NN.pth`` shards of a checkpoint directory, in order (at least one).

    Other ``*.pth`` files beside them (e.g. a ``backup.pth``) are ignored with a warning;
    a folder without any ``consolidated.NN.pth`` uses all its ``*.pth`` files, sorted, as
    Meta's loader does.
    """
    d = check_path_given(ckpt_dir, "the checkpoint directory (ckpt_dir)")
    if d.is_file():
        raise CheckpointNotFoundError(
            f"checkpoint directory {str(d)!r} is a file, not a directory; pass the folder that "
            "holds consolidated.00.pth and params.json (e.g. CodeLlama-7b/), not a file in it"
        )
    if not d.is_dir():
        raise CheckpointNotFoundError(
            f"checkpoint directory {str(d)!r} does not exist; pass the folder that holds "
            "consolidated.00.pth and params.json (e.g. CodeLlama-7b/)"
        )
    paths = sorted(d.glob("*.pth"))
    if not paths:
        raise CheckpointNotFoundError(
            f"no checkpoint files (*.pth) in {str(d)!r}; download the model with download.sh"
        )
    shards = [p for p in paths if SHARD_RE.match(p.name)]
    if shards:
        _check_numbering(d, shards, [p.name for p in paths if not SHARD_RE.match(p.name)])
        shards.sort(key=_shard_number)
    else:
        shards = paths
    for p in shards:
        _check_regular_file(p)
    return shards


def _check_numbering(d: Path, shards: list[Path], others: list[str]) -> None:
    """Warn about ``others`` (.pth files beside the shards); refuse a gap in the numbers."""
    if others and distributed.is_first_process():
        warnings.warn(
            f"ignoring {others} in {str(d)!r}: only consolidated.NN.pth files are checkpoint "
            "shards; move the other .pth files elsewhere to silence this warning",
            stacklevel=3,
        )
    numbers = sorted(_shard_number(p) for p in shards)
    if numbers != list(range(len(shards))):
        wanted = [f"consolidated.{i:02d}.pth" for i in range(max(numbers) + 1)]
        lacking = sorted(set(wanted) - {p.name for p in shards})
        raise CheckpointError(
            f"the shards in {str(d)!r} are not numbered 00 to {len(shards) - 1:02d}: "
            + (f"missing {lacking}" if lacking else f"found {[p.name for p in shards]}")
            + "; download the model again with download.sh"
        )


def _check_regular_file(path: Path) -> None:
    """Refuse a shard that is a dangling link, or a folder, pipe or device: stat() would
    fail on the first, and opening a named pipe waits for a writer for ever."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        link = " (a link to a missing file)" if path.is_symlink() else ""
        raise CheckpointNotFoundError(
            f"checkpoint file {str(path)!r} does not exist{link}; download the model again "
            "with download.sh"
        ) from exc
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise CheckpointError(
            f"checkpoint file {str(path)!r} is {kind}; a shard must be the file download.sh wrote"
        )


def _shard_number(path: Path) -> int:
    m = SHARD_RE.match(path.name)
    return int(m.group(1)) if m else -1


def check_params(params: Mapping[str, object], where: str = PARAMS_FILE) -> None:
    """Raise :class:`ConfigError` if ``params`` lacks a key every params.json has."""
    missing = [k for k in REQUIRED_PARAMS if k not in params]
    if missing:
        raise ConfigError(
            f"{where} is missing {', '.join(missing)} (needed: {', '.join(REQUIRED_PARAMS)}); "
            "without them the model's size is unknown. Use the params.json that came with "
            'the checkpoint (e.g. CodeLlama-7b: {"dim": 4096, "n_layers": 32, "n_heads": 32, '
            "...}) or download the model again with download.sh"
        )


def read_params(ckpt_dir: str | os.PathLike[str]) -> dict:
    """params.json of a checkpoint, as a dict (with at least dim, n_layers and n_heads)."""
    path = check_path_given(ckpt_dir, "the checkpoint directory (ckpt_dir)") / PARAMS_FILE
    if path.is_dir():
        raise ConfigError(f"{str(path)!r} is a folder; params.json must be a JSON file")
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"{str(path)!r} does not exist; every checkpoint folder has a params.json beside its "
            "consolidated.NN.pth files: download the model again with download.sh"
        )
    try:
        params = json.loads(path.read_text(encoding="utf-8-sig"))  # an editor's BOM is fine
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise ConfigError(
            f"{str(path)!r} must hold a JSON object (like {{...}}), "
            f"got a JSON {type(params).__name__}"
        )
    check_params(params, repr(str(path)))
    return params


_STORAGE_DTYPES = {  # the storage classes torch.save names in a checkpoint's data.pkl
    b"BFloat16Storage": torch.bfloat16,
    b"HalfStorage": torch.float16,
    b"FloatStorage": torch.float32,
    b"DoubleStorage": torch.float64,
}


def stored_dtypes(path: str | os.PathLike[str]) -> set[torch.dtype] | None:
    """The floating-point dtypes a ``torch.save`` checkpoint holds, read from its pickle
    alone (a few KiB, no tensor is opened); None where that cannot be told."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(names) != 1 or z.getinfo(names[0]).file_size > 64 * 2**20:
                return None
            text = z.read(names[0])
    except (OSError, zipfile.BadZipFile, KeyError, ValueError):
        return None
    found = {dtype for name, dtype in _STORAGE_DTYPES.items() if b"torch\n" + name + b"\n" in text}
    return found or None


_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # torch.save's legacy format
_MAPPED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def _file_format(path: Path) -> str:
    """'zip' (torch.save's default), 'legacy' (``_use_new_zipfile_serialization=False``),
    'empty' or 'unknown', from the first bytes of ``path``."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if _LEGACY_MAGIC in head[:32]:  # the pickled magic number that opens a legacy file
        return "legacy"
    return "unknown"


def load_shard(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Open one shard lazily (mmap) and safely (tensors only; code is refused, not run).

    Files in torch.save's legacy (non-zip) format cannot be memory-mapped: they are read
    into memory whole, as Meta's loader does. Every tensor must be floating point.
    """
    p = Path(path)
    try:
        kind = _file_format(p)
        if kind == "empty":
            raise CheckpointError(
                f"cannot read {str(p)!r}: the file is empty (0 bytes); download it again "
                "and check it against checklist.chk"
            )
        if kind == "unknown":
            raise CheckpointError(
                f"cannot read {str(p)!r}: it is not a PyTorch checkpoint (neither torch.save's "
                "zip format nor its legacy format), or it is corrupt; download it again and "
                "check it against checklist.chk"
            )
        mapped = kind == "zip"
        sd = torch.load(p, map_location="cpu", mmap=mapped, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {str(p)!r}: it holds objects other than tensors (a pickle that "
            f"could run code). Only load checkpoints from sources you trust. ({exc})"
        ) from exc
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"checkpoint file {str(p)!r} does not exist") from exc
    except IsADirectoryError as exc:
        raise CheckpointError(f"checkpoint file {str(p)!r} is a directory, not a file") from exc
    except PermissionError as exc:
        raise CheckpointError(
            f"cannot read {str(p)!r}: permission denied; make the file readable ({exc})"
        ) from exc
    except CheckpointError:
        raise
    except Exception as exc:  # torch raises many types on a damaged file (IndexError, ...)
        raise CheckpointError(
            f"cannot read {str(p)!r}: the file is truncated or corrupt ({exc}); "
            "download it again and check it against checklist.chk"
        ) from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{str(p)!r} is not a state dict of tensors")
    for name, t in sd.items():
        if name not in TOLERATED_EXTRA_KEYS and not t.is_floating_point():
            raise CheckpointError(
                f"{name} in {str(p)!r} has dtype {str(t.dtype).removeprefix('torch.')}; Code "
                "Llama weights are floating point (bfloat16, float16 or float32): this file "
                "is not a Code Llama checkpoint, or was damaged when saved"
            )
        if t.is_meta:
            raise CheckpointError(
                f"{name} in {str(p)!r} is a meta tensor, which holds no data: the file was "
                "saved from a model whose weights were never filled in (built on "
                "device='meta'); save it after its weights are loaded"
            )
        if t.layout != torch.strided:
            raise CheckpointError(
                f"{name} in {str(p)!r} is a {str(t.layout).removeprefix('torch.')} tensor; "
                "Code Llama weights are dense: save them dense (tensor.to_dense())"
            )
        if mapped:
            _MAPPED[id(t)] = t
    return sd


def is_mapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is a tensor of a memory-mapped shard returned by :func:`load_shard`
    (whose pages may be dropped and re-read from the file)."""
    return _MAPPED.get(id(t)) is t


def release_pages(t: torch.Tensor) -> None:
    """Drop the mmap'd file pages behind ``t`` (loaded by :func:`load_shard`) from this
    process's memory once they are copied (Linux only; they are re-read if touched again).

    Does nothing for any other tensor: dropping the pages of ordinary memory would lose
    its data.
    """
    if _madvise() is None or t.device.type != "cpu" or not is_mapped(t):
        return
    storage = t.untyped_storage()
    _drop_pages(storage.data_ptr(), storage.data_ptr() + storage.nbytes())


def _drop_pages(start: int, end: int) -> None:
    """MADV_DONTNEED the whole pages inside [start, end) of a file mapping."""
    page = mmap.PAGESIZE
    lo, hi = (start + page - 1) // page * page, end // page * page
    madvise = _madvise()
    if madvise is not None and hi > lo:
        madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED


def copy_releasing(dst: torch.Tensor, piece: torch.Tensor, release: bool) -> None:
    """``dst.copy_(piece)``; with ``release`` (``piece`` is a view of a shard tensor that
    :func:`load_shard` mapped), a large piece is copied a block of rows at a time, each
    block's file pages dropped once copied: a copy that converts (an fp32 checkpoint built
    in bf16) would otherwise hold the whole source (131 MB for an fp32 32016 x 1024
    embedding) besides what it builds."""
    size = piece.element_size()
    if (
        _madvise() is None
        or not release
        or piece.device.type != "cpu"
        or piece.dim() == 0
        or piece.numel() * size < 2 * _COPY_BLOCK_BYTES
    ):
        dst.copy_(piece)
        return
    step = max(1, _COPY_BLOCK_BYTES // max(1, piece[0].numel() * size))
    for a in range(0, piece.shape[0], step):
        b = min(piece.shape[0], a + step)
        dst[a:b].copy_(piece[a:b])
        _drop_pages(piece[a].data_ptr(), piece[b - 1].data_ptr() + _span(piece[b - 1]))


_COPY_BLOCK_BYTES = 16 * 2**20


def _span(t: torch.Tensor) -> int:
    """Bytes from ``t``'s first element to the end of its last."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    return (last + 1) * t.element_size()


@functools.cache
def _madvise():  # type: ignore[no-untyped-def]
    """libc's madvise (Linux), looked up on first use; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _overlap(a0: int, a1: int, b0: int, b1: int) -> tuple[int, int]:
    return max(a0, b0), min(a1, b1)


def _cuts(shards: list[int], per_shard: int, dst_lo: int, size: int) -> tuple[int, ...]:
    """Where the pieces of a split parameter start and end in this rank's slice
    ``[dst_lo, dst_lo + size)``, when source shard ``s`` holds ``[s, s + 1) * per_shard``."""
    cuts: set[int] = set()
    for s in shards:
        lo, hi = _overlap(s * per_shard, (s + 1) * per_shard, dst_lo, dst_lo + size)
        if hi > lo:
            cuts.update((lo - dst_lo, hi - dst_lo))
    return tuple(sorted(cuts))


def load_weights(
    model: nn.Module,
    paths: list[Path],
    mp_rank: int = 0,
    mp_size: int = 1,
    progress: bool = False,
    store: Callable[[str, torch.Tensor, int, int, tuple[int, ...], bool], bool] | None = None,
) -> None:
    """Copy this rank's slices of an N-shard checkpoint into ``model``'s parameters.

    ``model`` is built for ``mp_size`` ranks with real (allocated) parameters. Source shard
    ``s`` holds rows ``[s*F/N, (s+1)*F/N)`` of each split dimension F; rank ``r`` needs
    ``[r*F/M, (r+1)*F/M)``, so only overlapping shards are opened. Keys are checked
    strictly; every problem is reported at once with the file it came from.

    ``store(name, piece, dim, offset, cuts, mapped)``, when given, is offered each source
    tensor's part of a split parameter: ``piece`` goes at ``offset`` along dimension ``dim``,
    and ``cuts`` are where this rank's pieces of that parameter start and end (``(0, size)``
    when one piece is the whole); ``mapped`` is True: ``piece`` is a view of the mapped
    file, whose pages ``store`` may drop once read (False for a legacy-format shard, read
    into memory). If it returns True it has stored the piece itself (e.g. packed) and it is
    not copied.

    A replicated parameter (a norm) must be equal in every shard opened, as Meta's
    checkpoints are.
    """
    n = len(paths)
    params = dict(model.named_parameters())
    seen: dict[str, int] = {name: 0 for name in params}
    missing: list[str] = []
    unexpected: list[str] = []
    mismatched: list[str] = []
    first: dict[str, tuple[torch.Tensor, Path]] = {}  # replicated name -> (copy, its shard)
    wanted = [
        s for s in range(n) if s * mp_size < (mp_rank + 1) * n and (s + 1) * mp_size > mp_rank * n
    ]
    total = sum(paths[s].stat().st_size for s in wanted)
    show = progress and total >= _PROGRESS_MIN_BYTES
    done_bytes = 0
    for s in wanted:
        path = paths[s]
        sd = load_shard(path)
        names = set(sd)
        for name in sorted(set(params) - names):
            missing.append(f"{name} (not in {path.name})")
        for name, src in sd.items():
            if name not in params:
                if name not in TOLERATED_EXTRA_KEYS:
                    unexpected.append(f"{name} (in {path.name})")
                continue
            dst = params[name]
            dim = split_dim(name)
            with torch.no_grad():
                if dim is None:
                    if tuple(src.shape) != tuple(dst.shape):
                        mismatched.append(
                            f"{name} in {path.name}: {tuple(src.shape)}, expected {tuple(dst.shape)}"
                        )
                    elif seen[name] == 0:
                        copy_releasing(dst, src, is_mapped(src))
                        if len(wanted) > 1:
                            first[name] = (src.clone(), path)
                    elif name in first:
                        check_replicated(name, first[name][0], first[name][1], src, path)
                else:
                    full = dst.shape[dim] * mp_size
                    expected = list(dst.shape)
                    expected[dim] = full // n
                    if full % n:
                        mismatched.append(
                            f"{name} in {path.name}: {tuple(src.shape)}; its {full} rows along "
                            f"dim {dim} do not split into {n} equal shards, so this folder's "
                            f"{n} consolidated.NN.pth files are not one checkpoint's (a stray "
                            "or missing shard?)"
                        )
                    elif list(src.shape) != expected:
                        mismatched.append(
                            f"{name} in {path.name}: {tuple(src.shape)}, expected "
                            f"{tuple(expected)} (a {n}-way shard of {full} along dim {dim})"
                        )
                    else:
                        src_lo, dst_lo = s * (full // n), mp_rank * dst.shape[dim]
                        lo, hi = _overlap(
                            src_lo,
                            src_lo + src.shape[dim],
                            dst_lo,
                            dst_lo + dst.shape[dim],
                        )
                        piece = src.narrow(dim, lo - src_lo, hi - lo)
                        cuts = _cuts(wanted, full // n, dst_lo, dst.shape[dim])
                        stored = store is not None and store(
                            name, piece, dim, lo - dst_lo, cuts, is_mapped(src)
                        )
                        if not stored:
                            copy_releasing(
                                dst.narrow(dim, lo - dst_lo, hi - lo), piece, is_mapped(src)
                            )
            seen[name] += 1
            release_pages(src)
        del sd
        done_bytes += path.stat().st_size
        if show:
            _progress(done_bytes, total, path.name)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append("missing keys: " + ", ".join(missing[:20]) + _more(missing))
        if unexpected:
            parts.append("unexpected keys: " + ", ".join(unexpected[:20]) + _more(unexpected))
        if mismatched:
            parts.append("shape mismatches: " + "; ".join(mismatched[:20]) + _more(mismatched))
        raise CheckpointError(
            f"checkpoint in {str(paths[0].parent)!r} does not match params.json and the "
            "tokenizer: " + " | ".join(parts)
        )


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values (bit for bit when of one dtype, so equal
    NaNs count as equal)."""
    if a.shape != b.shape:
        return False
    if a.dtype != b.dtype:
        return torch.equal(a.double(), b.double())
    flat_a, flat_b = a.reshape(-1).contiguous(), b.reshape(-1).contiguous()
    return torch.equal(flat_a.view(torch.uint8), flat_b.view(torch.uint8))


def check_replicated(
    name: str, a: torch.Tensor, path_a: Path, b: torch.Tensor, path_b: Path
) -> None:
    """Raise :class:`CheckpointError` if replicated parameter ``name`` differs between two
    shards (each model-parallel process would use different weights)."""
    if not same_tensor(a, b):
        dtypes = f" ({a.dtype} against {b.dtype})" if a.dtype != b.dtype else ""
        raise CheckpointError(
            f"{name} differs between {path_a.name} and {path_b.name}{dtypes} in "
            f"{str(path_a.parent)!r}: it is not split across shards, so every shard must hold "
            "the same copy; the checkpoint is damaged or mixes shards of different models: "
            "download it again and check it against checklist.chk"
        )


def _more(items: list[str]) -> str:
    return f" (+{len(items) - 20} more)" if len(items) > 20 else ""


def _progress(done: int, total: int, name: str) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(
        f"\rLoading checkpoint [{'#' * filled}{'.' * (width - filled)}] "
        f"{done / 2**30:.1f}/{total / 2**30:.1f} GiB ({name})"
    )
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def shard_state_dict(
    state_dict: Mapping[str, torch.Tensor], n: int
) -> list[dict[str, torch.Tensor]]:
    """Split a consolidated (MP=1) state dict into Meta's ``n``-shard layout."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, t in state_dict.items():
        dim = split_dim(name)
        if dim is None:
            for sd in shards:
                sd[name] = t.clone()
            continue
        if t.shape[dim] % n:
            raise ConfigError(
                f"{name} has {t.shape[dim]} rows along dim {dim}; not divisible by {n}"
            )
        for sd, piece in zip(shards, torch.chunk(t, n, dim=dim), strict=True):
            sd[name] = piece.clone()
    return shards


def merge_shards(
    shards: Iterable[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Concatenate Meta-layout shards back into one consolidated state dict."""
    shards = list(shards)
    merged: dict[str, torch.Tensor] = {}
    for name, first in shards[0].items():
        dim = split_dim(name)
        merged[name] = first if dim is None else torch.cat([sd[name] for sd in shards], dim=dim)
    return merged


def iter_full_tensors(
    ckpt_dir: str | os.PathLike[str],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, consolidated tensor) of a checkpoint one parameter at a time."""
    paths = shard_paths(ckpt_dir)
    shards = [load_shard(p) for p in paths]
    for name in shards[0]:
        dim = split_dim(name)
        if dim is None:
            for s in range(1, len(shards)):
                if name in shards[s]:
                    check_replicated(name, shards[0][name], paths[0], shards[s][name], paths[s])
        if dim is None or len(shards) == 1:  # one shard: the tensor itself, not a copy
            yield name, shards[0][name]
        else:
            yield name, torch.cat([sd[name] for sd in shards], dim=dim)


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` with storage of its own size (torch.save writes a view's whole storage)."""
    t = t.contiguous()
    if t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def check_overwrite(overwrite: object) -> bool:
    """``overwrite`` if it is True or False (numpy's bool too); anything else, such as the
    string ``'false'`` a command line passes through, is a :class:`ConfigError`, never
    taken as True."""
    if is_bool(overwrite):
        return bool(overwrite)
    raise ConfigError(
        f"overwrite must be True or False, got {overwrite!r}; on the command line pass "
        "--overwrite (or --overwrite=True / --overwrite=False)"
    )


# The files a checkpoint folder holds (Meta's layout, Hugging Face's): ``overwrite`` replaces
# a folder only when it holds nothing else, so no file of the user's goes with it.
_CHECKPOINT_FILE_RE = re.compile(
    r"^(consolidated\.\d+\.pth|params\.json|tokenizer\.model|checklist\.chk|config\.json"
    r"|generation_config\.json|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json"
    r"|.*\.safetensors|.*\.safetensors\.index\.json|pytorch_model.*\.bin"
    r"|pytorch_model\.bin\.index\.json)$"
)


def refuse_non_empty(out: Path, overwrite: bool, *, folder: bool = True) -> None:
    """Raise :class:`OutputExistsError` (a ``FileExistsError``) if the output ``out`` (a
    folder, or a file if not ``folder``) holds anything, unless ``overwrite``; even then a
    folder is replaced only if it holds nothing but checkpoint files, and a folder is never
    taken for a file nor a file for a folder. A non-bool ``overwrite`` is a
    :class:`ConfigError`."""
    overwrite = check_overwrite(overwrite)
    out = check_path_given(out, "the output folder (out_dir)" if folder else "the output file")
    if not out.exists():
        return
    if folder != out.is_dir():
        raise OutputExistsError(
            f"{str(out)!r} is a {'file' if folder else 'folder'}, not a "
            f"{'folder' if folder else 'file'}; choose another output (nothing was written)"
        )
    names = sorted(p.name for p in out.iterdir()) if folder else []
    if not names if folder else out.stat().st_size == 0:
        return
    if not overwrite:
        raise OutputExistsError(
            f"{str(out)!r} exists and is not empty; choose another output or pass "
            "overwrite=True (--overwrite)"
        )
    foreign = [n for n in names if not (_CHECKPOINT_FILE_RE.match(n) and (out / n).is_file())]
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutputExistsError(
            f"{str(out)!r} holds {len(foreign)} file(s) or folder(s) that are not a "
            f"checkpoint's ({shown}); overwrite replaces a checkpoint folder only, so nothing "
            "of yours is deleted: move them out or choose another output"
        )


def _refuse_working_folder(out: Path) -> None:
    """A folder that holds the current directory cannot be replaced (and must not be)."""
    cwd = Path.cwd().resolve()
    target = out.resolve()
    if target == cwd or target in cwd.parents:
        raise OutputExistsError(
            f"the output folder {str(out)!r} is the current folder or holds it; it cannot be "
            "replaced from inside: pass a new folder (e.g. converted/) or cd elsewhere"
        )


def _writable_beside(out: Path, what: str) -> Path:
    """A new temporary folder beside ``out`` (its parent created if need be); an OS refusal
    is an :class:`OutputNotWritableError` naming ``out``, not the temporary path."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.{what}-", dir=out.parent))
    except OSError as e:
        raise OutputNotWritableError(
            f"cannot write the output {str(out)!r}: {e.strerror or e}; choose a folder you "
            "can write to"
        ) from e


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``kill``, a job scheduler) into SystemExit for a command-line run, so
    that :func:`atomic_dir` removes its temporary folder as it does on Ctrl-C."""
    import signal

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _usual_modes(folder: Path) -> None:
    """Give ``folder`` and what it holds the modes a plain mkdir or open would (the umask's):
    mkdtemp makes the folder private (0700), some writers their files (0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir`` that replaces it when the block succeeds.

    Refuses a non-empty ``out_dir`` unless ``overwrite`` (see :func:`refuse_non_empty`); on
    failure nothing is left half-written and an existing ``out_dir`` is kept as it was.
    """
    given = check_path_given(out_dir, "the output folder (out_dir)")
    out = Path(os.path.abspath(given))  # "." has no name nor parent to write beside
    refuse_non_empty(out, overwrite)  # which checks overwrite
    if out.exists():
        _refuse_working_folder(out)
    tmp = _writable_beside(out, "tmp")
    try:
        yield tmp
        _usual_modes(tmp)
        if not out.exists():
            os.replace(tmp, out)
            return
        backup = _writable_beside(out, "old")
        try:
            os.replace(out, backup / out.name)
        except OSError as e:
            shutil.rmtree(backup, ignore_errors=True)
            raise OutputNotWritableError(
                f"cannot replace the output folder {str(given)!r}: {e.strerror or e}"
            ) from e
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(backup / out.name, out)  # put the old output back, then drop the backup
            shutil.rmtree(backup, ignore_errors=True)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(
    out_dir: str | os.PathLike[str],
    shards: Iterable[Mapping[str, torch.Tensor]],
    params: Mapping[str, object],
    tokenizer_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write Meta's layout atomically (see :func:`atomic_dir`); shards are saved one by one."""
    with atomic_dir(out_dir, overwrite) as tmp:
        for i, sd in enumerate(shards):
            torch.save({k: _owned(v) for k, v in sd.items()}, tmp / f"consolidated.{i:02d}.pth")
        (tmp / PARAMS_FILE).write_text(json.dumps(dict(params), indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
    return Path(out_dir)
