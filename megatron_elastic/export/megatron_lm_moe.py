"""The mixture-of-experts part of a Megatron-LM / Megatron-Bridge checkpoint's configuration.

Megatron-LM generates its MoE command-line arguments from megatron-core's ``TransformerConfig``
(``ArgumentGroupFactory``), so an argument has the field's name, except ``num_experts`` for
``num_moe_experts``; ``--use-checkpoint-args`` (``load_args_from_checkpoint``) restores the
expert count and width, top-k, the shared expert's width, the score function, pre-softmax, the
expert bias, the top-k scaling factor and grouped GEMM from a checkpoint. It does not restore
group-limited routing (``moe_router_num_groups`` / ``moe_router_group_topk``), the router's
dtype or the balancing losses: they are written here too, and a group-limited model must be
launched with ``--moe-router-num-groups`` / ``--moe-router-group-topk`` as recorded.

``ModelConfig``'s ``moe_*`` fields carry megatron's names, so the mapping is one table
(:data:`MOE_ARGS`); values absent from a foreign checkpoint's ``args`` take megatron-core's
``TransformerConfig`` defaults, as Megatron-LM would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = ["MOE_ARGS", "MOE_RUNTIME", "moe_args", "moe_fields_from_args", "moe_run_config"]

MOE_ARGS: dict[str, str] = {
    "num_experts": "num_moe_experts",
    "moe_ffn_hidden_size": "moe_ffn_hidden_size",
    "moe_router_topk": "moe_router_topk",
    "moe_shared_expert_intermediate_size": "moe_shared_expert_intermediate_size",
    "moe_router_score_function": "moe_router_score_function",
    "moe_router_pre_softmax": "moe_router_pre_softmax",
    "moe_router_topk_scaling_factor": "moe_router_topk_scaling_factor",
    "moe_router_enable_expert_bias": "moe_router_enable_expert_bias",
    "moe_router_bias_update_rate": "moe_router_bias_update_rate",
    "moe_router_num_groups": "moe_router_num_groups",
    "moe_router_group_topk": "moe_router_group_topk",
    "moe_router_load_balancing_type": "moe_router_load_balancing_type",
    "moe_aux_loss_coeff": "moe_aux_loss_coeff",
    "moe_z_loss_coeff": "moe_z_loss_coeff",
}
"""Megatron-LM argument -> ``ModelConfig`` field (the ``TransformerConfig`` field too, except
``num_experts``)."""

MOE_RUNTIME: dict[str, Any] = {
    "moe_router_dtype": "fp32",
    "moe_token_dispatcher_type": "allgather",
    "moe_grouped_gemm": True,
    "moe_single_grouped_weight": False,
}
"""How our MoE layers run, as Megatron-LM arguments: the router in fp32 (as Nemotron 3's and
:func:`~megatron_elastic.model.builder.moe_fields`), the all-gather dispatcher, and grouped-GEMM
experts with one weight per expert (``TEGroupedMLP``, what the TE hybrid spec builds; the
checkpoint layout is the same as ``SequentialMLP``'s)."""

_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "moe_shared_expert_gate": (False, "a gated shared expert (NemotronH's has no gate)"),
    "moe_latent_size": (None, "latent MoE projections"),
    "moe_single_grouped_weight": (False, "one grouped weight for all experts"),
    "moe_use_legacy_grouped_gemm": (False, "the legacy GroupedMLP weight layout"),
}
"""Megatron-LM arguments our MoE layer does not build other than at these values."""


def _megatron_defaults() -> dict[str, Any]:
    from megatron.core.transformer.transformer_config import TransformerConfig

    return {
        f.name: f.default
        for f in dataclasses.fields(TransformerConfig)
        if f.default is not dataclasses.MISSING
    }


def moe_args(cfg: Any) -> dict[str, Any]:
    """The MoE arguments of ``cfg`` (a ``ModelConfig``) under Megatron-LM's names; none for a
    model without ``E`` layers but ``num_experts=None``."""
    if "E" not in cfg.hybrid_pattern:
        return {"num_experts": None}
    return {arg: getattr(cfg, field) for arg, field in MOE_ARGS.items()} | MOE_RUNTIME


def moe_run_config(cfg: Any) -> dict[str, Any]:
    """The MoE fields of Megatron-Bridge's ``run_config.yaml`` model section: megatron-core's
    ``TransformerConfig`` names (``HybridModelProvider`` is one)."""
    if "E" not in cfg.hybrid_pattern:
        return {}
    return {field: getattr(cfg, field) for field in MOE_ARGS.values()} | MOE_RUNTIME


def moe_fields_from_args(get: Callable[[str, Any], Any], where: str) -> dict[str, Any]:
    """``ModelConfig``'s MoE fields from a Megatron-LM ``args`` (read through ``get(name,
    default)``); megatron-core's defaults for what the args lack. Refuses, naming the argument,
    what our MoE layer does not build."""
    if get("num_experts", None) is None:
        return {}
    for name, (wanted, what) in _UNSUPPORTED.items():
        value = get(name, wanted)
        if value != wanted:
            raise ValueError(f"{where}: {name}={value!r}: megatron-elastic does not build {what}")
    defaults = _megatron_defaults()
    fields = {field: get(arg, defaults.get(field)) for arg, field in MOE_ARGS.items()}
    for field in ("moe_router_load_balancing_type", "moe_aux_loss_coeff"):
        if isinstance(fields[field], list) and len(fields[field]) == 1:
            fields[field] = fields[field][0]  # one loss given as a list, as Megatron-LM reads it
    return fields
