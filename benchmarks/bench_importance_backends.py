#!/usr/bin/env python
"""Native vs ModelOpt (Minitron) importance on the same model and data: per-axis rank correlation.

GPU only: ModelOpt's Megatron plugin needs Transformer Engine (exits with code 2 and the reason
elsewhere). The parent is the tiny recipe (``examples/tiny/model.yaml``), initialised with
``--seed`` and then trained for ``--train-steps`` AdamW steps on the seeded Markov token stream
(``megatron_elastic.data.MarkovTokenSource``), so activations carry learned structure, not only
initialisation noise. Both backends then score the same ``--num-batches`` calibration batches
drawn from that stream: the native backend with its iterative normalised-MSE layer ranking,
ModelOpt's ``mcore_minitron`` with its one-shot cosine depth scores.

Prints one row per axis: mean Spearman's rho and Kendall's tau over the axis's orders (per layer,
per group for heads), the worst order's rho, and how many orders; ``--output`` also writes both
rankings and the table as JSON. Last line: ``hidden spearman: <float>``.

    python benchmarks/bench_importance_backends.py --train-steps 200 --output runs/backends.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-config", default=str(ROOT / "examples" / "tiny" / "model.yaml"))
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--num-batches", type=int, default=8, help="calibration batches")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--output", default=None, help="JSON file for rankings and table")
    args = parser.parse_args(argv)

    from megatron_elastic.importance.modelopt_backend import (
        modelopt_available,
        run_minitron_importance,
    )

    reason = modelopt_available()
    if reason is not None:
        print(f"bench_importance_backends needs ModelOpt on a GPU: {reason}", file=sys.stderr)
        return 2

    from megatron_elastic.config import ParallelConfig, load_model_config
    from megatron_elastic.data import MarkovTokenSource
    from megatron_elastic.elastic import ElasticConfig, build_elastic_model
    from megatron_elastic.importance.estimate import estimate_importance
    from megatron_elastic.importance.rank_correlation import ranking_agreement
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups
    from megatron_elastic.training.lm_step import position_ids_like

    cfg = load_model_config(args.model_config)
    pgs = init_process_groups(ParallelConfig(), seed=args.seed)
    model = build_elastic_model(cfg, ElasticConfig(budgets={"full": 1.0}), pgs)
    source = MarkovTokenSource(cfg.vocab_size, seed=args.seed)
    device = torch.device("cuda", torch.cuda.current_device())

    def sample() -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in source.sample(args.batch_size, args.seq_length).items()}

    model.set_subnet(None)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for _ in range(args.train_steps):
        batch = sample()
        tokens = batch["tokens"]
        loss = model(tokens, position_ids_like(tokens), None, labels=batch["labels"]).float()
        loss = loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    del optimizer
    if losses:
        print(
            f"trained {len(losses)} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
            f"(chain entropy {source.entropy:.3f})"
        )
    model.eval()
    batches = [sample() for _ in range(args.num_batches)]

    start = time.time()
    native = estimate_importance(model, batches, pgs, rank_layers=True)
    native_s = time.time() - start
    start = time.time()
    modelopt = run_minitron_importance(cfg, model, batches, pgs)
    modelopt_s = time.time() - start
    agreement = ranking_agreement(native, modelopt)

    print(
        f"\nnative {native_s:.1f}s, modelopt {modelopt_s:.1f}s; "
        f"{args.num_batches} x {args.batch_size} x {args.seq_length} calibration tokens"
    )
    print("| axis | orders | spearman | kendall | min spearman |")
    print("|---|---:|---:|---:|---:|")
    for axis, a in agreement.items():
        print(
            f"| {axis} | {a.num_orders} | {a.spearman:.3f} | {a.kendall:.3f} | "
            f"{a.min_spearman:.3f} |"
        )
    print(f"layers, most important first: native {native.layers}, modelopt {modelopt.layers}")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "args": vars(args),
            "train_losses": losses,
            "agreement": {k: dataclasses.asdict(v) for k, v in agreement.items()},
            "native": native.to_json(),
            "modelopt": modelopt.to_json(),
        }
        out.write_text(json.dumps(report, indent=1))
    print(f"hidden spearman: {agreement['hidden'].spearman:.3f}")
    destroy_process_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())
