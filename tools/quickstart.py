#!/usr/bin/env python
"""The main job on the tiny CPU recipe (``make quickstart``).

Today: build the tiny hybrid parent on megatron-core, pretrain it on a generated token stream (a
sparse Markov chain, so the reachable loss is known) printing the loss as it falls, save it, then
rank its components by importance and save the ranked parent. Later stages of the pipeline
(elastic training, export, evaluation) extend this same command.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from megatron_elastic.checkpoint import load_checkpoint, save_checkpoint
from megatron_elastic.config import ParallelConfig, load_model_config
from megatron_elastic.data import MarkovTokenSource, calibration_batches, write_indexed_dataset
from megatron_elastic.elastic import build_elastic_model, load_elastic_recipe
from megatron_elastic.importance.estimate import estimate_importance, rank_model
from megatron_elastic.model import build_hybrid_model, count_parameters
from megatron_elastic.parallel import destroy_process_groups, init_process_groups
from megatron_elastic.training import forward_backward
from megatron_elastic.training.optim import OptimConfig, build_optimizer, wrap_ddp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="examples/tiny/model.yaml", help="model recipe YAML")
    parser.add_argument(
        "--elastic-config",
        default="examples/tiny/elastic.yaml",
        help="elastic recipe (for importance: FFN nesting blocks)",
    )
    parser.add_argument("--output", default="runs/quickstart", help="directory for results")
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2")

    cfg = load_model_config(args.config)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    pgs = init_process_groups(ParallelConfig(), seed=args.seed)
    model = build_hybrid_model(cfg, pgs)
    optim = OptimConfig(
        lr=args.lr,
        min_lr=args.lr / 10,
        warmup_steps=min(20, args.steps // 10),
        total_steps=args.steps,
    )
    ddp = wrap_ddp(model, pgs, optim)
    optimizer, scheduler = build_optimizer(ddp, optim)
    data = MarkovTokenSource(cfg.vocab_size, branching=4, seed=args.seed)
    print(
        f"[quickstart] tiny parent: {count_parameters(cfg):,} params, pattern "
        f"{cfg.hybrid_pattern}; target loss ~{data.entropy:.2f} (untrained "
        f"~{math.log(cfg.vocab_size):.2f})",
        flush=True,
    )

    history, start = [], time.time()
    for step in range(1, args.steps + 1):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = forward_backward(
            ddp,
            [data.sample(args.batch_size, args.seq_length)],
            pgs,
            num_micro_batches=1,
            seq_length=args.seq_length,
            micro_batch_size=args.batch_size,
        )
        if not math.isfinite(loss.item()):
            print(f"[quickstart] loss became {loss.item()} at step {step}; stopping", flush=True)
            return 1
        optimizer.step()
        scheduler.step(increment=1)
        history.append(loss.item())
        if step % args.log_every == 0 or step == 1:
            rate = step * args.batch_size * args.seq_length / (time.time() - start)
            print(
                f"[quickstart] step {step:>4}/{args.steps}  loss {loss.item():.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {rate:,.0f} tok/s",
                flush=True,
            )

    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    result = {
        "params": count_parameters(cfg),
        "steps": args.steps,
        "loss_first10": first,
        "loss_last10": last,
        "target_loss": data.entropy,
        "seconds": time.time() - start,
    }
    (out / "pretrain.json").write_text(json.dumps(result, indent=2))
    print(f"[quickstart] loss {first:.3f} -> {last:.3f}; results in {out / 'pretrain.json'}")
    if last >= first:
        return 1
    save_checkpoint(out / "parent", model, cfg, kind="parent", metadata=result)
    print(f"[quickstart] parent checkpoint: {out / 'parent'}", flush=True)

    # Importance: rank the parent on calibration data from the same stream, permute it.
    prefix = write_indexed_dataset(
        out / "data" / "calibration",
        (data.sample(1, args.seq_length)["tokens"][0].tolist() for _ in range(64)),
        cfg.vocab_size,
    )
    _, elastic = load_elastic_recipe(args.elastic_config)
    ranked = build_elastic_model(cfg, elastic, pgs)
    load_checkpoint(out / "parent", ranked, cfg, kinds=("parent",))
    batches = calibration_batches(
        prefix, num_samples=16, seq_length=args.seq_length, batch_size=4, seed=args.seed
    )
    t0 = time.time()
    ranking = estimate_importance(ranked, batches, pgs)
    rank_model(ranked, ranking, pgs)
    save_checkpoint(
        out / "ranked",
        ranked,
        cfg,
        kind="ranked",
        metadata={
            "layer_ranking": ranking.layers,
            "ffn_nesting_blocks": elastic.ffn_nesting_blocks,
        },
    )
    (out / "ranked" / "importance.json").write_text(json.dumps(ranking.to_json(), indent=1))
    print(
        f"[quickstart] importance in {time.time() - t0:.1f}s; layers most -> least important: "
        f"{ranking.layers}; ranked parent: {out / 'ranked'}",
        flush=True,
    )
    destroy_process_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())
