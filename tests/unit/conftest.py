"""Single-process megatron setup shared by the unit tests (gloo, TP=1, PP=1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_elastic.config import ParallelConfig, load_model_config
from megatron_elastic.parallel import init_process_groups

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="session")
def pgs():
    return init_process_groups(ParallelConfig(), seed=1234)


@pytest.fixture(scope="session")
def tiny_config():
    return load_model_config(ROOT / "examples" / "tiny" / "model.yaml")


@pytest.fixture(scope="session")
def small_config():
    return load_model_config(ROOT / "tests" / "fixtures" / "hybrid_small.yaml")
