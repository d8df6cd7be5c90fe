"""Planning a run before it is submitted: per-GPU memory by category and pipeline stage."""

from megatron_elastic.planning.from_recipe import plan_config_from_recipe
from megatron_elastic.planning.memory import (
    PROFILES,
    LayerShape,
    MemoryPlan,
    MemoryPlanConfig,
    Profile,
    StagePlan,
    kd_loss_bytes,
    layer_activation_terms,
    plan_memory,
)
from megatron_elastic.planning.report import format_plan

__all__ = [
    "PROFILES",
    "LayerShape",
    "MemoryPlan",
    "MemoryPlanConfig",
    "Profile",
    "StagePlan",
    "format_plan",
    "kd_loss_bytes",
    "layer_activation_terms",
    "plan_config_from_recipe",
    "plan_memory",
]
