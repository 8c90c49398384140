"""Where codellama writes its own files: never the current folder by accident."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from codellama import paths
from codellama.demo import demo_dir


def test_codellama_cache_is_the_cache_folder_when_set(monkeypatch, tmp_path):
    monkeypatch.setenv("CODELLAMA_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert paths.cache_dir() == tmp_path / "c"
    assert demo_dir() == tmp_path / "c" / "demo"


def test_xdg_cache_home_is_used_when_codellama_cache_is_not(monkeypatch, tmp_path):
    monkeypatch.delenv("CODELLAMA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert paths.cache_dir() == tmp_path / "x" / "codellama"


def test_empty_variables_mean_the_home_cache_not_the_current_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("CODELLAMA_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.cache_dir() == tmp_path / ".cache" / "codellama"
    assert demo_dir().is_absolute() and demo_dir() == Path(tmp_path, ".cache", "codellama", "demo")


def test_a_process_without_a_home_caches_in_the_temporary_folder(monkeypatch, tmp_path):
    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    for var in ("CODELLAMA_CACHE", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert paths.cache_dir() == tmp_path / f"codellama-{os.getuid()}"
