"""A budget as a standalone megatron-core model: the sub-network's dims as a plain
:class:`ModelConfig` and its physically sliced weights under that model's names.

A homogeneous sub-network becomes a config with one size per axis; a heterogeneous one keeps its
per-layer sizes in ``ModelConfig.layer_widths`` / ``layer_mamba_head_dims`` (built by
:class:`~megatron_elastic.model.specs.HeterogeneousHybridStack`, same parameter names).
"""

from __future__ import annotations

import dataclasses
import re

import torch

from megatron_elastic.config import LAYER_SYMBOLS, ModelConfig
from megatron_elastic.elastic.model import ElasticHybridModel
from megatron_elastic.elastic.subnet import SubnetSpec

__all__ = ["standalone_config", "standalone_state_dict"]

_SYMBOL = {kind: symbol for symbol, kind in LAYER_SYMBOLS.items()}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_WIDTH_FIELD = {
    "attention": "num_attention_heads",
    "mamba": "mamba_num_heads",
    "mlp": "ffn_hidden_size",
}


def standalone_config(parent: ModelConfig, spec: SubnetSpec) -> ModelConfig:
    """The plain model ``spec`` is: its active layers and sizes.

    A kind's global size is the largest width its active layers use (the parent's when it has
    none). When every active layer of a kind has that size (and every Mamba layer the same head
    dim), the config is homogeneous, as megatron's own; otherwise it also lists every layer's
    width and Mamba head dim (``layer_widths`` / ``layer_mamba_head_dims``).
    """
    spec.validate(parent)
    if parent.is_heterogeneous:
        raise ValueError("export slices a homogeneous parent; this parent has per-layer widths")
    active = [c for c in spec.layers if c.active]
    sizes = {}
    for kind, field in _WIDTH_FIELD.items():
        widths = [c.width for c in active if c.kind == kind]
        sizes[field] = max(widths, default=getattr(parent, field))
    head_dims = [c.head_dim for c in active if c.kind == "mamba"]
    sizes["mamba_head_dim"] = max(head_dims, default=parent.mamba_head_dim)
    dense = [c for c in active if c.kind in _WIDTH_FIELD]
    homogeneous = all(c.width == sizes[_WIDTH_FIELD[c.kind]] for c in dense) and all(
        d == sizes["mamba_head_dim"] for d in head_dims
    )
    moe = _moe_sizes([c for c in active if c.kind == "moe"], homogeneous)
    return dataclasses.replace(
        parent,
        hybrid_pattern="".join(_SYMBOL[c.kind] for c in active),
        hidden_size=spec.hidden,
        **sizes,
        **moe,
        layer_widths=None if homogeneous else tuple(c.width for c in active),
        layer_mamba_head_dims=None
        if homogeneous
        else tuple(c.head_dim if c.kind == "mamba" else 0 for c in active),
    )


def _moe_sizes(layers: list, homogeneous: bool) -> dict[str, int | None]:
    """The ``moe_*`` sizes of the active ``E`` layers, one value per axis: a plain megatron MoE
    model has one expert count, expert width and shared width for all its MoE layers."""
    if not layers:
        return {}
    per_axis = {
        axis: {c.size(axis) for c in layers}
        for axis in ("moe_experts", "moe_expert_ffn", "moe_shared_ffn")
    }
    if not homogeneous or any(len(v) > 1 for v in per_axis.values()):
        raise ValueError(
            "this budget's MoE layers (or its other layers) differ per layer; a plain megatron "
            "MoE model holds one size per axis: export a homogeneous MoE budget"
        )
    shared = per_axis["moe_shared_ffn"].pop()
    return {
        "num_moe_experts": per_axis["moe_experts"].pop(),
        "moe_ffn_hidden_size": per_axis["moe_expert_ffn"].pop(),
        "moe_shared_expert_intermediate_size": shared or None,
    }


@torch.no_grad()
def standalone_state_dict(model: ElasticHybridModel, spec: SubnetSpec) -> dict[str, torch.Tensor]:
    """The sliced weights of ``spec`` with layers renumbered to the standalone model's stack
    (TP=1, PP=1 model; load into ``build_hybrid_model(standalone_config(...))``)."""
    if model.pg_collection.tp.size() != 1 or model.pg_collection.pp.size() != 1:
        raise ValueError("export runs on an unsplit model (tensor and pipeline parallel size 1)")
    new_index = {}
    for j, c in enumerate(spec.layers):
        if c.active:
            new_index[j] = len(new_index)
    out = {}
    for name, tensor in model.sliced_state_dict(spec).items():
        match = _LAYER.match(name)
        if match:
            name = f"decoder.layers.{new_index[int(match.group(1))]}.{name[match.end() :]}"
        out[name] = tensor.contiguous()
    return out
