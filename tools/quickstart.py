#!/usr/bin/env python
"""The main job (``make quickstart``): the whole Nemotron Elastic pipeline on the tiny recipe.

    reasoning corpus + BPE tokenizer -> pretrain the parent -> importance ranking -> stage 1
    (short context, uniform budgets) -> stage 2 (longer context, weighted to the largest) -> export
    every budget to Hugging Face -> evaluate the elastic checkpoint, every exported model and the
    baseline

Each step is one of the project's CLIs run as its own process (what a user would type), so a
failure names the command to rerun. Results: ``<output>/results.json``, ``results.md`` (the
table) and ``results.png`` (the plot); :mod:`megatron_elastic.quickstart` says what they hold
and what the baseline is. ``--reduced`` shrinks every step for the end-to-end test.
"""

from __future__ import annotations

import sys
from pathlib import Path

from megatron_elastic import cli

REPO = Path(__file__).resolve().parents[1]


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/quickstart", help="directory for everything")
    parser.add_argument("--reduced", action="store_true", help="tiny sizes (end-to-end test)")
    args = parser.parse_args(argv)

    from megatron_elastic.quickstart import run_quickstart

    return run_quickstart(args.output, reduced=args.reduced, repo=REPO)


if __name__ == "__main__":
    sys.exit(main())
