"""Packaging: the source distribution builds the wheel and carries the repository; the wheel
carries what the package needs at run time, and nothing else."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO

# What the sdist must hold beyond the package: setup.py reads requirements.txt; the suite
# reads its fixtures, worker script and docs; users run the examples and download.sh.
NEEDED_BESIDE_THE_PACKAGE = [
    "README.md",
    "requirements.txt",
    "setup.py",
    "pyproject.toml",
    "download.sh",
    "example_completion.py",
    "example_infilling.py",
    "example_instructions.py",
    "docs/errors.md",
    "tests/__init__.py",
    "tests/conftest.py",
    "tests/mp_worker.py",
    "benchmarks/bench_generate.py",
]


def _backend(call: str, source: Path, out: Path) -> str:
    """Run setuptools' PEP 517 hook ``call`` in ``source`` (as pip would, without fetching a
    build environment); returns the file it wrote in ``out``."""
    code = f"from setuptools import build_meta; print(build_meta.{call}({str(out)!r}))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The sdist unpacked (its folder, and its file names relative to that folder)."""
    out = tmp_path_factory.mktemp("sdist")
    source = tmp_path_factory.mktemp("tree") / "codellama"

    # Built from a copy, so that the egg-info it writes stays out of the checkout.
    def ignore(folder: str, names: list[str]) -> set[str]:  # git, caches, local folders
        return {n for n in names if n.endswith(".egg-info") or n.startswith(".") and n != ".ci"}

    shutil.copytree(REPO, source, ignore=ignore)
    name = _backend("build_sdist", source, out)
    with tarfile.open(out / name) as tar:
        tar.extractall(out, filter="data")
    root = out / name.removesuffix(".tar.gz")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return root, files


def test_the_sdist_holds_what_the_build_the_tests_and_the_users_need(sdist):
    _, files = sdist
    missing = [f for f in NEEDED_BESIDE_THE_PACKAGE if f not in files]
    assert not missing, f"the sdist lacks {missing}: list them in MANIFEST.in"
    assert "codellama/native_linear.c" in files and "llama/py.typed" in files


def test_the_sdist_holds_every_file_git_tracks(sdist):
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: nothing to compare the sdist with")
    _, files = sdist
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    missing = [f for f in tracked if f not in files and f != ".gitignore"]
    assert not missing, f"the sdist lacks tracked files {missing[:10]}: see MANIFEST.in"
    assert not [f for f in files if "__pycache__" in f or f.endswith((".pyc", ".so"))]


def test_a_wheel_built_from_the_sdist_holds_the_runtime_files_only(sdist, tmp_path):
    root, _ = sdist
    with zipfile.ZipFile(tmp_path / _backend("build_wheel", root, tmp_path)) as whl:
        names = whl.namelist()
    packaged = {n for n in names if ".dist-info/" not in n}
    want = {str(p.relative_to(REPO)) for p in (REPO / "codellama").glob("*.py")}
    want |= {str(p.relative_to(REPO)) for p in (REPO / "llama").glob("*.py")}
    want |= {"codellama/native_linear.c", "codellama/py.typed", "llama/py.typed"}
    assert packaged == want
