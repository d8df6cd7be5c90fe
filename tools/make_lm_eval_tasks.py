#!/usr/bin/env python
"""Write lm-evaluation-harness tasks over the held-out reasoning problems to a local folder
(:mod:`megatron_elastic.eval.lm_eval_tasks`): ``elastic_reasoning`` (greedy completion, scored as
``evaluate.py`` scores it) and ``elastic_reasoning_loglik`` (the answer's log-likelihood).

    python tools/make_lm_eval_tasks.py --output runs/lm_eval_tasks --num-problems 100
    lm_eval --model hf --model_args pretrained=runs/export_hf/50%,dtype=float32 \\
        --include_path runs/lm_eval_tasks --tasks elastic_reasoning,elastic_reasoning_loglik

Use the same --num-problems, --problem-seed, --problem-size, --exclude and --max-new-tokens as
evaluate.py to measure the same problems. Bad values stop with exit code 2 and a message.
"""

from __future__ import annotations

import sys

from megatron_elastic import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    from megatron_elastic.data.reasoning import PROBLEM_SIZES
    from megatron_elastic.eval.lm_eval_tasks import write_lm_eval_tasks

    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="folder for the task YAML files and problems.jsonl")
    parser.add_argument("--num-problems", type=int)
    parser.add_argument("--problem-seed", type=int)
    parser.add_argument("--tasks", nargs="+", help="reasoning-gym tasks (default: all four)")
    parser.add_argument("--problem-size", choices=PROBLEM_SIZES)
    parser.add_argument("--exclude", help="training corpus jsonl whose questions are dropped")
    parser.add_argument("--max-new-tokens", type=int, help="the generation task's max_gen_toks")
    parser.take_defaults(write_lm_eval_tasks)
    args = parser.parse_args(argv)
    out = write_lm_eval_tasks(**cli.options(args))
    print(f"wrote lm-eval tasks to {out} (pass --include_path {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
