#!/usr/bin/env python
"""Rank the parent's components by importance and write the ranked (permuted) parent.

Forward passes only (channels, neurons, Mamba heads, attention heads, layers); the weights are
permuted so every nested sub-network is a prefix of the most important components, without
changing the model's function (:mod:`megatron_elastic.importance.run`). Writes the ranked
checkpoint and a readable ``importance.json`` in it.

    python tools/estimate_importance.py --elastic-config examples/tiny/elastic.yaml \\
        --checkpoint runs/parent --data runs/data/train_text_document --num-samples 64 \\
        --output runs/ranked

Runs under torchrun for tensor/data parallelism (pipeline parallel size 1). ``--backend
modelopt`` ranks with NVIDIA ModelOpt's Minitron importance instead (a CUDA GPU with Transformer
Engine, one process, TP=1; docs/benchmarks.md compares the two backends).
"""

from __future__ import annotations

import sys

from megatron_elastic import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    from megatron_elastic.importance.run import rank_parent

    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--elastic-config", help="elastic recipe (model + FFN nesting blocks)")
    src.add_argument("--model-config", help="model YAML (FFN nesting blocks from the flag)")
    parser.add_argument("--checkpoint", required=True, help="parent checkpoint directory")
    parser.add_argument("--data", required=True, help="Megatron indexed dataset prefix")
    parser.add_argument("--output", required=True, help="directory for the ranked checkpoint")
    parser.add_argument("--num-samples", type=int, help="calibration sequences")
    parser.add_argument("--seq-length", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument(
        "--ffn-nesting-blocks",
        type=int,
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
        help="native: this package's scores (runs everywhere); modelopt: ModelOpt's Minitron "
        "importance (CUDA GPU with transformer_engine, one process, TP=1)",
    )
    parser.add_argument("--tensor-parallel-size", type=int)
    parser.add_argument("--seed", type=int)
    parser.take_defaults(rank_parent)
    args = parser.parse_args(argv)
    if args.num_samples <= 0 or args.seq_length <= 0 or args.batch_size <= 0:
        parser.error("--num-samples, --seq-length and --batch-size must be positive")
    if args.elastic_config and args.ffn_nesting_blocks is not None:
        parser.error("--ffn-nesting-blocks comes from --elastic-config; drop the flag")

    rank_parent(**cli.options(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
