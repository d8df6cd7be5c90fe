"""Analytic budgets of a sub-network: exact parameter count and memory, and differentiable
expected versions of both for the router's budget loss.

One formula serves both: the per-layer counts of :mod:`megatron_elastic.model.param_count` use
only ``+`` and ``*``, so they take Python ints (exact) or tensors of expected sizes
(probability-weighted, differentiable).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_elastic.config import ModelConfig
from megatron_elastic.elastic.subnet import SubnetSpec
from megatron_elastic.model.layouts import MambaLayout
from megatron_elastic.model.param_count import (
    attention_layer_params,
    embedding_params,
    mamba_layer_params,
    mlp_layer_params,
)

__all__ = [
    "MemoryEstimate",
    "subnet_param_count",
    "subnet_memory",
    "expected_param_count",
    "expected_memory_bytes",
    "target_param_count",
]

Number = int | float | torch.Tensor


def _layer_params(model: ModelConfig, kind: str, hidden: Number, width: Number, head_dim: Number):
    if kind == "mamba":
        return mamba_layer_params(
            hidden,
            width,
            head_dim,
            model.mamba_num_groups,
            model.mamba_state_dim,
            model.mamba_conv_kernel,
        )
    if kind == "attention":
        return attention_layer_params(hidden, width, model.num_query_groups, model.head_dim)
    return mlp_layer_params(hidden, width)


def expected_param_count(
    model: ModelConfig,
    hidden: Number,
    widths: Sequence[Number],
    head_dims: Sequence[Number],
    keep: Sequence[Number],
) -> Number:
    """Parameters of a sub-network given (expected) sizes per layer: ``widths`` are heads /
    Mamba heads / neurons, ``head_dims`` Mamba head dims (ignored for other kinds), ``keep`` the
    probability each layer runs. Treats the axes as independent (E[h*w] = E[h]*E[w])."""
    total = embedding_params(hidden, model.vocab_size)
    for kind, w, d, k in zip(model.layer_kinds(), widths, head_dims, keep, strict=True):
        total = total + k * _layer_params(model, kind, hidden, w, d)
    return total


def subnet_param_count(model: ModelConfig, spec: SubnetSpec) -> int:
    """Exact parameters of ``spec`` (== the physically sliced model's)."""
    return int(
        expected_param_count(
            model,
            spec.hidden,
            [c.width for c in spec.layers],
            [c.head_dim for c in spec.layers],
            [int(c.active) for c in spec.layers],
        )
    )


def target_param_count(model: ModelConfig, fraction: float) -> int:
    """The parameter count a budget fraction of the parent stands for."""
    from megatron_elastic.model.param_count import count_parameters

    return round(fraction * count_parameters(model))


@dataclass(frozen=True)
class MemoryEstimate:
    """Deployment memory of one sub-network, in bytes."""

    weights: int
    kv_cache: int
    mamba_state: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.mamba_state


def _layer_state_bytes(
    model: ModelConfig,
    kind: str,
    width: Number,
    head_dim: Number,
    tokens: int,
    batch: int,
    state_bytes: int,
) -> Number:
    """Inference state of one layer: attention KV cache (key/value heads are not elastic) or
    Mamba conv + SSM state."""
    if kind == "attention":
        return 2 * model.num_query_groups * model.head_dim * tokens * batch * state_bytes
    if kind == "mamba":
        layout = MambaLayout(width, head_dim, model.mamba_num_groups, model.mamba_state_dim)
        conv = layout.conv_size * model.mamba_conv_kernel
        ssm = width * head_dim * model.mamba_state_dim
        return (conv + ssm) * batch * state_bytes
    return 0


def expected_memory_bytes(
    model: ModelConfig,
    hidden: Number,
    widths: Sequence[Number],
    head_dims: Sequence[Number],
    keep: Sequence[Number],
    *,
    seq_length: int,
    batch_size: int = 1,
    param_bytes: int = 2,
    state_bytes: int = 2,
) -> Number:
    """Weights + KV cache + Mamba state for (expected) sizes; differentiable in tensors."""
    total = param_bytes * expected_param_count(model, hidden, widths, head_dims, keep)
    for kind, w, d, k in zip(model.layer_kinds(), widths, head_dims, keep, strict=True):
        total = total + k * _layer_state_bytes(
            model, kind, w, d, seq_length, batch_size, state_bytes
        )
    return total


def subnet_memory(
    model: ModelConfig,
    spec: SubnetSpec,
    *,
    seq_length: int,
    batch_size: int = 1,
    param_bytes: int = 2,
    state_bytes: int = 2,
) -> MemoryEstimate:
    """Exact memory of ``spec`` for a batch of sequences (bf16 weights and caches by default)."""
    state = {"attention": 0, "mamba": 0}
    for c in spec.layers:
        if c.active and c.kind in state:
            state[c.kind] += _layer_state_bytes(
                model, c.kind, c.width, c.head_dim, seq_length, batch_size, state_bytes
            )
    return MemoryEstimate(
        weights=param_bytes * subnet_param_count(model, spec),
        kv_cache=int(state["attention"]),
        mamba_state=int(state["mamba"]),
    )
