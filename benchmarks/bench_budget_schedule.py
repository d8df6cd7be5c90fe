#!/usr/bin/env python
"""Budgets per phase of a request vs each budget alone: accuracy and time on the quickstart's
held-out problems (``megatron_elastic.serving.schedule``).

Every arm continues the same problems greedily with the cached serving path, one prompt at a time
(as a schedule runs them), up to ``--max-new-tokens`` (the quickstart's 72): each trained budget
alone, and each ``--schedule`` (the worked solution at one budget until ``####``, the final answer
re-prefilled at another). Accuracy is the quickstart's (exact final answers, the task's own
scorer: :func:`megatron_elastic.eval.accuracy.reasoning_accuracy`); the problems are the
quickstart evaluation's (``held_out_problems`` with its seed, tasks and size, minus the training
corpus's questions). Times are of the whole arm (generation and scoring), medians of
``--repeats`` rounds with the arms interleaved in each round, as wall-clock and as this process's
CPU time (one thread: steadier than the wall clock when other work shares the cores). Accuracy
does not depend on timing.

    python benchmarks/bench_budget_schedule.py --checkpoint runs/quickstart/stage2/step_0000040 \\
        --exclude runs/quickstart/corpus/train.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_elastic.config import ParallelConfig
from megatron_elastic.data.reasoning import QUICKSTART_TASKS
from megatron_elastic.eval import open_checkpoint
from megatron_elastic.eval.accuracy import reasoning_accuracy
from megatron_elastic.eval.loading import load_eval_tokenizer
from megatron_elastic.eval.run import held_out_problems
from megatron_elastic.parallel import destroy_process_groups, init_process_groups
from megatron_elastic.serving import ServingSession, cached_generate
from megatron_elastic.serving.schedule import BudgetSchedule, scheduled_generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="trained elastic checkpoint")
    parser.add_argument("--tokenizer", help="default: the checkpoint's")
    parser.add_argument("--exclude", help="the training corpus JSONL (its questions are dropped)")
    parser.add_argument("--num-problems", type=int, default=100)
    parser.add_argument("--problem-seed", type=int, default=20250, help="evaluate.py's default")
    parser.add_argument("--max-new-tokens", type=int, default=72, help="the quickstart's")
    parser.add_argument(
        "--schedules",
        default="think=50%,answer=full;think=full,answer=50%;think=75%,answer=full",
        help="';'-separated budget schedules",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    pgs = init_process_groups(ParallelConfig())
    ckpt = open_checkpoint(args.checkpoint, pgs)
    tok = load_eval_tokenizer(args.tokenizer, ckpt.manifest, ckpt.model_config)
    problems = held_out_problems(
        args.num_problems,
        seed=args.problem_seed,
        tasks=QUICKSTART_TASKS,
        size="short",
        exclude=args.exclude,
    )
    session = ServingSession(ckpt, keep=3)
    budgets = sorted(ckpt.budgets(), key=ckpt.params, reverse=True)
    schedules = [BudgetSchedule.parse(s, budgets) for s in args.schedules.split(";")]
    common = {
        "max_new_tokens": args.max_new_tokens,
        "eos_id": tok.eod,
        "vocab_size": tok.vocab_size,
    }
    thinking: dict[str, int] = {}
    produced: dict[str, int] = {}

    def alone(budget, name):
        def complete(prompts):
            net = session.net(budget)
            outs = [cached_generate(net, [tok.encode(p)], **common).tokens[0] for p in prompts]
            produced[name] = sum(len(t) for t in outs)
            return [tok.decode(t) for t in outs]

        return complete

    def phased(schedule, name):
        def complete(prompts):
            ids = [tok.encode(p) for p in prompts]
            out = scheduled_generate(session, schedule, ids, decode=tok.decode, **common)
            produced[name] = sum(len(t) for t in out.generation.tokens)
            thinking[name] = sum(out.thinking)
            return [tok.decode(t) for t in out.generation.tokens]

        return complete

    arms = {f"{b} alone": alone(b, f"{b} alone") for b in budgets}
    for s in schedules:
        name = f"think={s.think}, answer={s.answer}"
        arms[name] = phased(s, name)
    times: dict[str, list[float]] = {name: [] for name in arms}
    cpu: dict[str, list[float]] = {name: [] for name in arms}
    results = {}
    for _ in range(args.repeats):
        for name, complete in arms.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            results[name] = reasoning_accuracy(problems, complete, batch_size=len(problems))
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    destroy_process_groups()

    print(
        f"{len(problems)} held-out quickstart problems, greedy, <= {args.max_new_tokens} new "
        f"tokens, one prompt at a time, {torch.get_num_threads()} thread(s); times: median "
        f"(min-max) of {args.repeats} interleaved rounds, wall clock and this process's CPU "
        "time (on a shared machine the CPU time is the steadier figure)"
    )
    print(f"budgets: {', '.join(f'{b} = {ckpt.params(b):,} params' for b in budgets)}\n")
    print("| arm | accuracy | time s | CPU time s | tokens | of which thinking |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, acc in results.items():
        cells = [
            f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"
            for xs in (times[name], cpu[name])
        ]
        print(
            f"| {name} | {acc.accuracy:.2f} ({acc.correct}/{acc.total}) | {cells[0]} | "
            f"{cells[1]} | {produced[name]} | {thinking.get(name, '-')} |"
        )


if __name__ == "__main__":
    main()
