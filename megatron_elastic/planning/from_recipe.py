"""The memory planner's configuration of a training recipe."""

from __future__ import annotations

from megatron_elastic.planning.memory import LayerShape, MemoryPlanConfig

__all__ = ["plan_config_from_recipe"]


def _layer_shape(choice) -> LayerShape:
    """A :class:`LayerShape` of one layer of a sub-network (a ``LayerChoice``)."""
    if choice.kind != "moe":
        return LayerShape(choice.kind, choice.width, choice.head_dim, choice.active)
    return LayerShape(
        "moe",
        choice.width,
        active=choice.active,
        expert_ffn=choice.size("moe_expert_ffn"),
        shared_ffn=choice.size("moe_shared_ffn"),
    )


def plan_config_from_recipe(recipe, *, world_size: int, profile: str | None = None):
    """The :class:`MemoryPlanConfig` of a :class:`~megatron_elastic.training.recipe.TrainRecipe`
    run on ``world_size`` ranks (data parallelism: world / (TP x PP x CP); expert parallelism,
    ``parallel.expert_model_parallel_size``, is carved out of DP x CP). ``profile``: default
    ``cpu-fp32`` for ``train.precision: fp32``, else ``gpu-bf16``. The student is the largest
    budget's architecture (the router may pick any budget per micro-batch; the largest bounds
    memory)."""
    from megatron_elastic.elastic.architectures import budget_specs
    from megatron_elastic.router import ElasticRouter

    p, train = recipe.parallel, recipe.train
    if not isinstance(world_size, int) or world_size < 1 or world_size % p.model_parallel_size:
        raise ValueError(
            f"world size {world_size} is not a multiple of TP x PP x CP = {p.model_parallel_size}"
        )
    dp = world_size // p.model_parallel_size
    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of "
            f"micro_batch_size x data-parallel size = {train.micro_batch_size} x {dp}"
        )
    if profile is None:
        profile = "cpu-fp32" if train.precision == "fp32" else "gpu-bf16"
    if train.recompute_granularity == "selective":
        raise ValueError(
            "train.recompute_granularity=selective: the planner models full recomputation only "
            "(selective recomputes the core attention, which our fused/SDPA attention keeps "
            "small: plan it with recompute_granularity=null as an upper bound)"
        )
    block = train.recompute_method == "block"
    hidden, layers, router_params = None, None, 0
    if recipe.mode == "elastic":
        elastic = recipe.elastic
        if elastic.mode != "slice":
            raise ValueError(
                f"elastic.mode={elastic.mode!r}: the planner models slice mode only (mask mode "
                "computes at full width with extra mask products it does not itemise)"
            )
        name = max(elastic.budgets, key=elastic.budgets.get)
        spec, _ = budget_specs(recipe.model, elastic)[name]
        hidden = spec.hidden
        layers = tuple(_layer_shape(c) for c in spec.layers)
        router = ElasticRouter(recipe.model, elastic, recipe.router)
        router_params = sum(t.numel() for t in router.parameters())
    return MemoryPlanConfig(
        model=recipe.model,
        parallel=p,
        seq_length=train.seq_length,
        micro_batch_size=train.micro_batch_size,
        num_micro_batches=train.global_batch_size // per_step,
        data_parallel_size=dp,
        recompute=train.recompute_granularity == "full",
        recompute_num_layers=train.recompute_num_layers if block else None,
        distributed_optimizer=recipe.optim.use_distributed_optimizer,
        teacher=recipe.distill.teacher == "parent",
        profile=profile,
        student_hidden=hidden,
        student_layers=layers,
        router_params=router_params,
        loss_chunks=recipe.distill.num_loss_chunks,
        ce_trained=recipe.distill.ce_weight > 0,
    )
