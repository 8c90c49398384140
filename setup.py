"""Packaging for codellama."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def version() -> str:
    """The one version string, kept in codellama/__init__.py."""
    text = (HERE / "codellama" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)  # type: ignore[union-attr]


def requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="codellama",
    version=version(),
    description="Inference for Meta's Code Llama models, compatible with Meta's reference code",
    long_description=(HERE / "README.md").read_text(encoding="utf-8")
    if (HERE / "README.md").exists()
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["codellama", "codellama.*", "llama"]),
    package_data={"codellama": ["py.typed", "native_linear.c"], "llama": ["py.typed"]},
    install_requires=requirements(),
    extras_require={
        "hf": ["safetensors"],
        # Triton: its interpreter runs codellama.gpu_kernels on the CPU in the tests.
        "test": [
            "pytest",
            "hypothesis",
            "transformers",
            "safetensors",
            "psutil",
            'triton; platform_system == "Linux" and platform_machine == "x86_64"',
        ],
        "dev": ["ruff", "mypy"],
    },
)
