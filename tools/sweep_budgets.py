#!/usr/bin/env python
"""Sweep every trained budget of one elastic checkpoint and a grid of interpolated ones: total and
active parameters, validation loss, task accuracy, decode tokens/s and memory measured on this
machine; writes a Markdown table, JSON and a Pareto plot (:mod:`megatron_elastic.eval.sweep`).

    python tools/sweep_budgets.py --checkpoint runs/quickstart/stage2 \\
        --data runs/quickstart/data/valid --num-problems 100 --output runs/sweep
    python tools/sweep_budgets.py --checkpoint runs/elastic --num-problems 50 --interpolate 8

Single process. A checkpoint that is not elastic, a missing tokenizer or dataset, or bad speed
settings stop with exit code 2 and a message before any weight is read.
"""

from __future__ import annotations

import sys

from megatron_elastic import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    from megatron_elastic.eval.run import EvalInputsConfig, add_input_options
    from megatron_elastic.eval.sweep import SpeedConfig, sweep_budgets

    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="elastic checkpoint (trained router)")
    parser.add_argument(
        "--interpolate", type=int, help="interpolated fractions between the trained budgets"
    )
    add_input_options(parser)
    parser.add_argument("--prompt-tokens", type=int, help="timed prompt length")
    parser.add_argument("--new-tokens", type=int, help="tokens decoded per timed round")
    parser.add_argument("--repeats", type=int, help="timed rounds per budget")
    parser.add_argument("--output", help="folder for sweep.md, sweep.json and pareto.png")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    for library in (SpeedConfig, sweep_budgets):
        parser.take_defaults(library)
    args = parser.parse_args(argv)
    sweep_budgets(**cli.gather(cli.options(args), inputs=EvalInputsConfig, speed=SpeedConfig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
