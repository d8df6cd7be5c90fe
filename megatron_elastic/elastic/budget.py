"""Analytic budgets of a sub-network: exact parameter count and memory, and differentiable
expected versions of both for the router's budget loss.

One formula serves both: each layer kind's count (:mod:`megatron_elastic.elastic.axes`, built on
:mod:`megatron_elastic.model.param_count`) uses only ``+`` and ``*``, so it takes Python ints
(exact) or tensors of expected sizes (probability-weighted, differentiable).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from megatron_elastic.config import ModelConfig
from megatron_elastic.elastic.axes import Number, layer_kind
from megatron_elastic.elastic.subnet import SubnetSpec
from megatron_elastic.model.param_count import embedding_params

__all__ = [
    "MemoryEstimate",
    "subnet_param_count",
    "subnet_memory",
    "expected_param_count",
    "expected_active_param_count",
    "subnet_active_param_count",
    "expected_memory_bytes",
    "target_param_count",
    "spec_keep",
    "spec_sizes",
]


Sizes = Sequence[Mapping[str, Number]]
"""Per layer, ``{axis: size}`` for the axes of its kind (exact ints or expected tensors)."""


def spec_sizes(spec: SubnetSpec) -> list[dict[str, int]]:
    """Per layer, its ``{axis: size}``."""
    return [dict(c.sizes) for c in spec.layers]


def spec_keep(spec: SubnetSpec) -> list[int]:
    return [int(c.active) for c in spec.layers]


def expected_param_count(
    model: ModelConfig, hidden: Number, sizes: Sizes, keep: Sequence[Number]
) -> Number:
    """Parameters of a sub-network given (expected) sizes per layer and ``keep``, the
    probability each layer runs. Treats the axes as independent (E[h*w] = E[h]*E[w])."""
    total = embedding_params(hidden, model.vocab_size)
    for kind, s, k in zip(model.layer_kinds(), sizes, keep, strict=True):
        total = total + k * layer_kind(kind).params(model, hidden, s)
    return total


def expected_active_param_count(
    model: ModelConfig, hidden: Number, sizes: Sizes, keep: Sequence[Number]
) -> Number:
    """What one token touches: :func:`expected_param_count` with each kind's
    :attr:`~megatron_elastic.elastic.axes.LayerKind.active_params` (a mixture of experts counts
    its top-k routed experts, not all of them)."""
    total = embedding_params(hidden, model.vocab_size)
    for kind, s, k in zip(model.layer_kinds(), sizes, keep, strict=True):
        lk = layer_kind(kind)
        total = total + k * (lk.active_params or lk.params)(model, hidden, s)
    return total


def subnet_active_param_count(model: ModelConfig, spec: SubnetSpec) -> int:
    """Exact parameters one token of ``spec`` touches."""
    return int(expected_active_param_count(model, spec.hidden, spec_sizes(spec), spec_keep(spec)))


def subnet_param_count(model: ModelConfig, spec: SubnetSpec) -> int:
    """Exact parameters of ``spec`` (== the physically sliced model's)."""
    return int(expected_param_count(model, spec.hidden, spec_sizes(spec), spec_keep(spec)))


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
    model: ModelConfig, kind: str, sizes: Mapping[str, Number], tokens: int, batch: int, nbytes: int
) -> Number:
    """Inference state of one layer (the kind's KV cache or recurrent state; 0 if stateless)."""
    state = layer_kind(kind).state_bytes
    return 0 if state is None else state(model, sizes, tokens, batch, nbytes)


def expected_memory_bytes(
    model: ModelConfig,
    hidden: Number,
    sizes: Sizes,
    keep: Sequence[Number],
    *,
    seq_length: int,
    batch_size: int = 1,
    param_bytes: int = 2,
    state_bytes: int = 2,
) -> Number:
    """Weights + KV cache + Mamba state for (expected) sizes; differentiable in tensors."""
    total = param_bytes * expected_param_count(model, hidden, sizes, keep)
    for kind, s, k in zip(model.layer_kinds(), sizes, keep, strict=True):
        total = total + k * _layer_state_bytes(model, kind, s, seq_length, batch_size, state_bytes)
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
    state = {f.name: 0 for f in fields(MemoryEstimate) if f.name != "weights"}
    for c in spec.layers:
        field_name = layer_kind(c.kind).state_field
        if c.active and field_name:
            state[field_name] += _layer_state_bytes(
                model, c.kind, dict(c.sizes), seq_length, batch_size, state_bytes
            )
    return MemoryEstimate(
        weights=param_bytes * subnet_param_count(model, spec),
        **{name: int(value) for name, value in state.items()},
    )
