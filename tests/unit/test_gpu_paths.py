"""GPU-only checks (skipped without CUDA): the CUDA Mamba path (mamba-ssm's Triton kernels) computes
what the CPU torch path computes, on both conv routes of ``cuda_conv_route``, for the parent mixer
and for elastic slices.

``fused`` uses causal-conv1d's compiled functions when the package imports (NGC images ship it);
otherwise the torch test doubles of ``triton_emulation.py`` stand in for them, so mamba-ssm's fused
Triton kernels still run on the GPU. ``fallback`` needs no extension. The same cases run on CPU in
Triton's interpreter (``test_mamba_cuda_paths.py``); here they run the real GPU code generation.
"""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch
from triton_emulation import fused_conv_route

from megatron_elastic.model.mamba import mamba_ssm_cuda, mamba_ssm_torch

pytestmark = pytest.mark.gpu
GPU_TOL = 5e-3
"""Relative to each reference's max |value|: TF32 matmuls inside mamba-ssm's kernels."""


def _route(route: str):
    """The fused route with the real causal-conv1d when installed, else with its test doubles."""
    if route == "fused" and importlib.util.find_spec("causal_conv1d") is None:
        return fused_conv_route(installed=True)
    return contextlib.nullcontext([])


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float().cpu() - want.float()).abs().max().item() / want.abs().max().item()


@pytest.mark.parametrize("route", ["fused", "fallback"])
@pytest.mark.parametrize("heads,head_dim", [(8, 32), (4, 11)])
def test_invariant_triton_kernels_match_torch_scan(heads, head_dim, route) -> None:
    """Forward and backward of the whole mixer core (conv, scan, gate, group norm), fp32, against
    the torch path; (4, 11) has 108 conv channels, which the fused kernel refuses: it must take the
    fallback and still agree."""
    g = torch.Generator().manual_seed(0)
    b, length, groups, state, kernel, chunk = 2, 100, 2, 16, 4, 32
    inner = heads * head_dim
    inputs = {
        "zxbcdt": torch.randn(b, length, 2 * inner + 2 * groups * state + heads, generator=g),
        "conv_weight": torch.randn(inner + 2 * groups * state, kernel, generator=g) * 0.3,
        "conv_bias": torch.randn(inner + 2 * groups * state, generator=g) * 0.1,
        "dt_bias": torch.randn(heads, generator=g) * 0.5,
        "A_log": torch.rand(heads, generator=g).log1p(),
        "D": torch.randn(heads, generator=g),
        "norm_weight": torch.rand(inner, generator=g) + 0.5,
    }
    sizes = dict(
        head_dim=head_dim,
        num_groups=groups,
        state_dim=state,
        chunk_size=chunk,
        norm_group_size=inner // groups,
        norm_eps=1e-5,
    )
    dout = torch.randn(b, length, inner, generator=g)

    def run(fn, device, **extra):
        leaves = {k: v.to(device).requires_grad_() for k, v in inputs.items()}
        out = fn(**leaves, **sizes, **extra)
        (out * dout.to(device)).sum().backward()
        return out.detach(), {k: v.grad for k, v in leaves.items()}

    want, want_grads = run(mamba_ssm_torch, "cpu")
    with _route(route):
        got, got_grads = run(mamba_ssm_cuda, "cuda", route=route)
    # Triton's tl.dot runs fp32 inputs in TF32 on the GPU (10-bit mantissa): ~1e-3 relative.
    assert _rel(got, want) <= GPU_TOL
    for name, grad in want_grads.items():
        assert _rel(got_grads[name], grad) <= GPU_TOL, name


def test_invariant_elastic_slice_on_gpu_matches_mask(pgs, small_config) -> None:
    from megatron_elastic.elastic import ElasticConfig, SubnetSpec, build_elastic_model
    from megatron_elastic.training.lm_step import position_ids_like

    model = build_elastic_model(small_config, ElasticConfig(budgets={"a": 1.0}), pgs)
    spec = SubnetSpec.homogeneous(
        small_config, hidden=48, mamba_heads=2, mamba_head_dim=10, attention_heads=2, ffn=64
    )
    tokens = torch.randint(0, small_config.vocab_size, (2, 64), device="cuda")
    outs = {}
    for mode in ("slice", "mask"):
        model.set_subnet(spec, mode=mode)
        outs[mode] = model(tokens, position_ids_like(tokens), None).float()
    assert (outs["slice"] - outs["mask"]).abs().max().item() <= 2e-3
