"""Reshard a Meta-layout checkpoint from N ``consolidated.NN.pth`` files to M.

``python -m codellama.reshard --ckpt_dir CodeLlama-34b --out_dir CodeLlama-34b-mp2 \\
--model_parallel_size 2`` writes the same weights split for 2 model-parallel processes, with
params.json and tokenizer.model copied. The input is only read (mmap), never modified; the
output is written atomically (a temporary folder renamed at the end). Output shards are
built one at a time, so memory peaks at about one output shard.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from .checkpoint import (
    check_overwrite,
    check_path_given,
    check_replicated,
    exit_on_sigterm,
    load_shard,
    read_params,
    refuse_non_empty,
    release_pages,
    shard_paths,
    split_dim,
    write_checkpoint,
)
from .errors import CheckpointError, ConfigError

TOKENIZER_FILE = "tokenizer.model"


def kv_heads_of(params: Mapping[str, object]) -> int:
    """n_kv_heads of a params.json dict (defaults to n_heads)."""
    kv = params.get("n_kv_heads")
    if kv is None:
        kv = params.get("n_heads")
    if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1:
        raise ConfigError(
            f"params.json needs a positive integer n_heads (and optionally n_kv_heads); "
            f"got n_heads={params.get('n_heads')!r}, n_kv_heads={params.get('n_kv_heads')!r}"
        )
    return kv


def valid_model_parallel_sizes(kv_heads: int, shapes: Mapping[str, Sequence[int]]) -> list[int]:
    """Model-parallel sizes that divide ``kv_heads`` and every split dimension of ``shapes``.

    ``shapes`` maps parameter names to their consolidated (MP=1) shapes.
    """
    sizes = [d for d in range(1, kv_heads + 1) if kv_heads % d == 0]
    for name, shape in shapes.items():
        dim = split_dim(name)
        if dim is not None:
            sizes = [d for d in sizes if shape[dim] % d == 0]
    return sizes


def check_model_parallel_size(
    model_parallel_size: object, kv_heads: int, shapes: Mapping[str, Sequence[int]]
) -> int:
    """Return ``model_parallel_size`` if valid, else raise :class:`ConfigError` naming the valid ones."""
    valid = valid_model_parallel_sizes(kv_heads, shapes)
    mp = model_parallel_size
    if isinstance(mp, bool) or not isinstance(mp, int) or mp not in valid:
        raise ConfigError(
            f"model_parallel_size={mp!r} is not valid for this checkpoint: it must be a "
            f"positive integer dividing n_kv_heads={kv_heads} and every sharded dimension; "
            f"valid values: {valid}"
        )
    return mp


def check_distinct_dirs(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Refuse an output folder that is, contains or lies inside the input folder.

    Replacing the output would delete or change the input, which is only ever read.
    """
    s, o = Path(src).resolve(), Path(out).resolve()
    if s == o or o in s.parents or s in o.parents:
        raise ConfigError(
            f"out_dir {str(out)!r} is, contains or lies inside the input folder {str(src)!r}; "
            "the input is never modified, so write to a folder beside it"
        )


def consolidated_shapes(
    shards: Sequence[Mapping[str, torch.Tensor]], paths: Sequence[Path]
) -> dict[str, tuple[int, ...]]:
    """Consolidated shapes of an N-shard checkpoint, checking that the shards agree (the
    same keys, the same shapes, and the same values of each replicated parameter)."""
    n = len(shards)
    names = list(shards[0])
    shapes: dict[str, tuple[int, ...]] = {}
    problems: list[str] = []
    for s, sd in enumerate(shards[1:], start=1):
        if set(sd) != set(names):
            diff = sorted(set(sd) ^ set(names))
            problems.append(f"{paths[s].name} and {paths[0].name} hold different keys: {diff[:10]}")
    if problems:
        raise CheckpointError("inconsistent checkpoint shards: " + "; ".join(problems))
    for name in names:
        try:
            dim = split_dim(name)
        except KeyError:
            raise CheckpointError(
                f"unexpected parameter {name!r} in {paths[0].name}; not a Code Llama weight"
            ) from None
        first = tuple(shards[0][name].shape)
        for s, sd in enumerate(shards):
            shape = list(sd[name].shape)
            expected = list(first)
            if shape != expected:
                problems.append(
                    f"{name}: {tuple(shape)} in {paths[s].name} but {first} in {paths[0].name}"
                )
        if dim is None:
            shapes[name] = first
            if not problems:  # replicated: every shard holds the same copy
                for s in range(1, n):
                    check_replicated(name, shards[0][name], paths[0], shards[s][name], paths[s])
        else:
            full = list(first)
            full[dim] *= n
            shapes[name] = tuple(full)
    if problems:
        raise CheckpointError("inconsistent checkpoint shards: " + "; ".join(problems[:20]))
    return shapes


def _slice(pieces: Sequence[torch.Tensor], dim: int, lo: int, hi: int) -> torch.Tensor:
    """Rows ``[lo, hi)`` along ``dim`` of the concatenation of equal-size ``pieces``, copied."""
    size = pieces[0].shape[dim]
    parts = []
    for s, piece in enumerate(pieces):
        a, b = max(lo, s * size), min(hi, (s + 1) * size)
        if a < b:
            parts.append(piece.narrow(dim, a - s * size, b - a))
    out = torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0].clone()
    return out.contiguous()


def reshard_state_dicts(
    shards: Sequence[Mapping[str, torch.Tensor]], model_parallel_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the ``model_parallel_size`` output shards of Meta-layout ``shards``, one at a time.

    Each yielded dict is emptied when the next one is requested, so only one output shard
    is alive at a time (as long as the consumer keeps no reference to its tensors).
    """
    n, m = len(shards), model_parallel_size
    for r in range(m):
        out: dict[str, torch.Tensor] = {}
        for name, first in shards[0].items():
            dim = split_dim(name)
            if dim is None:
                out[name] = first.clone()
                continue
            full = first.shape[dim] * n
            if full % m:
                raise ConfigError(f"{name} has {full} rows along dim {dim}; not divisible by {m}")
            step = full // m
            out[name] = _slice([sd[name] for sd in shards], dim, r * step, (r + 1) * step)
        yield out
        out.clear()


def reshard(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    model_parallel_size: int,
    overwrite: bool = False,
) -> Path:
    """Rewrite the checkpoint in ``ckpt_dir`` as ``model_parallel_size`` shards in ``out_dir``.

    Keys, dtypes and values are preserved exactly; params.json and tokenizer.model (if
    present) are copied. ``out_dir`` must be empty or absent unless ``overwrite``.

    Returns:
        The output folder.
    """
    overwrite = check_overwrite(overwrite)  # before any slow work
    check_path_given(out_dir, "the output folder (out_dir)")
    paths = shard_paths(ckpt_dir)
    params = read_params(ckpt_dir)
    kv = kv_heads_of(params)
    check_distinct_dirs(ckpt_dir, out_dir)
    # Checked early (write_checkpoint checks again) to fail before any work is done.
    out = Path(out_dir)
    refuse_non_empty(out, overwrite)
    shards = [load_shard(p) for p in paths]
    shapes = consolidated_shapes(shards, paths)
    mp = check_model_parallel_size(model_parallel_size, kv, shapes)
    tokenizer = Path(ckpt_dir) / TOKENIZER_FILE
    try:
        return write_checkpoint(
            out,
            reshard_state_dicts(shards, mp),  # consumed lazily
            params,
            tokenizer if tokenizer.is_file() else None,
            overwrite,
        )
    finally:
        for sd in shards:
            for t in sd.values():
                release_pages(t)
        del shards


def main(
    ckpt_dir: str,
    out_dir: str,
    model_parallel_size: int,
    overwrite: bool = False,
) -> None:
    """Reshard ``ckpt_dir`` into ``model_parallel_size`` shards written to ``out_dir``."""
    out = reshard(ckpt_dir, out_dir, model_parallel_size, overwrite=overwrite)
    n = len(shard_paths(out))
    print(f"Wrote {n} shard{'s' if n != 1 else ''} to {out}")


if __name__ == "__main__":
    from .cli import run

    exit_on_sigterm()
    run(main)
