"""Shared fixtures: tiny HF LLaMA checkpoints made at test time (nothing downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import fixtures


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or multi-node tests (still run in CI)")


@pytest.fixture(scope="session")
def scratch(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scratch")
    os.environ["TMPDIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """name -> HF checkpoint dir for each tiny variant (see fixtures.TINY_VARIANTS)."""
    root = tmp_path_factory.mktemp("hf")
    return {name: fixtures.make_tiny_hf(root / name, **spec) for name, spec in fixtures.TINY_VARIANTS.items()}
