"""``train.deterministic`` on a GPU: cuBLAS needs its fixed workspace set before the first matmul
(without it, torch's deterministic mode only warns and the matmuls stay non-deterministic), and
megatron's ``deterministic_mode`` refuses TE attention unless TE may pick only deterministic
kernels. Checked here with CUDA reported available (nothing runs on a GPU)."""

from __future__ import annotations

import pytest
import torch

from megatron_elastic import platform
from megatron_elastic.training import determinism
from megatron_elastic.training.determinism import set_deterministic


@pytest.fixture
def restore_torch():
    yield
    torch.use_deterministic_algorithms(False)


def test_gpu_run_gets_the_deterministic_environment(monkeypatch, restore_torch) -> None:
    monkeypatch.setattr(platform, "cuda_available", lambda: True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("NVTE_ALLOW_NONDETERMINISTIC_ALGO", raising=False)
    assert set_deterministic(True)
    assert torch.are_deterministic_algorithms_enabled()
    assert determinism.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert determinism.os.environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] == "0"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a site's own (valid) value is kept
    set_deterministic(True)
    assert determinism.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_off_or_on_cpu_changes_nothing(monkeypatch, restore_torch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not set_deterministic(True)  # CPU: the kernels we use are deterministic already
    monkeypatch.setattr(platform, "cuda_available", lambda: True)
    assert not set_deterministic(False)  # the 12B recipes: throughput
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in determinism.os.environ


def test_models_built_afterwards_get_megatrons_deterministic_mode(
    monkeypatch, restore_torch, small_config
) -> None:
    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.model.builder import transformer_config

    monkeypatch.setattr(platform, "cuda_available", lambda: True)
    assert not transformer_config(small_config, ParallelConfig()).deterministic_mode
    set_deterministic(True)
    assert transformer_config(small_config, ParallelConfig()).deterministic_mode
