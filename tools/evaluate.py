#!/usr/bin/env python
"""Evaluate every budget of one elastic checkpoint (or an exported budget): validation loss and
perplexity on a megatron indexed dataset, and accuracy on generated reasoning problems.

The elastic checkpoint is loaded once and each budget runs the router's architecture on slices
of the same weights; --checkpoint may also be an exported budget or a Hugging Face directory, and
--architectures-from ELASTIC evaluates a ranked (or parent) checkpoint at ELASTIC's router
choices (the baseline). :mod:`megatron_elastic.eval.run` says how. Prints a table and writes
--output as JSON.

    python tools/evaluate.py --checkpoint runs/elastic --budgets all \\
        --data runs/data/valid --num-problems 200 --output runs/eval.json
    python tools/evaluate.py --checkpoint runs/ranked --architectures-from runs/elastic \\
        --budgets all --data runs/data/valid --tokenizer runs/data/tokenizer.json
    python tools/evaluate.py --checkpoint runs/export/50% --data runs/data/train --split 98,2,0
    python tools/evaluate.py --checkpoint runs/export_hf/50% --data runs/data/valid

Single process (no tensor/pipeline split). Unknown budgets, a missing tokenizer or dataset stop
with exit code 2 and a message.
"""

from __future__ import annotations

import sys

from megatron_elastic import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    from megatron_elastic.eval.run import (
        EvalInputsConfig,
        add_input_options,
        evaluate_checkpoint,
    )

    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, help="elastic or exported checkpoint, or an HF directory"
    )
    parser.add_argument(
        "--budgets",
        help="'all', trained names (comma-separated), or fractions between them (untrained)",
    )
    parser.add_argument(
        "--architectures-from",
        metavar="ELASTIC",
        help="run --checkpoint (ranked or parent) at this elastic checkpoint's router choices",
    )
    add_input_options(parser)
    parser.add_argument("--output", help="results JSON")
    parser.take_defaults(evaluate_checkpoint)
    args = parser.parse_args(argv)
    evaluate_checkpoint(**cli.gather(cli.options(args), inputs=EvalInputsConfig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
