"""Planning a run before it is submitted: per-GPU memory by category and pipeline stage."""

from megatron_elastic.planning.memory import (
    PROFILES,
    LayerShape,
    MemoryPlan,
    MemoryPlanConfig,
    Profile,
    StagePlan,
    format_plan,
    layer_activation_terms,
    plan_config_from_recipe,
    plan_memory,
)

__all__ = [
    "PROFILES",
    "LayerShape",
    "MemoryPlan",
    "MemoryPlanConfig",
    "Profile",
    "StagePlan",
    "format_plan",
    "layer_activation_terms",
    "plan_config_from_recipe",
    "plan_memory",
]
