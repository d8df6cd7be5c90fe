"""GPU-only checks (skipped without CUDA): the CUDA Mamba path (mamba-ssm Triton kernels) computes
what the CPU torch path computes, on the same weights and inputs."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_triton_mixer_matches_cpu_scan(pgs, small_config) -> None:
    from megatron_elastic.model import build_hybrid_model

    model = build_hybrid_model(small_config, pgs)
    mixer = model.decoder.layers[0].mixer
    hidden = torch.randn(37, 2, small_config.hidden_size, device="cuda")
    out_gpu, _ = mixer(hidden)
    cpu_mixer = copy.deepcopy(mixer).cpu()
    out_cpu, _ = cpu_mixer._ssm_training(cpu_mixer.in_proj(hidden.cpu())[0]), None
    out_cpu, _ = cpu_mixer.out_proj(out_cpu)
    assert (out_gpu.float().cpu() - out_cpu).abs().max().item() <= 1e-3
