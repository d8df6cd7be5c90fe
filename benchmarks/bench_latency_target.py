#!/usr/bin/env python
"""Budgets by latency, end to end on this device: profile the per-layer table, train the router
on the latency target alone, and time the chosen sub-networks' real cached decoding.

1. ``profile_latency`` measures the recipe's table (as ``tools/profile_latency.py`` does).
2. A router with ``budget_target: latency`` and ``--budgets`` (fractions of the parent's decode
   time per token; default full / 90% / 80%) is trained on its budget loss alone (the model plays
   no part in it). A budget below the cost of the smallest sub-network the recipe's choices allow
   on this table is refused before training (``ElasticRouter.check_reachable``): on the 2-core
   CPU the tiny recipe's smallest sub-network decodes at 0.67-0.74 of the parent's time (per-step
   costs that do not shrink with width; the table moves between runs), so its parameter budget
   50% is no latency budget there.
3. For each budget the router's architecture is cut from a parent with random weights (the
   weights' values do not change the time) and its cached decode is timed at ``--context``
   tokens (fastest of ``--rounds`` x ``--repeats`` runs of ``--new-tokens`` steps, each round
   followed by a re-timing of the parent, whose fastest time over the run is the reference).

Printed per budget: the table's predicted seconds per token (and as a fraction of the table's
parent: where it stays above the budget's fraction, the table says the target cannot be met on
this device with the recipe's choices), the measured one, the target (fraction x the parent's
measured time; the parent is re-timed between budgets and its fastest time counts) and
measured / target. The last line is
``latency target: worst |measured/target - 1| = X``.

    python benchmarks/bench_latency_target.py --config examples/tiny/elastic.yaml --threads 1
    python benchmarks/bench_latency_target.py --budgets full=1.0,80%=0.8 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from megatron_elastic.config import ParallelConfig
from megatron_elastic.elastic import SubnetSpec, build_elastic_model, load_elastic_recipe
from megatron_elastic.elastic.latency import subnet_latency
from megatron_elastic.parallel import destroy_process_groups, init_process_groups
from megatron_elastic.router import ElasticRouter, RouterConfig, build_router_optimizer
from megatron_elastic.serving import InferenceState, build_serving_net, forward
from megatron_elastic.serving.profile import profile_latency


def decode_seconds(net, context: int, new: int, repeats: int) -> float:
    """Seconds per decode step with ``context`` tokens cached (fastest of ``repeats``)."""
    prompt = torch.randint(
        1, net.vocab_size, (1, context), generator=torch.Generator().manual_seed(0)
    )
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        state = InferenceState(net, 1, context + new)
        logits = forward(net, prompt, state, last_only=True)[:, -1]
        start = time.perf_counter()
        for _ in range(new):
            logits = forward(net, logits.argmax(-1)[:, None], state, last_only=True)[:, -1]
        best = min(best, (time.perf_counter() - start) / new)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="examples/tiny/elastic.yaml")
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per parent timing")
    parser.add_argument(
        "--rounds",
        type=int,
        default=6,
        help="per budget: timed runs, each followed by a re-timing of the parent",
    )
    parser.add_argument("--profile-repeats", type=int, default=30)
    parser.add_argument("--router-steps", type=int, default=400)
    parser.add_argument("--threads", type=int)
    parser.add_argument(
        "--budgets",
        default="full=1.0,90%=0.9,80%=0.8",
        help="name=fraction,... as fractions of the parent's decode time per token",
    )
    args = parser.parse_args()
    try:
        budgets = {n: float(f) for n, f in (item.split("=") for item in args.budgets.split(","))}
    except ValueError:
        parser.error(f"--budgets {args.budgets!r}: expected name=fraction,...")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, elastic = load_elastic_recipe(args.config)
    elastic = dataclasses.replace(elastic, budgets=budgets)
    table = profile_latency(model, elastic, context=args.context, repeats=args.profile_repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lut.json"
        path.write_text(json.dumps(table.to_json()))
        steps = args.router_steps
        config = RouterConfig(
            anneal_steps=steps,
            lr=1e-3,
            warmup_steps=10,
            budget_target="latency",
            latency_table=str(path),
        )
        router = ElasticRouter(model, elastic, config)
        try:
            router.check_reachable()
        except ValueError as exc:
            parser.error(f"{exc} (this device's table; choose --budgets above it)")
        optimizer, scheduler = build_router_optimizer(router, config)
        with torch.enable_grad():
            for step in range(steps):
                loss = sum(
                    router.budget_loss(router.decide(n, step, config.generator(step, i)))
                    for i, n in enumerate(router.encoding.names)
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
    pgs = init_process_groups(ParallelConfig())
    torch.manual_seed(0)
    parent = build_elastic_model(model, elastic, pgs).eval()
    full = SubnetSpec.full(model)
    parent_net = build_serving_net(parent, model, None)

    def time_parent() -> float:
        return decode_seconds(parent_net, args.context, args.new_tokens, args.repeats)

    parent_s = time_parent()
    parent_table = subnet_latency(model, table, full)
    rows = []
    for name, fraction in zip(router.encoding.names, router.encoding.fractions, strict=True):
        spec = router.decide(name, steps, None, deterministic=True).spec
        net = build_serving_net(parent, model, spec)
        measured = float("inf")
        for _ in range(args.rounds):  # interleaved with the parent's: the fastest of each counts
            measured = min(
                measured, decode_seconds(net, args.context, args.new_tokens, args.repeats)
            )
            parent_s = min(parent_s, time_parent())
        rows.append((name, fraction, subnet_latency(model, table, spec), measured))
    print(
        f"{table.device}; context {args.context}; parent decode {parent_s * 1e3:.3f} ms/token "
        f"measured, {parent_table * 1e3:.3f} ms/token by the table"
    )
    print(
        "\n| budget | fraction | table ms/token | table/parent by the table | measured ms/token "
        "| target ms/token | measured/target |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    worst = 0.0
    for name, fraction, predicted, measured in rows:
        target = fraction * parent_s
        worst = max(worst, abs(measured / target - 1))
        print(
            f"| {name} | {fraction:.2f} | {predicted * 1e3:.3f} | {predicted / parent_table:.3f} "
            f"| {measured * 1e3:.3f} | {target * 1e3:.3f} | {measured / target:.3f} |"
        )
    destroy_process_groups()
    print(f"latency target: worst |measured/target - 1| = {worst:.3f}")


if __name__ == "__main__":
    main()
