"""Validation of :class:`~megatron_elastic.config.ModelConfig`'s mixture-of-experts fields.

The fields are megatron-core's ``TransformerConfig`` names (``num_moe_experts``,
``moe_router_topk``, ``moe_ffn_hidden_size``, ...), passed through unchanged by
:func:`megatron_elastic.model.builder.transformer_config`. Checked here, in one place, so that
every option megatron would reject, or that its router would silently ignore, fails as a one-line
``ValueError`` naming the field and the fix before anything is built.

Nemotron 3 Nano's MoE (transformers' ``NemotronHTopkRouter`` / ``NemotronHMoE``): sigmoid scores
in fp32, a per-expert score-correction bias added for the choice only, group-limited top-k,
the top-k weights renormalised (``norm_topk_prob``) and scaled (``routed_scaling_factor``),
squared-ReLU experts and one always-on shared expert. In megatron terms:
``moe_router_score_function="sigmoid"``, ``moe_router_enable_expert_bias=True``,
``moe_router_num_groups`` / ``moe_router_group_topk``, ``moe_router_topk_scaling_factor``,
``moe_shared_expert_intermediate_size``; megatron's sigmoid router always renormalises its top-k
(``k > 1``), so ``norm_topk_prob=False`` has no counterpart and no field.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LOAD_BALANCING_TYPES", "SCORE_FUNCTIONS", "check_moe"]

SCORE_FUNCTIONS = ("softmax", "sigmoid")
"""megatron's router score functions we support (``sqrtsoftplus`` is not a NemotronH router)."""
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
"""megatron's auxiliary load-balancing losses (``none``: no auxiliary loss; the expert bias can
still balance). ``sinkhorn`` and ``quantile_balancing`` are not supported."""

_MOE_FIELDS = (
    "num_moe_experts",
    "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size",
    "moe_router_num_groups",
    "moe_router_group_topk",
    "moe_z_loss_coeff",
    "moe_router_topk_scaling_factor",
)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _fail(field: str, message: str) -> None:
    raise ValueError(f"ModelConfig.{field}={message}")


def check_moe(cfg: Any) -> None:
    """``ValueError`` for MoE fields of ``cfg`` (a ``ModelConfig``) megatron cannot run as given."""
    if "E" not in cfg.hybrid_pattern:
        given = [f for f in _MOE_FIELDS if getattr(cfg, f) is not None]
        if given:
            _fail(
                given[0],
                f"{getattr(cfg, given[0])!r} but hybrid_pattern {cfg.hybrid_pattern!r} has no "
                "'E' (mixture-of-experts) layer; add 'E' layers or remove the MoE fields",
            )
        return
    for name in ("num_moe_experts", "moe_ffn_hidden_size"):
        if not _positive_int(getattr(cfg, name)):
            _fail(
                name,
                f"{getattr(cfg, name)!r}: hybrid_pattern has 'E' (mixture-of-experts) layers, "
                "which need a positive integer here",
            )
    experts, k = cfg.num_moe_experts, cfg.moe_router_topk
    if not _positive_int(k) or k > experts:
        _fail("moe_router_topk", f"{k!r} must be an integer in [1, num_moe_experts={experts}]")
    shared = cfg.moe_shared_expert_intermediate_size
    if shared is not None and not _positive_int(shared):
        _fail(
            "moe_shared_expert_intermediate_size",
            f"{shared!r} must be a positive integer (or null: no shared expert)",
        )
    _check_router(cfg, experts, k)


def _check_router(cfg: Any, experts: int, k: int) -> None:
    score = cfg.moe_router_score_function
    if score not in SCORE_FUNCTIONS:
        _fail("moe_router_score_function", f"{score!r}; choose one of {SCORE_FUNCTIONS}")
    if not isinstance(cfg.moe_router_pre_softmax, bool) or (
        cfg.moe_router_pre_softmax and score != "softmax"
    ):
        _fail(
            "moe_router_pre_softmax",
            f"{cfg.moe_router_pre_softmax!r} applies to moe_router_score_function=softmax only "
            f"(it is {score!r}); set it to false",
        )
    if score == "softmax" and k == 1 and not cfg.moe_router_pre_softmax:
        _fail(
            "moe_router_pre_softmax",
            "False with moe_router_topk=1 and a softmax router: a softmax over one logit has no "
            "gradient; set moe_router_pre_softmax=true",
        )
    if cfg.moe_router_enable_expert_bias not in (True, False):
        _fail(
            "moe_router_enable_expert_bias",
            f"{cfg.moe_router_enable_expert_bias!r}: use true/false",
        )
    if cfg.moe_router_enable_expert_bias and score != "sigmoid":
        _fail(
            "moe_router_enable_expert_bias",
            f"True with moe_router_score_function={score!r}: megatron adds the expert bias on "
            "the sigmoid path only; use the sigmoid router or disable the bias",
        )
    if not cfg.moe_router_bias_update_rate >= 0:
        _fail("moe_router_bias_update_rate", f"{cfg.moe_router_bias_update_rate!r} must be >= 0")
    scale = cfg.moe_router_topk_scaling_factor
    if scale is not None and not (isinstance(scale, int | float) and scale > 0):
        _fail("moe_router_topk_scaling_factor", f"{scale!r} must be > 0 (or null: no scaling)")
    lb = cfg.moe_router_load_balancing_type
    if lb not in LOAD_BALANCING_TYPES:
        _fail("moe_router_load_balancing_type", f"{lb!r}; choose one of {LOAD_BALANCING_TYPES}")
    coeff = cfg.moe_aux_loss_coeff
    if not isinstance(coeff, int | float) or isinstance(coeff, bool) or coeff < 0:
        _fail("moe_aux_loss_coeff", f"{coeff!r} must be a number >= 0")
    if coeff > 0 and lb == "none":
        _fail(
            "moe_aux_loss_coeff",
            f"{coeff} with moe_router_load_balancing_type=none; choose a loss type (aux_loss, "
            "seq_aux_loss, global_aux_loss) or set the coefficient to 0",
        )
    z = cfg.moe_z_loss_coeff
    if z is not None and (not isinstance(z, int | float) or isinstance(z, bool) or z < 0):
        _fail("moe_z_loss_coeff", f"{z!r} must be a number >= 0 (or null: no z-loss)")
    _check_groups(cfg, experts, k)


def _check_groups(cfg: Any, experts: int, k: int) -> None:
    groups, group_topk = cfg.moe_router_num_groups, cfg.moe_router_group_topk
    if groups is None and group_topk is None:
        return
    if not _positive_int(groups) or experts % groups:
        _fail(
            "moe_router_num_groups",
            f"{groups!r} must be a positive divisor of num_moe_experts={experts} when "
            "moe_router_group_topk is set (group-limited routing)",
        )
    if not _positive_int(group_topk) or group_topk > groups:
        _fail(
            "moe_router_group_topk",
            f"{group_topk!r} must be an integer in [1, moe_router_num_groups={groups}]",
        )
    within = group_topk * (experts // groups)
    if not group_topk <= k <= within:
        _fail(
            "moe_router_topk",
            f"{k} with {group_topk} of {groups} expert groups: megatron scores a group by its top "
            f"moe_router_topk // moe_router_group_topk experts and picks the top-k among the "
            f"{within} experts of the chosen groups, so top-k must lie in [{group_topk}, {within}]",
        )
