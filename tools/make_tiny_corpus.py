#!/usr/bin/env python
"""Write the tiny recipe's reasoning corpus: train.jsonl and valid.jsonl of generated problems.

Problems come from reasoning-gym (offline): arithmetic, chain sums, linear equations and
GSM8K-style word problems, each with a worked solution and the final answer. One row per line:
{"text", "task", "question", "solution", "answer"}, where "text" is the training text
("Question: ...\\nAnswer: <steps>\\n#### <answer>"). Train and valid share no question; the
same arguments write the same files.

    python tools/make_tiny_corpus.py --output runs/corpus --num-train 20000 --num-valid 500
    python tools/make_tiny_corpus.py --output runs/corpus_long --num-train 20000 \\
        --num-valid 500 --problem-size long   # stage 2: longer problems, more verbose steps
    python tools/make_tiny_corpus.py --output runs/corpus --num-train 12000 --num-valid 200 \\
        --tasks chain_sum simple_equations --problem-size short   # what make quickstart writes
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_elastic import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    from megatron_elastic.data.reasoning import DEFAULT_TASKS, PROBLEM_SIZES, generate_records

    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="directory for train.jsonl/valid.jsonl")
    parser.add_argument("--num-train", type=int, required=True, help="training problems")
    parser.add_argument("--num-valid", type=int, required=True, help="validation problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--problem-size",
        choices=PROBLEM_SIZES,
        help="short: few small operands; long: longer problems, step-by-step rewrites (stage 2)",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=list(DEFAULT_TASKS),
        help="reasoning-gym tasks to mix uniformly (default: all)",
    )
    parser.take_defaults(generate_records, problem_size="size")
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_valid < 0:
        parser.error("--num-train must be >= 1 and --num-valid >= 0")
    records = generate_records(
        args.num_train + args.num_valid, seed=args.seed, tasks=args.tasks, size=args.problem_size
    )
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for name, part in (
        ("train", records[: args.num_train]),
        ("valid", records[args.num_train :]),
    ):
        path = output / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for record in part:
                f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
        print(f"wrote {len(part)} problems to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
