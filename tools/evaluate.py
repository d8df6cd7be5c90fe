#!/usr/bin/env python
"""Evaluate every budget of one elastic checkpoint (or an exported budget): validation loss and
perplexity on a megatron indexed dataset, and accuracy on generated reasoning problems.

The elastic checkpoint is loaded once; each budget runs the router's architecture (argmax, no
noise, calibrated to within router.target_tolerance of the target) on slices of the same
weights. Reasoning problems come from reasoning-gym with a fixed seed (--problem-seed; use one
other than the training corpus's, and --exclude the training jsonl to drop any question training
saw). Prints a table and writes --output as JSON.

--checkpoint may also be a Hugging Face directory (``export_budget.py --format hf``, or any
``config.json`` causal LM): it is loaded with transformers in float32 and measured by the same
loss and greedy-decoding code, with its own tokenizer file unless --tokenizer is given; its
budget name comes from export_manifest.json.

--architectures-from ELASTIC evaluates --checkpoint (the ranked parent written by
estimate_importance.py, or a parent) at the sub-network ELASTIC's trained router picks for each
budget, with the same code as the elastic rows: the baseline "pruned, no elastic training" at
exactly the elastic model's architectures and parameter counts.

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

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from megatron_elastic import cli


def _problems(args: argparse.Namespace) -> list:
    from megatron_elastic.data.reasoning import DEFAULT_TASKS, generate_records

    if args.num_problems <= 0:
        return []
    tasks = args.tasks or DEFAULT_TASKS
    if not args.exclude:
        return generate_records(
            args.num_problems, seed=args.problem_seed, tasks=tasks, size=args.problem_size
        )
    from megatron_elastic.files import iter_jsonl

    seen = set()
    for where, row in iter_jsonl(args.exclude):
        if not isinstance(row, dict) or "question" not in row:
            raise ValueError(f"{where}: no 'question' key (--exclude takes a corpus JSONL)")
        seen.add(row["question"])
    # draw extra problems so that the held-out ones still number --num-problems
    pool = generate_records(
        2 * args.num_problems + 64, seed=args.problem_seed, tasks=tasks, size=args.problem_size
    )
    kept = [r for r in pool if r.question not in seen][: args.num_problems]
    if len(kept) < args.num_problems:
        raise ValueError(
            f"only {len(kept)} generated problems are not in {args.exclude!r}; lower --num-problems"
        )
    return kept


def _table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"{'budget':>10} {'params':>14} {'val loss':>9} {'ppl':>10} {'accuracy':>9}"]
    for r in rows:
        lines.append(
            f"{r['budget']!s:>10} {r['params']:>14,} {fmt(r['val_loss'], '.4f'):>9} "
            f"{fmt(r['perplexity'], '.3f'):>10} {fmt(r['accuracy'], '.3f'):>9}"
        )
    return "\n".join(lines)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, help="elastic or exported checkpoint, or an HF directory"
    )
    parser.add_argument(
        "--budgets",
        default="all",
        help="'all', trained names (comma-separated), or fractions between them (untrained)",
    )
    parser.add_argument(
        "--architectures-from",
        metavar="ELASTIC",
        help="run --checkpoint (ranked or parent) at this elastic checkpoint's router choices",
    )
    parser.add_argument("--data", help="indexed dataset prefix for the loss (omit to skip)")
    parser.add_argument(
        "--split",
        default="0,1,0",
        help="train,valid,test proportions; the loss uses the valid share (default: all of --data)",
    )
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--max-samples", type=int, help="cap on validation samples (default all)")
    parser.add_argument("--cache-dir", help="megatron's dataset index cache (default: by --data)")
    parser.add_argument("--tokenizer", help="tokenizer file (default: the checkpoint's)")
    parser.add_argument("--num-problems", type=int, default=100, help="0 skips accuracy")
    parser.add_argument("--problem-seed", type=int, default=20250)
    parser.add_argument("--tasks", nargs="+", help="reasoning-gym tasks (default: all four)")
    parser.add_argument(
        "--problem-size",
        default="standard",
        choices=("short", "standard", "long"),
        help="problem size, as make_tiny_corpus.py --problem-size (the training corpus's)",
    )
    parser.add_argument("--exclude", help="training corpus jsonl whose questions are dropped")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts generated at once")
    parser.add_argument("--output", help="results JSON")
    args = parser.parse_args(argv)

    from megatron_elastic.checkpoint import manifest_model, read_manifest
    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.eval import (
        model_completer,
        open_checkpoint,
        reasoning_accuracy,
        validation_batches,
        validation_loss,
    )
    from megatron_elastic.eval.hf_model import (
        is_hf_directory,
        load_hf_eval_tokenizer,
        read_hf_directory,
    )
    from megatron_elastic.eval.loading import (
        checkpoint_budgets,
        load_eval_tokenizer,
        parse_budgets,
    )
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups

    pruned = args.architectures_from
    kind, trained = checkpoint_budgets(args.checkpoint, architectures_from=pruned)
    budgets = parse_budgets(args.budgets, trained, allow_fractions=kind == "elastic" or pruned)
    hf_dir = read_hf_directory(args.checkpoint) if is_hf_directory(args.checkpoint) else None
    if hf_dir is not None:
        max_length = hf_dir.max_sequence_length
    else:
        manifest = read_manifest(args.checkpoint)
        model_cfg = manifest_model(manifest)
        max_length = model_cfg.max_sequence_length
    if max_length is not None and args.seq_length > max_length:
        raise ValueError(
            f"--seq-length {args.seq_length} exceeds the model's max_sequence_length {max_length}"
        )
    problems = _problems(args)
    tokenizer = None
    if (args.data or problems) and hf_dir is not None:
        tokenizer = load_hf_eval_tokenizer(args.tokenizer, hf_dir)
    elif args.data or problems:
        tokenizer = load_eval_tokenizer(args.tokenizer, manifest, model_cfg)
    pgs = init_process_groups(ParallelConfig())
    batches = None
    if args.data:
        batches = validation_batches(
            args.data,
            tokenizer,
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            split=args.split,
            max_samples=args.max_samples,
            cache_dir=args.cache_dir,
        )

    ckpt = open_checkpoint(args.checkpoint, pgs, architectures_from=pruned)
    rows = []
    for budget in budgets:
        ckpt.set_budget(budget)
        row: dict[str, Any] = {"budget": budget, "params": ckpt.params(budget)}
        spec = ckpt.spec(budget)  # the router's sub-network; None for a plain model
        row["spec"] = None if spec is None else dataclasses.asdict(spec)
        row["val_loss"] = row["perplexity"] = row["val_tokens"] = None
        if batches is not None:
            loss = validation_loss(ckpt.model, batches)
            row.update(val_loss=loss.loss, perplexity=loss.perplexity, val_tokens=loss.num_tokens)
        row["accuracy"] = None
        if problems:
            complete = model_completer(
                ckpt.model,
                tokenizer,
                max_new_tokens=args.max_new_tokens,
                max_sequence_length=max_length,
            )
            acc = reasoning_accuracy(problems, complete, batch_size=args.batch_size)
            row.update(
                accuracy=acc.accuracy,
                correct=acc.correct,
                total=acc.total,
                per_task={
                    t: {"correct": c.correct, "total": c.total, "accuracy": c.accuracy}
                    for t, c in acc.per_task.items()
                },
            )
        rows.append(row)
        print(f"evaluated budget {budget}", flush=True)
    destroy_process_groups()

    print(_table(rows))
    if args.output:
        result = {
            "checkpoint": str(Path(args.checkpoint).resolve()),
            "kind": kind,
            "architectures_from": str(Path(pruned).resolve()) if pruned else None,
            "data": args.data,
            "split": args.split if args.data else None,
            "seq_length": args.seq_length,
            "num_problems": len(problems),
            "problem_seed": args.problem_seed,
            "max_new_tokens": args.max_new_tokens,
            "results": rows,
        }
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
