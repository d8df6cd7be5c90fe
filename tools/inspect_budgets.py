#!/usr/bin/env python
"""Show what each named budget runs: active dims per layer, parameters and deployment memory.
With ``--config`` (an elastic recipe), budgets with explicit choices in the recipe use them and the
others the homogeneous candidate combination closest to their target; with ``--checkpoint`` (an
elastic checkpoint), what its trained router runs at inference (argmax, no noise; or the most
probable architecture within ``router.target_tolerance`` of the target when the argmax misses).
One line per budget reads ``budget <name> params <integer>``.

    python tools/inspect_budgets.py --config examples/tiny/elastic.yaml
    python tools/inspect_budgets.py --checkpoint runs/quickstart/stage2
"""

from __future__ import annotations

import sys

from megatron_elastic import cli

MIB = 2**20


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    from megatron_elastic.elastic.budget import subnet_memory

    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="elastic recipe YAML (examples/*/elastic.yaml)")
    source.add_argument("--checkpoint", help="elastic checkpoint with a trained router")
    parser.add_argument(
        "--seq-length", type=int, default=8192, help="context for the memory estimate"
    )
    parser.add_argument("--batch-size", type=int, help="sequences for the memory estimate")
    parser.take_defaults(subnet_memory)
    args = parser.parse_args(argv)

    from megatron_elastic.checkpoint import load_extra, manifest_model, read_manifest
    from megatron_elastic.elastic.architectures import budget_specs
    from megatron_elastic.elastic.budget import (
        subnet_active_param_count,
        subnet_param_count,
        target_param_count,
    )
    from megatron_elastic.elastic.config import load_elastic_recipe
    from megatron_elastic.model import count_parameters
    from megatron_elastic.model.param_count import count_active_parameters
    from megatron_elastic.router import router_from_state

    if args.config:
        model, elastic = load_elastic_recipe(args.config)
        specs = budget_specs(model, elastic)
    else:
        model = manifest_model(read_manifest(args.checkpoint))
        router = router_from_state(model, load_extra(args.checkpoint))
        elastic = router.elastic_config
        specs = {}
        fixed = dict(budget_specs(model, elastic)) if router.config.fixed else {}
        for name in elastic.budgets:
            spec = router.decide(name, 0, None, deterministic=True).spec
            raw = router.target_ratio(name, raw_argmax=True)
            source = "router"
            if name in fixed:  # router.fixed: no learned choice
                source = f"fixed, {fixed[name][1]}"
            elif raw != router.cost_ratio(spec, name):
                source += f"; its plain argmax, {raw - 1:+.2%} off target, was calibrated"
            specs[name] = (spec, source)
    parent = count_parameters(model)
    parent_active = count_active_parameters(model)
    print(
        f"parent: {parent:,} params; mode {elastic.mode}; "
        f"{'heterogeneous' if elastic.heterogeneous else 'homogeneous'}"
    )
    for name, (spec, source) in specs.items():
        params = subnet_param_count(model, spec)
        mem = subnet_memory(model, spec, seq_length=args.seq_length, batch_size=args.batch_size)
        target = target_param_count(model, elastic.budgets[name])
        print()
        print(
            f"== budget {name}: target {elastic.budgets[name]:.0%} = {target:,} params "
            f"({source} choices); hidden {spec.hidden}, depth {spec.depth}/{len(spec.layers)}"
        )
        print(f"  {'layer':>5} {'kind':<10} {'width':>7} {'head_dim':>8} {'active':>7}")
        for i, c in enumerate(spec.layers):
            unit = {"attention": "heads", "mamba": "heads", "mlp": "neurons"}.get(c.kind)
            if c.kind == "moe":  # width: routed experts kept
                shared = c.size("moe_shared_ffn")
                unit = f"experts x {c.size('moe_expert_ffn')} neurons, shared {shared}"
            hd = str(c.head_dim) if c.kind == "mamba" else "-"
            print(
                f"  {i:>5} {c.kind:<10} {c.width:>7} {hd:>8} {'yes' if c.active else 'skip':>7}"
                f"  ({unit})"
            )
        print(
            f"  params {params:,} ({params / parent:.2%} of parent, {params / target - 1:+.2%} vs "
            f"target)"
        )
        if "moe" in model.layer_kinds():  # what a token touches: top-k of the kept experts
            active = subnet_active_param_count(model, spec)
            print(f"  active params {active:,} ({active / parent_active:.2%} of the parent's)")
        print(
            f"  memory @ seq {args.seq_length} x batch {args.batch_size}, bf16: weights "
            f"{mem.weights / MIB:,.1f} MiB, KV cache {mem.kv_cache / MIB:,.1f} MiB, Mamba state "
            f"{mem.mamba_state / MIB:,.1f} MiB, total {mem.total / MIB:,.1f} MiB"
        )
        print(f"budget {name} params {params}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
