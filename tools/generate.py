#!/usr/bin/env python
"""Generation from an elastic checkpoint at one or more budgets, in one process: the weights are
loaded once and each budget only switches which slices of them run.

    python tools/generate.py --checkpoint runs/elastic --budget 50% \\
        --prompt "Question: What is 3 + 4?\\nAnswer:" --max-new-tokens 64
    python tools/generate.py --checkpoint runs/elastic --budget all --prompt "..." --prompt "..."
    python tools/generate.py --checkpoint runs/elastic --budget full --draft 50% \\
        --draft-tokens 4 --prompt "..."
    python tools/generate.py --checkpoint runs/elastic --budget-schedule think=50%,answer=full \\
        --prompt "..."

Decoding is cached; ``--draft B`` decodes self-speculatively (the smaller budget B drafts, the
verifier checks; greedy) and prints the acceptance rate; ``--budget-schedule
think=B1,answer=B2`` writes the worked solution at B1 and, after the answer marker ``####``, the
final answer at B2 (re-prefilled at B2; greedy); ``--temperature``/``--top-p``/``--seed``
sample; ``--recompute`` recomputes the sequence every token (:mod:`megatron_elastic.serving.run`).
``--budget`` may be repeated, comma-separated, ``all``, or with ``--interpolate`` a fraction
between trained budgets (untrained). ``\\n`` in a prompt is a newline. Bad input (unknown budget,
a draft not smaller than the verifier, a prompt longer than the model's context, ...) stops with
one line and exit code 2.
"""

from __future__ import annotations

import sys

from megatron_elastic import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    from megatron_elastic.serving.run import generate_from_checkpoint

    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="elastic (or exported) checkpoint")
    parser.add_argument(
        "--budget",
        action="append",
        help="trained budget name, 'all', or a fraction (--interpolate); repeatable (default: all)",
    )
    parser.add_argument(
        "--interpolate",
        action="store_true",
        help="allow an untrained fraction between two trained budgets (router interpolation)",
    )
    parser.add_argument("--prompt", action="append", required=True, help="repeatable")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--tokenizer", help="tokenizer file (default: the checkpoint's)")
    parser.add_argument("--draft", help="smaller budget drafting for self-speculative decoding")
    parser.add_argument(
        "--draft-tokens", type=int, help="tokens the draft proposes per verification"
    )
    parser.add_argument("--temperature", type=float, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, help="sampling seed")
    parser.add_argument(
        "--recompute", action="store_true", help="no cache: recompute the sequence every token"
    )
    parser.add_argument(
        "--budget-schedule",
        help="think=B1,answer=B2: the worked solution at B1, the final answer (after ####) at B2",
    )
    parser.take_defaults(generate_from_checkpoint)
    args = parser.parse_args(argv)
    generate_from_checkpoint(**cli.options(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
