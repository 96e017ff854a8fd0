"""Helpers shared by the tests."""
from pathlib import Path

import pytest

# The real MNIST subset (4,000 train + 1,000 test digits, IDX format) kept beside the repository, never inside it.
MNIST5K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist5k"


def import_torch_reference():
    """torch and diffusers, or a clean skip naming what is missing (they are test-only dependencies)."""
    torch = pytest.importorskip("torch", reason="torch is a test-only dependency: pip install -e '.[dev]'")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test-only dependency: pip install -e '.[dev]'")
    return torch, diffusers
