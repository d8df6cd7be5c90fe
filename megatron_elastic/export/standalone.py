"""A budget as a standalone megatron-core model: the sub-network's dims as a plain
:class:`ModelConfig` and its physically sliced weights under that model's names.

Homogeneous sub-networks only (megatron's ``TransformerConfig`` has one size per axis); a
heterogeneous layout needs a per-layer model (the Hugging Face remote-code export).
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


def _one_size(spec: SubnetSpec, kind: str, attr: str) -> int | None:
    sizes = {getattr(c, attr) for c in spec.layers if c.active and c.kind == kind}
    if len(sizes) > 1:
        raise ValueError(
            f"the sub-network is heterogeneous ({kind} layers use {attr} {sorted(sizes)}); a "
            "standalone megatron model has one size per axis: export it in Hugging Face format "
            "(remote code) instead"
        )
    return sizes.pop() if sizes else None


def standalone_config(parent: ModelConfig, spec: SubnetSpec) -> ModelConfig:
    """The plain model the (homogeneous) ``spec`` is: its active layers and sizes."""
    spec.validate(parent)
    pattern = "".join(_SYMBOL[c.kind] for c in spec.layers if c.active)
    heads = _one_size(spec, "attention", "width")
    mamba_heads = _one_size(spec, "mamba", "width")
    mamba_head_dim = _one_size(spec, "mamba", "head_dim")
    ffn = _one_size(spec, "mlp", "width")
    return dataclasses.replace(
        parent,
        hybrid_pattern=pattern,
        hidden_size=spec.hidden,
        # Sizes of a kind with no active layer do not matter; keep the parent's (valid) ones.
        num_attention_heads=heads or parent.num_attention_heads,
        mamba_num_heads=mamba_heads or parent.mamba_num_heads,
        mamba_head_dim=mamba_head_dim or parent.mamba_head_dim,
        ffn_hidden_size=ffn or parent.ffn_hidden_size,
    )


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
