"""Elastic versions of megatron-core's norm, MLP and self-attention.

Each keeps its parent class's parameters and names. The model sets ``module.active`` before a
forward pass (``None`` = run the parent class's own forward, unchanged); it is never a hook and
never global. In ``slice`` mode weights are cut to this rank's active rows/columns; in ``mask``
mode the full computation runs and inactive channels are zeroed. Optional router weights
(``ActiveWidth.weight``) multiply the active units' activations, so gradients reach the router.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel.layers import linear_with_grad_accumulation_and_async_allreduce
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP

from megatron_elastic.elastic.subnet import AttentionIndices, Index, MambaIndices, take
from megatron_elastic.model.attention import causal_attention
from megatron_elastic.model.layouts import AttentionLayout
from megatron_elastic.model.norm import RMSNorm, rms_norm

__all__ = [
    "ActiveWidth",
    "ElasticRMSNorm",
    "ElasticMLP",
    "ElasticSelfAttention",
    "column_parallel",
    "row_parallel",
    "unit_mask",
]


@dataclass(frozen=True)
class ActiveWidth:
    """What one elastic module runs in the current forward pass (set by the model)."""

    mode: str
    """``slice`` or ``mask``."""
    hidden: int
    """Active embedding width."""
    indices: AttentionIndices | MambaIndices | Index | None = None
    """This rank's active rows/columns (``None`` for norms)."""
    weight: torch.Tensor | None = None
    """Router weights of this rank's active units (heads, channels or neurons), or a scalar."""


def column_parallel(x: torch.Tensor, weight: torch.Tensor, linear) -> torch.Tensor:
    """``x @ weight.T`` for (a slice of) the weight shard of the column-parallel ``linear``, with
    its TP group and its sequence parallelism: under SP ``x`` holds this rank's tokens and is
    all-gathered (its gradient reduce-scattered), otherwise it is replicated across TP and its
    gradient all-reduced. The one place SP enters the elastic layers' column-parallel inputs."""
    tp_group, sp = linear.tp_group, linear.sequence_parallel
    return linear_with_grad_accumulation_and_async_allreduce(
        x,
        weight,
        None,
        gradient_accumulation_fusion=False,
        allreduce_dgrad=tp_group.size() > 1 and not sp,
        sequence_parallel=sp,
        tp_group=tp_group,
    )


def row_parallel(x: torch.Tensor, weight: torch.Tensor, linear) -> torch.Tensor:
    """``x @ weight.T`` for (a slice of) the weight shard of the row-parallel ``linear``, summed
    over TP ranks: all-reduced, or reduce-scattered to this rank's tokens under SP."""
    tp_group = linear.tp_group
    out = linear_with_grad_accumulation_and_async_allreduce(
        x,
        weight,
        None,
        gradient_accumulation_fusion=False,
        allreduce_dgrad=False,
        sequence_parallel=False,
        tp_group=tp_group,
    )
    if linear.sequence_parallel:
        return reduce_scatter_to_sequence_parallel_region(out, group=tp_group)
    return reduce_from_tensor_model_parallel_region(out, group=tp_group)


def unit_mask(
    size: int, idx: Index, like: torch.Tensor, weight: torch.Tensor | None = None, unit: int = 1
) -> torch.Tensor:
    """Mask-mode multiplier of a ``size``-channel activation: zero outside ``idx``; at ``idx`` one,
    or the router weights of the active units (each repeated ``unit`` times). Autograd-safe."""
    count = (idx.stop - idx.start) if isinstance(idx, slice) else len(idx)
    values = apply_unit_weight(
        torch.ones(count, dtype=like.dtype, device=like.device), weight, unit
    )
    if isinstance(idx, slice):
        zeros = like.new_zeros
        return torch.cat([zeros(idx.start), values, zeros(size - idx.stop)])
    return like.new_zeros(size).index_copy(0, idx.to(like.device), values)


def hidden_mask(full: int, active: int, like: torch.Tensor) -> torch.Tensor:
    return unit_mask(full, slice(0, active), like)


def apply_unit_weight(x: torch.Tensor, weight: torch.Tensor | None, unit: int = 1) -> torch.Tensor:
    """Multiply the last dim of ``x`` (``units * unit`` channels) by per-unit weights."""
    if weight is None:
        return x
    if weight.dim() == 0:
        return x * weight
    return x * weight.to(x.dtype).repeat_interleave(unit)


class ElasticRMSNorm(RMSNorm):
    """RMSNorm over the active embedding channels only."""

    active: ActiveWidth | None = None

    def sliced(self, st: ActiveWidth) -> dict[str, torch.Tensor]:
        """This module's parameters cut to ``st`` (the slice-mode weights; also the export)."""
        return {"weight": self.weight[: st.hidden]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.active
        if st is None:
            return super().forward(x)
        h = st.hidden
        if st.mode == "slice":
            return rms_norm(x, self.sliced(st)["weight"], self.eps)
        x32 = x.float()
        ms = x32[..., :h].pow(2).mean(-1, keepdim=True)
        out = x32 * torch.rsqrt(ms + self.eps) * self.weight.float()
        return (out * hidden_mask(x.size(-1), h, out)).to(x.dtype)


class ElasticMLP(MLP):
    """Squared-ReLU MLP over active neurons (fc1 rows / fc2 columns) and active hidden."""

    active: ActiveWidth | None = None

    def sliced(self, st: ActiveWidth) -> dict[str, torch.Tensor]:
        """This module's parameters cut to ``st`` (the slice-mode weights; also the export)."""
        return {
            "linear_fc1.weight": take(self.linear_fc1.weight, 0, st.indices)[:, : st.hidden],
            "linear_fc2.weight": take(self.linear_fc2.weight, 1, st.indices)[: st.hidden],
        }

    def forward(self, hidden_states: torch.Tensor, per_token_scale=None, **kwargs):
        st = self.active
        if st is None:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        fc1, fc2 = self.linear_fc1, self.linear_fc2
        act = self.config.activation_func
        if st.mode == "slice":
            w = self.sliced(st)
            w1, w2 = w["linear_fc1.weight"], w["linear_fc2.weight"]
            inter = apply_unit_weight(act(column_parallel(hidden_states, w1, fc1)), st.weight)
            return row_parallel(inter, w2, fc2), None
        inter = act(column_parallel(hidden_states, fc1.weight, fc1))
        inter = inter * unit_mask(inter.size(-1), st.indices, inter, st.weight)
        out = row_parallel(inter, fc2.weight, fc2)
        return out * hidden_mask(out.size(-1), st.hidden, out), None


class ElasticSelfAttention(SelfAttention):
    """GQA self-attention over active query heads (a prefix within every query group); key/value
    heads all stay. Causal, no positional embedding (NemotronH); exact under context parallelism
    (:func:`~megatron_elastic.model.attention.causal_attention`)."""

    active: ActiveWidth | None = None

    def sliced(self, st: ActiveWidth) -> dict[str, torch.Tensor]:
        """This module's parameters cut to ``st`` (the slice-mode weights; also the export)."""
        idx: AttentionIndices = st.indices
        return {
            "linear_qkv.weight": take(self.linear_qkv.weight, 0, idx.qkv_rows)[:, : st.hidden],
            "linear_proj.weight": take(self.linear_proj.weight, 1, idx.proj_cols)[: st.hidden],
        }

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, *args, **kwargs):
        st = self.active
        if st is None:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        idx: AttentionIndices = st.indices
        d = self.hidden_size_per_attention_head
        groups = self.num_query_groups_per_partition
        if st.mode == "slice":
            w = self.sliced(st)
            w_qkv = w["linear_qkv.weight"]
            a = idx.heads_per_group
        else:
            w_qkv = self.linear_qkv.weight
            a = self.num_attention_heads_per_partition // groups
        qkv = column_parallel(hidden_states, w_qkv, self.linear_qkv)
        q, k, v = AttentionLayout(groups, a, d).split_heads(qkv)
        ctx = causal_attention(q, k, v, self.pg_collection.cp)
        if st.mode == "slice":
            ctx = apply_unit_weight(ctx, st.weight, d)
            return row_parallel(ctx, w["linear_proj.weight"], self.linear_proj), None
        ctx = ctx * unit_mask(ctx.size(-1), idx.proj_cols, ctx, st.weight, d)
        out = row_parallel(ctx, self.linear_proj.weight, self.linear_proj)
        return out * hidden_mask(out.size(-1), st.hidden, out), None
