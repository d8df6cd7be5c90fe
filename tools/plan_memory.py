#!/usr/bin/env python
"""Per-GPU memory of a training recipe, by category and pipeline stage, before a job is submitted.

    python tools/plan_memory.py --recipe examples/nemotron_nano_12b/stage2_49k.yaml
    python tools/plan_memory.py --recipe RECIPE.yaml parallel.sequence_parallel=false

Prints, for the busiest rank of every pipeline stage: student weights, the fp32 gradient buffer,
optimizer state (sharded over data parallelism with the distributed optimizer; routed experts
split over ``parallel.expert_model_parallel_size`` and their state over expert-DP = DP x CP / EP),
the frozen teacher, the router, the stored activations of 1F1B's in-flight micro-batches per layer
kind (with/without recompute, SP, CP; MoE layers: ``planning/moe.py``), the working sets of
one layer's backward and of the teacher's forward, and the logits + KD temporaries on the last
stage; the last line is ``peak GiB per GPU: X``. Overrides ``section.key=value`` are applied as
by the trainer. The formulas are in ``megatron_elastic/planning/memory.py`` and measured by
``benchmarks/bench_memory.py``.
"""

from __future__ import annotations

import sys

from megatron_elastic import cli
from megatron_elastic.planning import PROFILES


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2]
    )
    parser.add_argument("--recipe", required=True, help="a stage recipe (examples/*/stage*.yaml)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides section.key=value")
    parser.add_argument(
        "--world-size",
        type=int,
        default=128,
        help="ranks (GPUs) of the job; data parallelism is world / (TP x PP x CP), expert "
        "parallelism is carved out of DP x CP [128: the stage recipes' 16 nodes x 8 GPUs]",
    )
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default=None,
        help="numerics and kernels [gpu-bf16, or cpu-fp32 for train.precision: fp32]",
    )
    args = parser.parse_args(argv)

    from megatron_elastic.planning import (
        format_plan,
        plan_config_from_recipe,
        plan_memory,
    )
    from megatron_elastic.training.recipe import load_train_recipe

    recipe = load_train_recipe(args.recipe, args.overrides)
    cfg = plan_config_from_recipe(recipe, world_size=args.world_size, profile=args.profile)
    print(format_plan(plan_memory(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
