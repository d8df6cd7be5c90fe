#!/usr/bin/env python
"""Does the router's inference architecture meet its budget? Budget loss alone, model frozen.

For two parents (the tiny recipe, and the 20M-parameter parent of ``bench_train_step.py``), both
targets (params, memory at 2048 tokens) and homogeneous/heterogeneous routers, trains a router
on the budget loss alone (``--steps``, the paper's Gumbel-softmax annealing) for several seeds
and prints, per budget, the cost over target of

* the plain argmax of the logits (the paper's inference rule), and
* the architecture deployed (``RouterConfig.target_tolerance``: the argmax, or the most probable
  architecture within the tolerance when the argmax misses it),

plus 0.6, a fraction between trained budgets. The last line is ``worst |cost/target - 1|:
deployed X, plain argmax Y``.

    python benchmarks/bench_router_targets.py --seeds 4
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_elastic_step import parent_config  # noqa: E402
from bench_train_step import elastic_config  # noqa: E402

from megatron_elastic.elastic.config import load_elastic_recipe  # noqa: E402
from megatron_elastic.router import ElasticRouter, RouterConfig, fit_to_budgets  # noqa: E402


def parents():
    tiny, elastic = load_elastic_recipe(ROOT / "examples" / "tiny" / "elastic.yaml")
    return {"tiny 4.9M": (tiny, elastic), "wide 20M": (parent_config(), elastic_config())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="router steps (= anneal steps)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    worst_deployed = worst_argmax = 0.0
    print(
        f"router steps {args.steps}, lr {args.lr}, seeds 0..{args.seeds - 1}; per budget: "
        "plain argmax -> deployed, cost over target (worst seed shown per budget)"
    )
    print(f"{'parent':10} {'target':7} {'layers':13} {'budgets (argmax -> deployed)':60}")
    for label, (model, elastic) in parents().items():
        for target in ("params", "memory"):
            for heterogeneous in (False, True):
                worst: dict[str, tuple[float, float]] = {}
                for seed in range(args.seeds):
                    config = RouterConfig(
                        anneal_steps=args.steps,
                        lr=args.lr,
                        warmup_steps=10,
                        seed=seed,
                        budget_target=target,
                        memory_seq_length=2048,
                    )
                    het = dataclasses.replace(elastic, heterogeneous=heterogeneous)
                    router = ElasticRouter(model, het, config)
                    fit_to_budgets(router, args.steps)
                    for budget in (*router.encoding.names, 0.6):
                        pair = (
                            router.target_ratio(budget, raw_argmax=True),
                            router.target_ratio(budget),
                        )
                        key = str(budget)
                        if key not in worst or abs(pair[0] - 1) > abs(worst[key][0] - 1):
                            worst[key] = pair
                        worst_argmax = max(worst_argmax, abs(pair[0] - 1))
                        worst_deployed = max(worst_deployed, abs(pair[1] - 1))
                cells = "  ".join(f"{b}: {a:.3f}->{d:.3f}" for b, (a, d) in worst.items())
                kind = "heterogeneous" if heterogeneous else "homogeneous"
                print(f"{label:10} {target:7} {kind:13} {cells}", flush=True)
    print(f"({time.time() - start:.0f} s)")
    print(
        f"worst |cost/target - 1|: deployed {worst_deployed:.3f}, plain argmax {worst_argmax:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
