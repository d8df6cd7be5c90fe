"""Names of our local hybrid spec and of megatron-core's Transformer-Engine hybrid spec
(``megatron.core.models.hybrid.hybrid_layer_specs.hybrid_stack_spec``, what Megatron-LM's
``pretrain_hybrid.py`` and Megatron-Bridge build by default), as declarative tables.

Two differences separate the specs' distributed checkpoints; everything else (Mamba
``in_proj`` segments, conv, ``A_log``/``D``/``dt_bias``, the gated norm, attention
``linear_qkv``/``linear_proj``, MLP ``linear_fc1``/``linear_fc2``, embedding, output layer) has
the same keys and sharding:

- **Fused norms.** TE fuses each layer's pre-norm into the following linear
  (``TELayerNormColumnParallelLinear``: ``<linear>.layer_norm_weight``); our local spec keeps a
  separate norm module. :data:`FUSED_NORMS` renames one into the other and is what our spec's
  ``sharded_state_dict_keys_map`` uses, so every checkpoint we write already carries TE names.
- **Extra state.** Every TE module stores ``_extra_state`` (its FP8 metadata; an empty uint8
  tensor when FP8 was never used: ``TransformerEngineBaseModule.get_extra_state`` and
  ``ops.BasicOperation.get_extra_state`` in transformer_engine). megatron's local linears
  store ``None`` there and our norms nothing. :data:`TE_MODULES` lists the modules that are TE
  modules in the TE spec; :func:`te_extra_states` gives their TE values.

Mixture-of-experts (``E``) layers have no fused norm (tokens are permuted between the norm and
the experts, so TE's spec keeps a ``TENorm`` ``pre_mlp_layernorm``, named as ours). Their
experts have one checkpoint key per linear with the expert axis prepended
(``mlp.experts.experts.linear_fc1.weight``, one shard per expert), the layout megatron's
``TEGroupedMLP`` (grouped GEMM, the TE spec's) and ``SequentialMLP`` (ours) share; TE's grouped
linears also store one ``_extra_state`` shard per expert under the same key, where megatron's
local linears store ``None``.

``TEDotProductAttention`` stores nothing in a checkpoint unless its softmax offset is learnable
(megatron's wrapper drops its extra state), so core attention appears in neither table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

__all__ = [
    "FUSED_NORMS",
    "GLOBAL_TE_MODULES",
    "MOE_SHARED_TE_MODULES",
    "TE_MODULES",
    "te_empty_extra_state",
    "te_extra_state_keys",
]

FUSED_NORMS: Mapping[str, Mapping[str, str]] = {
    "mamba": {"norm.": "mixer.in_proj.layer_norm_"},
    "attention": {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
    "mlp": {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
    "moe": {},
}
"""Per layer kind: local-spec name prefix -> TE-spec name prefix (within a layer)."""

TE_MODULES: Mapping[str, tuple[str, ...]] = {
    "mamba": ("mixer.in_proj", "mixer.out_proj"),
    "attention": ("self_attention.linear_qkv", "self_attention.linear_proj"),
    "mlp": ("mlp.linear_fc1", "mlp.linear_fc2"),
    "moe": (
        "pre_mlp_layernorm",
        "mlp.experts.experts.linear_fc1",
        "mlp.experts.experts.linear_fc2",
    ),
}
"""Per layer kind: the modules (within a layer) that are Transformer-Engine modules in the TE
spec, each with an ``_extra_state`` entry (under its checkpoint key: the experts' is one key
for all experts)."""

MOE_SHARED_TE_MODULES: tuple[str, ...] = (
    "mlp.shared_experts.linear_fc1",
    "mlp.shared_experts.linear_fc2",
)
"""The TE modules of an ``E`` layer's shared expert (``TEColumnParallelLinear`` /
``TERowParallelLinear``, no fused norm), present when the model has one."""

GLOBAL_TE_MODULES: tuple[str, ...] = ("decoder.final_norm",)
"""TE modules outside the layers: ``HybridStack`` builds its final norm with ``TENorm``."""


def te_empty_extra_state() -> torch.Tensor:
    """What a TE module stores as ``_extra_state`` when no FP8 state exists."""
    return torch.empty(0, dtype=torch.uint8)


def te_extra_state_keys(
    layer_kinds: Iterable[str],
    *,
    post_process: bool = True,
    first_layer: int = 0,
    moe_shared_expert: bool = False,
) -> list[str]:
    """Checkpoint keys of every TE module's ``_extra_state`` for a stack of ``layer_kinds``
    (global layer numbering from ``first_layer``); ``post_process``: the stack has the final
    norm; ``moe_shared_expert``: its ``E`` layers have a shared expert."""
    shared = MOE_SHARED_TE_MODULES if moe_shared_expert else ()
    modules = {kind: TE_MODULES[kind] + (shared if kind == "moe" else ()) for kind in TE_MODULES}
    keys = [
        f"decoder.layers.{first_layer + i}.{module}._extra_state"
        for i, kind in enumerate(layer_kinds)
        for module in modules[kind]
    ]
    if post_process:
        keys += [f"{module}._extra_state" for module in GLOBAL_TE_MODULES]
    return keys
