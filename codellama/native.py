"""Native CPU kernel for the linear layers of decoding, compiled for this CPU on first use.

Decoding a few rows reads every weight once per token, so it runs at the speed of a
matrix-vector product. ``native_linear.c`` does that product 1.2-1.5x faster than oneDNN's
prepacked kernels (bf16, 2-core AVX512-BF16 EPYC; see the README), on weights kept in the
checkpoint's plain layout. It is built with the system C compiler into a per-CPU cache and
loaded with ctypes: no build step at install time, and no effect where it cannot be built
(no compiler, not Linux, ``CODELLAMA_NATIVE_KERNELS=0``): the model then uses oneDNN.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native_linear.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
ENV_SWITCH = "CODELLAMA_NATIVE_KERNELS"
MAX_ROWS = 8  # beyond this many rows a blocked GEMM (oneDNN, BLAS) is faster
MAX_BATCH = 2  # models that decode more rows at once are faster on oneDNN (see worth_using)

_last_error: str | None = None


class NativeLinear:
    """``x @ weight.T`` for up to :data:`MAX_ROWS` rows of ``x`` (fp32 or bf16, on CPU)."""

    max_rows = MAX_ROWS

    def __init__(self, library: ctypes.CDLL, path: Path):
        self.path = path
        signature = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_int]
        self._fns = {}
        for dtype, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
            fn = getattr(library, f"codellama_linear_{name}")
            fn.argtypes = signature
            fn.restype = ctypes.c_int
            self._fns[dtype] = fn
        self.bf16_dot_product = bool(library.codellama_bf16_dot_product())

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in self._fns

    def accepts(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether :meth:`__call__` handles this input (else use a general GEMM)."""
        return (
            x.numel() <= self.max_rows * x.shape[-1]
            and x.dtype == weight.dtype
            and x.device.type == "cpu"
            and not torch.compiler.is_compiling()
        )

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        n, k = weight.shape
        if x.shape[-1] != k or not weight.is_contiguous() or weight.dtype not in self._fns:
            raise ValueError(
                f"native linear needs a contiguous fp32/bf16 weight with {x.shape[-1]} "
                f"columns, got {weight.dtype} {tuple(weight.shape)}"
            )
        rows = x.reshape(-1, k).contiguous()
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
        status = self._fns[weight.dtype](
            rows.data_ptr(),
            weight.data_ptr(),
            out.data_ptr(),
            rows.shape[0],
            n,
            k,
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("native linear: out of memory for a copy of the input")
        return out


def worth_using(dtype: torch.dtype, max_batch_size: int) -> bool:
    """Whether a CPU model is faster overall with this kernel on plain weights than with
    oneDNN on prepacked ones. Measured on a 2-core AVX512-BF16 EPYC: decoding 1-2 rows it is
    1.2-1.8x faster; 4-8 rows, 0.6-0.95x; prefill on plain weights costs 3-5% in bf16 but
    20-35% in fp32 (BLAS on plain fp32 weights against oneDNN's prepacked GEMM). So: bf16
    models built for at most :data:`MAX_BATCH` rows."""
    return dtype == torch.bfloat16 and max_batch_size <= MAX_BATCH


def enabled_by_environment() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def last_error() -> str | None:
    """Why the most recent :func:`load` attempt returned None (for diagnostics)."""
    return _last_error


@functools.cache
def load() -> NativeLinear | None:
    """The kernel for this CPU, compiled on first use; None where it cannot be had."""
    global _last_error
    if not enabled_by_environment():
        _last_error = f"disabled by {ENV_SWITCH}"
        return None
    try:
        return build()
    except (OSError, RuntimeError, subprocess.SubprocessError, ValueError) as exc:
        _last_error = str(exc)
        return None


def build(
    compiler: str | None = None, flags: tuple[str, ...] = FLAGS, cache_dir: Path | None = None
) -> NativeLinear:
    """Compile (or reuse from the cache) and load the kernel; raises if any step fails.

    The result is checked against torch on a small product before it is returned, so a
    miscompiled kernel is refused rather than used.
    """
    if not sys.platform.startswith("linux"):
        raise RuntimeError("native kernels are built only on Linux")
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256()
    for part in (source, cc.encode(), " ".join(flags).encode(), _cpu_signature().encode()):
        key.update(part)
        key.update(b"\0")
    folder = (cache_dir or _cache_root()) / key.hexdigest()[:16]
    path = folder / "libcodellama_linear.so"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            done = subprocess.run(
                [cc, *flags, str(SOURCE), "-o", tmp],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip()[:500]}")
            os.replace(tmp, path)  # atomic: ranks compiling at once do not clash
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    kernel = NativeLinear(ctypes.CDLL(str(path)), path)
    _self_test(kernel)
    return kernel


def _self_test(kernel: NativeLinear) -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(37, 70, generator=gen).to(dtype)
        x = torch.randn(3, 70, generator=gen).to(dtype)
        want = x.double() @ w.double().T
        got = kernel(x, w).double()
        tol = 1e-4 if dtype == torch.float32 else 0.1
        if not torch.allclose(got, want, atol=tol, rtol=tol):
            raise RuntimeError(f"native kernel failed its {dtype} self-test")


def _cache_root() -> Path:
    if os.environ.get("CODELLAMA_CACHE"):
        root = Path(os.environ["CODELLAMA_CACHE"]) / "kernels"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "codellama" / "kernels"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"codellama-kernels-{os.getuid()}"


def _cpu_signature() -> str:
    """What -march=native depends on, so a shared cache never hands a CPU foreign code."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += line
                if line.strip() == "":
                    break  # the first processor describes them all
    except OSError:
        pass
    return text
