"""Shared fixtures: tiny tokenizers, random-weight checkpoints in Meta's layout."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from codellama import Llama, ModelArgs, Tokenizer, native, paths
from codellama.demo import train_tokenizer, write_random_checkpoint

REPO = Path(__file__).resolve().parent.parent


def cache_sharing_kernels(folder: Path) -> Path:
    """``folder``, made a codellama cache (``$CODELLAMA_CACHE``) for a subprocess: its own
    checkpoints and tokenizers, but this session's compiled kernels, linked in (compiling
    them takes 10-15 s on 2 cores, in every process with a cache of its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    if native.load() is not None:  # built (or found) in this session's cache
        link = folder / "kernels"
        if not link.exists():
            link.symlink_to(paths.cache_dir() / "kernels", target_is_directory=True)
    return folder


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SentencePiece model with Code Llama's infilling pieces."""
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="session")
def step_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SentencePiece model with the 70B Instruct ``<step>`` piece."""
    return train_tokenizer(
        tmp_path_factory.mktemp("tok_step") / "tokenizer.model", infilling=False, step=True
    )


@pytest.fixture(scope="session")
def plain_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SentencePiece model without infilling pieces (like Code Llama - Python)."""
    return train_tokenizer(
        tmp_path_factory.mktemp("tok_plain") / "tokenizer.model", infilling=False
    )


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


def _env_tokenizer(var: str) -> Tokenizer:
    path = os.environ.get(var)
    if not path:
        pytest.skip(
            f"{var} is not set: point it at Meta's tokenizer.model (.ci/run sets it to "
            "../shared/fixtures)"
        )
    if not os.path.isfile(path):
        pytest.skip(f"{var}={path!r} does not exist")
    return Tokenizer(path)


@pytest.fixture(scope="session")
def meta_tokenizer() -> Tokenizer:
    """Meta's Code Llama 7B/13B tokenizer (vocab 32016), from CODELLAMA_TOKENIZER."""
    return _env_tokenizer("CODELLAMA_TOKENIZER")


@pytest.fixture(scope="session")
def llama2_tokenizer() -> Tokenizer:
    """Meta's Llama 2 / Code Llama - Python tokenizer (no infilling), from LLAMA2_TOKENIZER."""
    return _env_tokenizer("LLAMA2_TOKENIZER")


# Small configs with every structural feature: GQA, ffn_dim_multiplier, rope_theta 1e6.
MHA_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, multiple_of=16, rope_theta=10000.0)
GQA_ARGS = ModelArgs(
    dim=64, n_layers=2, n_heads=8, n_kv_heads=4, multiple_of=16, ffn_dim_multiplier=1.3,
    rope_theta=1e6,
)  # fmt: skip

CheckpointFactory = Callable[..., Path]


def meta_sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Meta's llama/generation.py sample_top_p, with an explicit generator."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


@pytest.fixture(scope="session")
def make_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path
) -> CheckpointFactory:
    """Write (once per distinct request) a random checkpoint in Meta's layout; returns its dir.

    The directory holds ``tokenizer.model`` too. ``std`` scales the weights: a large value
    makes a "peaky" model whose greedy choices are far from ties.
    """
    cache: dict[tuple, Path] = {}

    def make(
        args: ModelArgs = GQA_ARGS,
        n_shards: int = 1,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        std: float = 0.5,
        tokenizer: Path | None = None,
    ) -> Path:
        tok = Path(tokenizer or tokenizer_path)
        key = (dataclasses.astuple(args), n_shards, seed, dtype, std, str(tok))
        if key not in cache:
            vocab = Tokenizer(tok).n_words
            full = dataclasses.replace(args, vocab_size=vocab)
            d = tmp_path_factory.mktemp("ckpt")
            write_random_checkpoint(
                d, full, n_shards=n_shards, seed=seed, dtype=dtype, std=std,
                tokenizer_path=tok, overwrite=True,
            )  # fmt: skip
            cache[key] = d
        return cache[key]

    return make


@pytest.fixture(autouse=True)
def _native_kernels_on_every_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests exercise the native kernels on every CPU: by default Llama.build uses them
    only where they were built with AVX-512 (native.preferred), so ask for them here."""
    if native.ENV_SWITCH not in os.environ:
        monkeypatch.setenv(native.ENV_SWITCH, "1")


@pytest.fixture
def build() -> Callable[..., Llama]:
    """``build(ckpt_dir, max_seq_len=128, max_batch_size=4, **kw)`` on CPU in fp32."""

    def _build(ckpt: Path, max_seq_len: int = 128, max_batch_size: int = 4, **kw) -> Llama:
        kw.setdefault("device", "cpu")
        kw.setdefault("dtype", "float32")
        return Llama.build(
            str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len, max_batch_size, **kw
        )

    return _build


def _need_compiler() -> None:
    """Skip where no C compiler can build the native kernels."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: the native kernels cannot be built")


@pytest.fixture
def kernel() -> native.NativeLinear:
    """The native CPU kernels (codellama.native), compiled for this machine."""
    _need_compiler()
    got = native.load()
    assert got is not None, f"the native kernels failed to build: {native.last_error()}"
    return got


AVX2_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")


@pytest.fixture(scope="session")
def avx2_kernel(tmp_path_factory: pytest.TempPathFactory) -> native.NativeLinear:
    """The kernels built for AVX2 + FMA without AVX-512 (what an AVX2-only CPU gets), on any
    x86 CPU that has those instructions: AVX-512 machines check this code path too."""
    _need_compiler()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if not {"avx2", "fma"} <= flags:
        pytest.skip("this CPU has no AVX2 and FMA: their code path cannot run here")
    return native.build(flags=AVX2_FLAGS, cache_dir=tmp_path_factory.mktemp("avx2"))


@pytest.fixture(scope="session")
def portable_kernel(tmp_path_factory: pytest.TempPathFactory) -> native.NativeLinear:
    """The portable build (no ``-march=native``: what a CPU without AVX2 gets), compiled once
    a session (~15 s) for the tests of its code paths."""
    _need_compiler()
    flags = tuple(f for f in native.FLAGS if f != "-march=native")
    return native.build(flags=flags, cache_dir=tmp_path_factory.mktemp("portable"))
