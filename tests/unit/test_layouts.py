"""The fused layouts of :mod:`megatron_elastic.model.layouts` are megatron's: the sizes and segment
order of megatron-core's own ``MambaMixer`` / ``SelfAttention`` parameters at TP 1 and TP 2
(built in one process on a stand-in TP group), megatron's own q/k/v split and TP sharding, and a
permutation of heads and channels applied through the layout leaves megatron's forward unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
from group_view import GroupView
from megatron.core.transformer.spec_utils import build_module
from torch import nn

from megatron_elastic import platform
from megatron_elastic.config import ParallelConfig
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.model.builder import hybrid_stack_spec, transformer_config
from megatron_elastic.model.layouts import AttentionLayout, MambaLayout, Packed
from megatron_elastic.model.sharding import shard_tensor


def _megatron_modules(cfg, pgs, tp: int, rank: int):
    """megatron-core's Mamba mixer and self-attention of ``cfg`` as TP rank ``rank`` of ``tp``."""
    platform.apply()
    fake = copy.copy(pgs)
    fake.tp = GroupView(tp, rank)
    parallel = ParallelConfig(tensor_parallel_size=tp)
    config = transformer_config(cfg, parallel)
    sub = hybrid_stack_spec(cfg, parallel).submodules
    mixer = build_module(
        sub.mamba_layer.submodules.mixer,
        config=config,
        d_model=cfg.hidden_size,
        layer_number=1,
        pg_collection=fake,
    )
    attention = build_module(
        sub.attention_layer.submodules.self_attention,
        config=config,
        layer_number=2,
        pg_collection=fake,
    )
    return mixer, attention


def _layouts(cfg) -> tuple[MambaLayout, AttentionLayout]:
    mamba = MambaLayout(
        cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.mamba_num_groups, cfg.mamba_state_dim
    )
    groups = cfg.num_query_groups
    return mamba, AttentionLayout(groups, cfg.num_attention_heads // groups, cfg.head_dim)


@pytest.mark.parametrize("tp", [1, 2])
def test_layouts_are_megatrons_shards(pgs, small_config, tp) -> None:
    full_mamba, full_attention = _layouts(small_config)
    mamba, attention = full_mamba.shard(tp), full_attention.shard(tp)
    for rank in range(tp):
        mixer, attn = _megatron_modules(small_config, pgs, tp, rank)
        # in_proj and conv: the sizes and the per-segment TP packing megatron states
        assert mixer.in_proj.weight.size(0) == mamba.in_proj.size == mamba.in_proj_size
        assert mixer.in_proj.weight.partition_sizes == mamba.in_proj.sizes
        assert mamba.in_proj.names == ("z", "x", "B", "C", "dt")
        assert mixer.conv1d_weight.size(0) == mamba.conv.size == mamba.conv_size
        assert mixer.conv1d_weight.partition_sizes == mamba.conv.sizes
        assert mixer.dt_bias.numel() == mamba.num_heads
        assert mixer.d_inner_local_tp == mamba.inner
        for packed, param in (
            (full_mamba.in_proj, mixer.in_proj.weight),
            (full_mamba.conv, mixer.conv1d_bias),
        ):  # megatron's packing (sharding.py reads its partition_sizes) == shard_rows
            full = torch.arange(packed.size, dtype=torch.float32)
            expected = full[full_mamba.shard_rows(packed, rank, tp)]
            assert torch.equal(shard_tensor(full, param, rank, tp), expected)
        # linear_qkv: whole groups per rank, split into q/k/v as megatron splits it
        qkv_rows = attn.linear_qkv.weight.size(0)
        assert (
            qkv_rows
            == attention.size
            == AttentionLayout.from_rows(qkv_rows, attention.num_groups, attention.head_dim).size
        )
        assert attention.size == full_attention.size // tp
        heads, groups, d = attention.num_heads, attention.num_groups, attention.head_dim
        assert qkv_rows == AttentionLayout.head_rows(heads, groups) * d  # the counting form
        mixed = torch.randn(3, 2, qkv_rows)
        attn.linear_qkv = _Returns(mixed)
        q, k, v = attn.get_query_key_value_tensors(None)
        ours = attention.split_heads(mixed)
        assert all(torch.equal(a, b) for a, b in zip((q, k, v), ours, strict=True))


class _Returns(nn.Module):
    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, _x):
        return self.out, None


def test_split_rows_and_fuse_round_trip(small_config) -> None:
    mamba, attention = _layouts(small_config)
    w = torch.randn(mamba.in_proj.size, 5)
    parts = mamba.in_proj.split(w, dim=0)
    assert [p.size(0) for p in parts] == mamba.in_proj.sizes
    assert torch.equal(torch.cat(parts), w)
    assert torch.equal(w[mamba.in_proj.rows()], w)
    z, xbc, dt = mamba.split_in_proj(w, dim=0)
    assert torch.equal(torch.cat(mamba.split_conv(xbc, dim=0)), torch.cat(parts[1:4]))
    assert torch.equal(mamba.in_proj.segment(w, "dt", dim=0), dt)
    assert torch.equal(mamba.in_proj.segment(w, "z", dim=0), z)
    # rows() keeps the listed entries of a segment, whole segments otherwise
    heads = mamba.heads([[1], [0]])
    inner = mamba.channels(heads, [0, 2])
    kept = w[mamba.in_proj_rows(heads, [0, 2])]
    z, x, B, C, dt = mamba.in_proj.split(w, dim=0)
    assert torch.equal(kept, torch.cat([z[inner], x[inner], B, C, dt[heads]]))
    conv = torch.randn(mamba.conv.size, 3)
    cx, cB, cC = mamba.split_conv(conv, dim=0)
    assert torch.equal(conv[mamba.conv_rows(heads, [0, 2])], torch.cat([cx[inner], cB, cC]))
    # attention: split, fuse and rows agree
    qkv = torch.randn(attention.size, 7)
    q, k, v = attention.split(qkv)
    assert q.size(0) == attention.num_heads * attention.head_dim
    assert torch.equal(attention.fuse(q, k, v), qkv)
    orders = [[1, 0], [0, 1]]
    q2, k2, v2 = attention.split(qkv[attention.rows(orders)])
    d = attention.head_dim
    q_heads = q.view(attention.num_heads, d, -1)
    assert torch.equal(q2, q_heads[attention.heads(orders)].flatten(0, 1))
    assert torch.equal(k2, k) and torch.equal(v2, v)
    assert attention.proj_cols(orders) == [h * d + c for h in [1, 0, 2, 3] for c in range(d)]
    with pytest.raises(ValueError, match="not a whole number of query groups"):
        AttentionLayout.from_rows(attention.size + 1, attention.num_groups, d)
    assert Packed((("a", 2), ("b", 3))).rows(b=[2, 0]) == [0, 1, 4, 2]


@torch.no_grad()
def test_invariant_layout_permutation_keeps_megatrons_function(pgs, small_config) -> None:
    """Heads permuted within their groups (and Mamba head channels) through ``rows(...)``: the
    megatron modules compute the same function."""
    torch.manual_seed(0)
    model = build_hybrid_model(small_config, pgs)
    mamba, attention = _layouts(small_config)
    mixer = model.decoder.layers[0].mixer
    attn = model.decoder.layers[2].self_attention
    for p in (*mixer.parameters(), *attn.parameters()):  # norms and D off their init of 1.0
        p.add_(0.1 * torch.randn_like(p))
    hidden = torch.randn(16, 2, small_config.hidden_size)
    before = mixer(hidden)[0], attn(hidden, None)[0]

    heads = mamba.heads([[1, 0], [1, 0]])
    channels = list(torch.randperm(mamba.head_dim).tolist())
    inner = mamba.channels(heads, channels)
    mixer.in_proj.weight.copy_(mixer.in_proj.weight[mamba.in_proj_rows(heads, channels)])
    for p in (mixer.conv1d_weight, mixer.conv1d_bias):
        p.copy_(p[mamba.conv_rows(heads, channels)])
    for p in (mixer.dt_bias, mixer.A_log, mixer.D):
        p.copy_(p[heads])
    mixer.norm.weight.copy_(mixer.norm.weight[inner])
    mixer.out_proj.weight.copy_(mixer.out_proj.weight[:, inner])

    orders = [[1, 0], [1, 0]]
    attn.linear_qkv.weight.copy_(attn.linear_qkv.weight[attention.rows(orders)])
    attn.linear_proj.weight.copy_(attn.linear_proj.weight[:, attention.proj_cols(orders)])
    after = mixer(hidden)[0], attn(hidden, None)[0]
    for b, a in zip(before, after, strict=True):
        # only the order of sums changes: measured worst rel 5.5e-7 (Mamba), 2.8e-7 (attention)
        # over 6 seeds; the bound is ~2.7x that
        assert (a - b).abs().max() / b.abs().max() < 1.5e-6
