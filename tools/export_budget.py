#!/usr/bin/env python
"""Export trained budgets of an elastic checkpoint as standalone models (zero-shot: no training).

The trained router picks each budget's architecture and the weights are physically sliced
(:mod:`megatron_elastic.export.run`). Formats (``--format``; :mod:`megatron_elastic.export.registry`
says what each writes and what loads it): ``megatron`` (default), ``megatron-lm``, ``hf``,
``gguf``. The tokenizer (``--tokenizer``, default: the checkpoint's) travels with the hf,
megatron-lm and gguf formats. An output directory that exists and is not empty is refused
unless ``--force``.

    python tools/export_budget.py --checkpoint runs/elastic --budget 6B --output runs/export/6B
    python tools/export_budget.py --checkpoint runs/elastic --all --output runs/export --format hf
    python tools/export_budget.py --checkpoint runs/elastic --budget 6B --output runs/mlm/6B \\
        --format megatron-lm
"""

from __future__ import annotations

import sys

from megatron_elastic import cli
from megatron_elastic.export.registry import EXPORTERS
from megatron_elastic.export.run import export_budgets


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="elastic checkpoint (with its router)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--budget", help="a trained budget name, or a fraction (see --interpolate)")
    which.add_argument("--all", action="store_true", help="export every trained budget")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--format", choices=tuple(EXPORTERS))
    parser.add_argument(
        "--gguf-type",
        help="tensor type of --format gguf: f32, f16 or q8_0 (norms and other small tensors stay "
        "f32, as llama.cpp's own converter writes them)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace output directories that are not empty"
    )
    parser.add_argument(
        "--tokenizer",
        help="tokenizer.json / .model (or a directory) shipped with --format hf, megatron-lm and "
        "gguf; default: the "
        "checkpoint manifest's metadata['tokenizer']",
    )
    parser.add_argument(
        "--interpolate",
        action="store_true",
        help="allow an untrained fraction between two trained budgets (router interpolation; "
        "quality is not trained for it)",
    )
    parser.take_defaults(export_budgets)
    args = parser.parse_args(argv)
    export_budgets(
        args.checkpoint,
        args.output,
        budget=None if args.all else args.budget,
        format=args.format,
        tokenizer=args.tokenizer,
        force=args.force,
        interpolate=args.interpolate,
        gguf_type=args.gguf_type,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
