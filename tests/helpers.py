"""Helpers shared by the tests."""
import pytest


def import_torch_reference():
    """torch and diffusers, or a clean skip naming what is missing (they are test-only dependencies)."""
    torch = pytest.importorskip("torch", reason="torch is a test-only dependency: pip install -e '.[dev]'")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test-only dependency: pip install -e '.[dev]'")
    return torch, diffusers
