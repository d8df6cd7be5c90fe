#!/usr/bin/env python
"""Rank the parent's components by importance and write the ranked (permuted) parent.

Forward passes only: embedding channels, FFN neurons, Mamba heads and head channels, attention
heads (within their groups) and layers (iterative normalised MSE of the logits). The weights are
permuted so every nested sub-network is a prefix of the most important components; the model's
function does not change. Writes the ranked checkpoint and a readable ``importance.json`` in it.

    python tools/estimate_importance.py --elastic-config examples/tiny/elastic.yaml \\
        --checkpoint runs/parent --data runs/data/train_text_document --num-samples 64 \\
        --output runs/ranked

Runs under torchrun for tensor/data parallelism (pipeline parallel size 1).

``--backend modelopt`` ranks with NVIDIA ModelOpt's Minitron importance (``mcore_minitron``)
instead, then permutes the same way. It needs a CUDA GPU with Transformer Engine and runs in one
process with TP=1 (ModelOpt's limits); see docs/benchmarks.md for how the two backends agree.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from megatron_elastic import cli


def _check_modelopt_backend(tensor_parallel_size: int) -> None:
    """ValueError (before any heavy work) where ``--backend modelopt`` cannot run."""
    if tensor_parallel_size != 1 or int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ValueError(
            "--backend modelopt runs in one process with --tensor-parallel-size 1 (ModelOpt's "
            "Minitron pruning supports TP=1 only); drop torchrun/--tensor-parallel-size, or use "
            "--backend native for tensor/data parallelism"
        )
    from megatron_elastic.importance.modelopt_backend import modelopt_available

    reason = modelopt_available()
    if reason is not None:
        raise ValueError(reason)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--elastic-config", help="elastic recipe (model + FFN nesting blocks)")
    src.add_argument("--model-config", help="model YAML (FFN nesting blocks from the flag)")
    parser.add_argument("--checkpoint", required=True, help="parent checkpoint directory")
    parser.add_argument("--data", required=True, help="Megatron indexed dataset prefix")
    parser.add_argument("--output", required=True, help="directory for the ranked checkpoint")
    parser.add_argument("--num-samples", type=int, default=64, help="calibration sequences")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--ffn-nesting-blocks",
        type=int,
        default=None,
        help="with --model-config: the elastic config's ffn_nesting_blocks",
    )
    parser.add_argument(
        "--no-layer-ranking",
        action="store_true",
        help="skip the iterative layer ranking (O(layers^2) forward passes)",
    )
    parser.add_argument(
        "--backend",
        choices=["native", "modelopt"],
        default="native",
        help="native: this package's scores (runs everywhere); modelopt: ModelOpt's Minitron "
        "importance (CUDA GPU with transformer_engine, one process, TP=1)",
    )
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    if args.num_samples <= 0 or args.seq_length <= 0 or args.batch_size <= 0:
        parser.error("--num-samples, --seq-length and --batch-size must be positive")

    from megatron_elastic.checkpoint import load_checkpoint, read_manifest, save_checkpoint
    from megatron_elastic.config import ParallelConfig, load_model_config
    from megatron_elastic.data import calibration_batches, check_prefix
    from megatron_elastic.elastic import ElasticConfig, build_elastic_model, load_elastic_recipe
    from megatron_elastic.importance.estimate import estimate_importance, rank_model
    from megatron_elastic.importance.scores import keep_attention_first
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups

    if args.elastic_config:
        model_cfg, elastic = load_elastic_recipe(args.elastic_config)
        if args.ffn_nesting_blocks is not None:
            parser.error("--ffn-nesting-blocks comes from --elastic-config; drop the flag")
    else:
        model_cfg = load_model_config(args.model_config)
        elastic = ElasticConfig(
            budgets={"parent": 1.0}, ffn_nesting_blocks=args.ffn_nesting_blocks or 1
        )
    if args.backend == "modelopt":
        _check_modelopt_backend(args.tensor_parallel_size)
    check_prefix(args.data)
    read_manifest(args.checkpoint)
    parallel = ParallelConfig(tensor_parallel_size=args.tensor_parallel_size)
    elastic.validate_for(model_cfg, parallel)

    pgs = init_process_groups(parallel, seed=args.seed)
    model = build_elastic_model(model_cfg, elastic, pgs, parallel)
    source = load_checkpoint(args.checkpoint, model, model_cfg, kinds=("parent",))
    batches = calibration_batches(
        args.data,
        num_samples=args.num_samples,
        seq_length=args.seq_length,
        batch_size=args.batch_size,
        seed=args.seed + pgs.dp.rank(),
    )
    start = time.time()
    if args.backend == "modelopt":
        from megatron_elastic.importance.modelopt_backend import run_minitron_importance

        ranking = run_minitron_importance(model_cfg, model, batches, pgs)
        if args.no_layer_ranking:
            ranking.layers = None
        elif ranking.layers is not None:  # ModelOpt's one-shot order knows no layer kinds
            ranking.layers = keep_attention_first(
                ranking.layers, model_cfg.layer_kinds(), elastic.min_attention_layers
            )
    else:
        ranking = estimate_importance(model, batches, pgs, rank_layers=not args.no_layer_ranking)
    rank_model(model, ranking, pgs)
    out = Path(args.output)
    meta = {
        "source_checkpoint": str(Path(args.checkpoint).resolve()),
        "source_kind": source["kind"],
        "data": str(args.data),
        "num_samples": args.num_samples,
        "seq_length": args.seq_length,
        "backend": args.backend,
        "ffn_nesting_blocks": elastic.ffn_nesting_blocks,
        "layer_ranking": ranking.layers,
        "min_attention_layers": elastic.min_attention_layers,
    }
    save_checkpoint(out, model, model_cfg, kind="ranked", metadata=meta)
    if pgs.tp.rank() == 0 and pgs.dp.rank() == 0:
        (out / "importance.json").write_text(json.dumps({**meta, **ranking.to_json()}, indent=1))
        print(
            f"ranked parent written to {out} in {time.time() - start:.1f}s "
            f"(layer ranking: {ranking.layers})"
        )
    if dist.is_initialized():
        dist.barrier()
    destroy_process_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())
