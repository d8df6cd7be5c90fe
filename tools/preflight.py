#!/usr/bin/env python
"""Can this machine run this recipe? One line per check, before a job starts.

    python tools/preflight.py --recipe examples/nemotron_nano_12b/stage1_8k.yaml
    python tools/preflight.py --recipe examples/tiny/stage1.yaml train.seq_length=128

Checks CUDA torch (device, capability), NCCL, Transformer Engine (optional: the local spec
replaces it), mamba-ssm's Triton kernels (required), the causal-conv1d route (optional:
"fused (causal-conv1d)" or the fallback), the memory planner's peak per GPU against the
device's memory less a headroom, and free disk at the save directory against the checkpoints
the stage keeps. Exit status: 0 when every required check passes, 2 otherwise (each failing
line says what to install or change). Without CUDA the GPU checks are reported as not checked
and the recipe's cpu-fp32 plan is checked against this host's memory (a 12B recipe fails:
"run it on GPUs"). The trainer runs the same checks at start on CUDA.
"""

from __future__ import annotations

import sys

from megatron_elastic import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    from megatron_elastic.preflight import PreflightConfig, report

    parser = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2]
    )
    parser.add_argument("--recipe", required=True, help="a stage recipe (examples/*/stage*.yaml)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides section.key=value")
    parser.add_argument(
        "--world-size",
        type=int,
        help="ranks of the job [TP x PP x CP: data parallel 1, the most memory per rank]",
    )
    parser.add_argument(
        "--headroom",
        type=float,
        help="fraction of device memory kept free beyond the planned peak [%(default).2f]",
    )
    parser.take_defaults(PreflightConfig)
    args = parser.parse_args(argv)

    from megatron_elastic.training.recipe import load_train_recipe

    recipe = load_train_recipe(args.recipe, args.overrides)
    return report(recipe, PreflightConfig(world_size=args.world_size, headroom=args.headroom))


if __name__ == "__main__":
    sys.exit(main())
