"""Device, dtype and model-parallel process-group setup.

A plain Python process gets its own single-process gloo group, so MP=1 needs no launcher;
under ``torchrun`` the group comes from the environment (nccl on CUDA, gloo on CPU).
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import math
import numbers
import os
import pickle
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

from .errors import ConfigError, DistributedError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

# Collectives give up after this long (seconds; $CODELLAMA_TIMEOUT_S overrides it when the
# process group is created), so a failed peer cannot hang the others for ever.
DEFAULT_TIMEOUT_S = 60
# The longest wait torch's stores take (~31 years; 1e10 s overflows their milliseconds): a
# larger $CODELLAMA_TIMEOUT_S, such as 1e100 or inf for "for ever", waits this long.
MAX_TIMEOUT_S = 1e9


def collective_timeout() -> datetime.timedelta:
    """How long a collective waits for its peers: $CODELLAMA_TIMEOUT_S seconds (at most
    :data:`MAX_TIMEOUT_S`), or 60."""
    raw = os.environ.get("CODELLAMA_TIMEOUT_S", "").strip()
    if not raw:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if math.isnan(seconds) or seconds <= 0:
        raise ConfigError(
            f"CODELLAMA_TIMEOUT_S must be a number of seconds > 0, got {raw!r}; unset it for "
            f"the default ({DEFAULT_TIMEOUT_S} s)"
        )
    return datetime.timedelta(seconds=min(seconds, MAX_TIMEOUT_S))


_owns_group = False  # True when codellama created the default process group


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """``None`` picks cuda, else mps, else cpu; a string or torch.device is checked."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"device={device!r} is not a device; use 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available; use device='cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device!r} but MPS is not available; use device='cpu'")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={device!r} is not supported; use 'cpu', 'cuda' or 'mps'")
    if dev.type != "cuda" and dev.index not in (None, 0):  # torch would drop the index
        raise ConfigError(f"device={device!r}: there is one {dev.type} device; use {dev.type!r}")
    return dev


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """``None`` picks bf16 on CUDA where supported, else fp16 on CUDA, else fp32."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # fp16 on CPU overflows and is slow; fp32 is the safe default
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ConfigError(
        f"dtype={dtype!r} is not supported; use one of 'float32', 'bfloat16', 'float16' "
        "(or the torch dtypes)"
    )


def available_memory(device: torch.device) -> int | None:
    """Bytes that new allocations on ``device`` can still get; None where unknown.

    CUDA: the driver's free memory. CPU (Linux): MemAvailable plus free swap, capped by a
    cgroup (container) limit; divided among the processes torchrun started on this host.
    """
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    info = _read_kib_fields("/proc/meminfo")
    if "MemAvailable" not in info:
        return None
    free = (info["MemAvailable"] + info.get("SwapFree", 0)) * 1024
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        free = min(free, max(limit - used, 0))
    return free // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


def _read_kib_fields(path: str) -> dict[str, int]:
    fields: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    fields[key] = int(parts[0])
    except OSError:
        pass
    return fields


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" means no limit


def setup_model_parallel(model_parallel_size: int | None, device: torch.device) -> tuple[int, int]:
    """Initialise torch.distributed and fairscale; return (this process's rank within its
    model-parallel group, model_parallel_size). With more processes than
    ``model_parallel_size`` (a multiple of it), each group of that many runs its own copy of
    the model, on its own prompts, as with Meta's code.

    Safe to call again in the same process (a notebook rebuilding a model).
    """
    global _owns_group
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            backend = "nccl" if device.type == "cuda" else "gloo"
            select_cuda_device(device)  # before nccl's first use of a device
            dist.init_process_group(backend, timeout=collective_timeout())
        else:  # one process, no launcher: a private group for fairscale's layers
            hook = sys.excepthook
            dist.init_process_group(
                "gloo",
                store=dist.HashStore(),
                rank=0,
                world_size=1,
                timeout=collective_timeout(),
            )
            sys.excepthook = hook  # torch's prefixes every later traceback with "[rank0]:"
        _owns_group = True
        atexit.register(shutdown)
    world = dist.get_world_size()
    mp = world if model_parallel_size is None else model_parallel_size
    if isinstance(mp, bool) or not isinstance(mp, numbers.Integral) or mp < 1:
        raise ConfigError(f"model_parallel_size must be a positive integer, got {mp!r}")
    mp = int(mp)  # numpy's integers too
    if world % mp:
        raise ConfigError(
            f"model_parallel_size={mp} but {world} process(es) are running, which {mp} does "
            f"not divide; launch with `torchrun --nproc_per_node {mp} ...` (or a multiple of "
            f"it, for {mp}-process copies of the model), or pass model_parallel_size={world}"
        )
    select_cuda_device(device)
    if fs_init.model_parallel_is_initialized():
        if fs_init.get_model_parallel_world_size() == mp:
            return fs_init.get_model_parallel_rank(), mp
        fs_init.destroy_model_parallel()
    fs_init.initialize_model_parallel(mp)  # world // mp copies (data parallel), as Meta's
    return fs_init.get_model_parallel_rank(), mp


def is_first_process() -> bool:
    """Whether this is the first process of a run (rank 0 of the process group, or
    torchrun's RANK 0 before one exists, or no launcher): the one that prints warnings meant
    once per run."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def select_cuda_device(device: torch.device) -> None:
    """Make ``device`` CUDA's current device: the one named (``cuda:1``), else torchrun's
    LOCAL_RANK. Streams and events without a device argument then belong to the model's."""
    if device.type == "cuda":
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(index)


def shutdown() -> None:
    """Tear down fairscale and the process group codellama created (idempotent)."""
    global _owns_group
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if _owns_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_group = False


def model_parallel_world() -> int:
    return fs_init.get_model_parallel_world_size() if fs_init.model_parallel_is_initialized() else 1


def broadcast_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Make every rank use rank 0's sampled tokens (no-op with one process)."""
    if model_parallel_world() > 1:
        dist.broadcast(
            tokens,
            src=fs_init.get_model_parallel_src_rank(),
            group=fs_init.get_model_parallel_group(),
        )
    return tokens


def describe_difference(name: str, values: Sequence[Any], width: int = 60) -> str:
    """``name: rank 0 <value>, rank 1 <value>, ...``; where a value would be cut at ``width``
    characters, the first place the ranks' (nested) lists differ and their values there, so
    that the message shows the difference however long the prompts are."""
    if all(len(repr(v)) <= width for v in values):
        return f"{name}: " + ", ".join(f"rank {r} {v!r}" for r, v in enumerate(values))
    where = ""
    while all(isinstance(v, (list, tuple)) for v in values) and len(values) > 1:
        n = min(len(v) for v in values)
        i = next((i for i in range(n) if any(v[i] != values[0][i] for v in values)), None)
        if i is None:  # one is a prefix of the other
            lens = ", ".join(f"rank {r} {len(v)}" for r, v in enumerate(values))
            return f"{name}{where}: the same first {n} items, lengths {lens}"
        where += f"[{i}]"
        values = [v[i] for v in values]
    texts = [repr(v) for v in values]
    if any(len(t) > width for t in texts):  # show each around where the texts first differ
        at = next((i for i in range(min(map(len, texts))) if len({t[i] for t in texts}) > 1),
                  min(map(len, texts)))  # fmt: skip
        lo = max(at - width // 2, 0)
        texts = [("..." if lo else "") + t[lo : lo + width] + ("..." if len(t) > lo + width else "")
                 for t in texts]  # fmt: skip
    shown = ", ".join(f"rank {r} {t}" for r, t in enumerate(texts))
    return f"{name}{where}: {shown}"


def check_same_on_all_ranks(what: str, fields: Mapping[str, Any]) -> None:
    """Raise :class:`DistributedError` on every rank if any of ``fields`` (name -> value)
    differs between model-parallel ranks, naming each field that differs and its value on
    every rank.

    Ranks of one model must see the same prompts and sampling parameters, or their
    collectives would pair up different computations (a silent wrong answer or a hang).
    """
    if model_parallel_world() == 1:
        return
    names = list(fields)
    digests = [hashlib.sha256(pickle.dumps(fields[n], protocol=4)).digest()[:8] for n in names]
    group = fs_init.get_model_parallel_group()
    on_gpu = dist.get_backend(group) == "nccl"  # nccl only moves CUDA tensors
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    mine = torch.tensor([list(d) for d in digests], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    # Every rank gathered the same digests, so every rank finds the same fields here.
    differ = [
        n
        for j, n in enumerate(names)
        if any(not torch.equal(g[j], gathered[0][j]) for g in gathered)
    ]
    if differ:
        values: list[Any] = [None] * world
        dist.all_gather_object(values, {n: fields[n] for n in differ}, group=group)
        detail = "; ".join(describe_difference(n, [v[n] for v in values]) for n in differ)
        raise DistributedError(
            f"{what} differ between model-parallel ranks ({detail}); every process must pass "
            "the same inputs, e.g. do not read prompts from a per-rank source"
        )
