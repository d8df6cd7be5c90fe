"""GPU-only checks (skipped without CUDA): the CUDA Mamba path (mamba-ssm's Triton kernels) computes
what the CPU torch path computes, for the parent mixer and for elastic slices."""

from __future__ import annotations

import pytest
import torch

from megatron_elastic.model.mamba import mamba_ssm_cuda, mamba_ssm_torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("heads,head_dim", [(8, 32), (4, 11)])
def test_invariant_triton_kernels_match_torch_scan(heads, head_dim) -> None:
    g = torch.Generator().manual_seed(0)
    b, length, groups, state, kernel, chunk = 2, 100, 2, 16, 4, 32
    inner = heads * head_dim
    zxbcdt = torch.randn(b, length, 2 * inner + 2 * groups * state + heads, generator=g)
    conv_w = torch.randn(inner + 2 * groups * state, kernel, generator=g) * 0.3
    conv_b = torch.randn(inner + 2 * groups * state, generator=g) * 0.1
    dt_bias = torch.randn(heads, generator=g) * 0.5
    A_log = torch.rand(heads, generator=g).log1p()
    D = torch.randn(heads, generator=g)
    norm_w = torch.rand(inner, generator=g) + 0.5
    args = (zxbcdt, conv_w, conv_b, dt_bias, A_log, D, norm_w)
    ref = mamba_ssm_torch(
        *args,
        head_dim=head_dim,
        num_groups=groups,
        state_dim=state,
        chunk_size=chunk,
        norm_group_size=inner // groups,
        norm_eps=1e-5,
    )
    out = mamba_ssm_cuda(
        *(t.cuda() for t in args),
        head_dim=head_dim,
        num_groups=groups,
        state_dim=state,
        chunk_size=chunk,
        norm_group_size=inner // groups,
        norm_eps=1e-5,
    )
    assert (out.cpu() - ref).abs().max().item() <= 2e-3


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
