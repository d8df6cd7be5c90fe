"""The memory plan as a table: GiB per rank, one column per pipeline stage."""

from __future__ import annotations

from megatron_elastic.planning.memory import GIB, MemoryPlan, MemoryPlanConfig

__all__ = ["format_plan"]


def _recompute(cfg: MemoryPlanConfig) -> str:
    if not cfg.recompute:
        return "off"
    n = cfg.recompute_num_layers
    return "on" if n is None else f"first {n} layers per stage"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table (GiB per rank, one column per stage); last line ``peak GiB per GPU``."""
    cfg, p = plan.config, plan.config.parallel
    head = (
        f"memory plan ({cfg.profile}): seq {cfg.seq_length}, micro-batch {cfg.micro_batch_size}"
        f" x {cfg.num_micro_batches}, TP {p.tensor_parallel_size} PP "
        f"{p.pipeline_parallel_size} CP {p.context_parallel_size} DP {cfg.data_parallel_size}, "
        f"SP {'on' if p.sequence_parallel_active else 'off'}, recompute "
        f"{_recompute(cfg)}, distributed optimizer "
        f"{'on' if cfg.distributed_optimizer else 'off'}"
        + (f", EP {p.expert_model_parallel_size}" if "moe" in cfg.model.layer_kinds() else "")
    )
    names = [f"stage {s.stage}" for s in plan.stages]
    rows: list[tuple[str, list[float]]] = []
    first = plan.stages[0]
    for group in ("static", "activations", "transients"):
        keys: list[str] = []
        for s in plan.stages:
            keys += [k for k in getattr(s, group) if k not in keys]
        for key in keys:
            label = key if group != "activations" else f"activations: {key}"
            rows.append((label, [getattr(s, group).get(key, 0.0) / GIB for s in plan.stages]))
    rows.append(("peak", [s.peak / GIB for s in plan.stages]))
    width = max(len(r[0]) for r in rows) + 2
    lines = [head]
    lines.append(
        "layers per stage: "
        + ", ".join(
            f"stage {s.stage}: {s.layers['mamba']} M / {s.layers['attention']} * / "
            f"{s.layers['mlp']} -"
            + (f" / {s.layers['moe']} E" if s.layers.get("moe") else "")
            + f" ({s.in_flight} micro-batch(es) in flight)"
            for s in plan.stages
        )
    )
    lines.append(f"{'GiB per rank':<{width}}" + "".join(f"{n:>12}" for n in names))
    for label, values in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{v:>12.3f}" for v in values))
    del first
    lines.append(f"peak GiB per GPU: {plan.peak / GIB:.2f}")
    return "\n".join(lines)
