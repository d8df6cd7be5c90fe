"""Evaluate every budget of one checkpoint: what ``tools/evaluate.py`` runs.

Validation loss and perplexity on a megatron indexed dataset, and accuracy on generated
reasoning problems. An elastic checkpoint is loaded once; each budget runs the router's
architecture (argmax, no noise, calibrated to within ``router.target_tolerance`` of the target)
on slices of the same weights. Reasoning problems come from reasoning-gym with a fixed seed
(``problem_seed``; use one other than the training corpus's, and ``exclude`` the training jsonl
to drop any question training saw).

The checkpoint may also be an exported budget, or a Hugging Face directory (``export_budget.py
--format hf``, or any ``config.json`` causal LM): loaded with transformers in float32 and
measured by the same loss and greedy-decoding code, with its own tokenizer file unless
``tokenizer`` is given; its budget name comes from ``export_manifest.json``.

``architectures_from`` (an elastic checkpoint) evaluates the checkpoint (the ranked parent
written by ``estimate_importance.py``, or a parent) at the sub-network that checkpoint's trained
router picks for each budget, with the same code as the elastic rows: the baseline "pruned, no
elastic training" at exactly the elastic model's architectures and parameter counts.

Single process (no tensor/pipeline split).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "EvalInputs",
    "EvalInputsConfig",
    "add_input_options",
    "evaluate_budget",
    "evaluate_checkpoint",
    "format_table",
    "held_out_problems",
    "prepare_inputs",
]

_say = functools.partial(print, flush=True)


def held_out_problems(
    num_problems: int,
    *,
    seed: int,
    tasks: Sequence[str] | None,
    size: str,
    exclude: str | None,
) -> list:
    """``num_problems`` reasoning problems drawn with ``seed``, none of whose questions is in the
    corpus JSONL ``exclude`` (extra problems are drawn so that the held-out ones still number
    ``num_problems``)."""
    from megatron_elastic.data.reasoning import DEFAULT_TASKS, generate_records

    if num_problems <= 0:
        return []
    tasks = tasks or DEFAULT_TASKS
    if not exclude:
        return generate_records(num_problems, seed=seed, tasks=tasks, size=size)
    from megatron_elastic.files import iter_jsonl

    seen = set()
    for where, row in iter_jsonl(exclude):
        if not isinstance(row, dict) or "question" not in row:
            raise ValueError(f"{where}: no 'question' key (--exclude takes a corpus JSONL)")
        seen.add(row["question"])
    pool = generate_records(2 * num_problems + 64, seed=seed, tasks=tasks, size=size)
    kept = [r for r in pool if r.question not in seen][:num_problems]
    if len(kept) < num_problems:
        raise ValueError(
            f"only {len(kept)} generated problems are not in {exclude!r}; lower --num-problems"
        )
    return kept


def format_table(rows: list[dict[str, Any]]) -> str:
    """The printed table: budget, params, validation loss, perplexity, accuracy."""

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"{'budget':>10} {'params':>14} {'val loss':>9} {'ppl':>10} {'accuracy':>9}"]
    for r in rows:
        lines.append(
            f"{r['budget']!s:>10} {r['params']:>14,} {fmt(r['val_loss'], '.4f'):>9} "
            f"{fmt(r['perplexity'], '.3f'):>10} {fmt(r['accuracy'], '.3f'):>9}"
        )
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class EvalInputs:
    """What every budget is measured on, prepared once before any weight is read."""

    tokenizer: Any
    """The tokenizer of the checkpoint (None when neither loss nor accuracy is asked for)."""
    batches: list | None
    """Validation batches for the loss (None: no loss)."""
    problems: list
    """Held-out reasoning problems for the accuracy (empty: no accuracy)."""
    max_length: int | None
    """The model's max_sequence_length (None: unknown, an HF model without one)."""
    max_new_tokens: int
    """Tokens generated per problem."""
    batch_size: int
    """Problems generated at once."""


@dataclasses.dataclass(frozen=True)
class EvalInputsConfig:
    """What to measure each budget on: the options ``tools/evaluate.py`` and
    ``tools/sweep_budgets.py`` share, stated (with their defaults) once."""

    data: str | None = None
    """Indexed dataset prefix for the validation loss (None: no loss)."""
    split: str = "0,1,0"
    """train,valid,test proportions of ``data``; the loss uses the valid share."""
    seq_length: int = 256
    """Tokens per validation sequence (at most the model's ``max_sequence_length``)."""
    micro_batch_size: int = 4
    """Validation sequences per forward pass."""
    max_samples: int | None = None
    """Cap on validation sequences (None: all of the valid share)."""
    cache_dir: str | None = None
    """megatron's dataset index cache (None: beside ``data``)."""
    tokenizer: str | None = None
    """Tokenizer file (None: the checkpoint's)."""
    num_problems: int = 100
    """Held-out reasoning problems for the accuracy (0: no accuracy)."""
    problem_seed: int = 20250
    """Seed the problems are drawn with (use one other than the training corpus's)."""
    tasks: tuple[str, ...] | None = None
    """reasoning-gym tasks (None: all four)."""
    problem_size: str = "standard"
    """Problem size (``data.reasoning.PROBLEM_SIZES``)."""
    exclude: str | None = None
    """Training corpus JSONL whose questions are dropped from the problems."""
    max_new_tokens: int = 128
    """Tokens generated per problem."""
    batch_size: int = 16
    """Problems generated at once."""

    def __post_init__(self) -> None:
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(self.tasks))


def add_input_options(parser) -> None:
    """The command-line options of :class:`EvalInputsConfig` (``tools/evaluate.py`` and
    ``tools/sweep_budgets.py``), defaults taken from it."""
    from megatron_elastic.data.reasoning import PROBLEM_SIZES

    parser.add_argument("--data", help="indexed dataset prefix for the loss (omit to skip)")
    parser.add_argument(
        "--split",
        help="train,valid,test proportions; the loss uses the valid share (default: all of --data)",
    )
    parser.add_argument("--seq-length", type=int)
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--max-samples", type=int, help="cap on validation samples (default all)")
    parser.add_argument("--cache-dir", help="megatron's dataset index cache (default: by --data)")
    parser.add_argument("--tokenizer", help="tokenizer file (default: the checkpoint's)")
    parser.add_argument("--num-problems", type=int, help="0 skips accuracy")
    parser.add_argument("--problem-seed", type=int)
    parser.add_argument("--tasks", nargs="+", help="reasoning-gym tasks (default: all four)")
    parser.add_argument(
        "--problem-size",
        choices=PROBLEM_SIZES,
        help="problem size, as make_tiny_corpus.py --problem-size (the training corpus's)",
    )
    parser.add_argument("--exclude", help="training corpus jsonl whose questions are dropped")
    parser.add_argument("--max-new-tokens", type=int, help="tokens generated per problem")
    parser.add_argument("--batch-size", type=int, help="problems generated at once")
    parser.take_defaults(EvalInputsConfig)


def prepare_inputs(checkpoint: str, config: EvalInputsConfig) -> EvalInputs:
    """The tokenizer, validation batches and problems that :func:`evaluate_budget` measures
    ``checkpoint``'s budgets on. Needs no process group: call it before creating them, so that
    ``ValueError`` for a missing tokenizer or dataset, or a ``seq_length`` the model cannot run,
    leaves nothing behind."""
    from megatron_elastic.checkpoint import manifest_model, read_manifest
    from megatron_elastic.eval import validation_batches
    from megatron_elastic.eval.hf_model import (
        is_hf_directory,
        load_hf_eval_tokenizer,
        read_hf_directory,
    )
    from megatron_elastic.eval.loading import load_eval_tokenizer

    c = config
    hf_dir = read_hf_directory(checkpoint) if is_hf_directory(checkpoint) else None
    if hf_dir is not None:
        max_length = hf_dir.max_sequence_length
    else:
        manifest = read_manifest(checkpoint)
        model_cfg = manifest_model(manifest)
        max_length = model_cfg.max_sequence_length
    if max_length is not None and c.seq_length > max_length:
        raise ValueError(
            f"--seq-length {c.seq_length} exceeds the model's max_sequence_length {max_length}"
        )
    problems = held_out_problems(
        c.num_problems, seed=c.problem_seed, tasks=c.tasks, size=c.problem_size, exclude=c.exclude
    )
    tok = None
    if (c.data or problems) and hf_dir is not None:
        tok = load_hf_eval_tokenizer(c.tokenizer, hf_dir)
    elif c.data or problems:
        tok = load_eval_tokenizer(c.tokenizer, manifest, model_cfg)
    batches = None
    if c.data:
        batches = validation_batches(
            c.data,
            tok,
            seq_length=c.seq_length,
            micro_batch_size=c.micro_batch_size,
            split=c.split,
            max_samples=c.max_samples,
            cache_dir=c.cache_dir,
        )
    return EvalInputs(tok, batches, problems, max_length, c.max_new_tokens, c.batch_size)


def evaluate_budget(ckpt, budget: str | float, inputs: EvalInputs) -> dict[str, Any]:
    """One row of the table: ``budget``'s parameters, sub-network, loss and accuracy on
    ``inputs``, run on the loaded checkpoint ``ckpt`` (:func:`open_checkpoint`)."""
    from megatron_elastic.eval import model_completer, reasoning_accuracy, validation_loss

    ckpt.set_budget(budget)
    row: dict[str, Any] = {"budget": budget, "params": ckpt.params(budget)}
    spec = ckpt.spec(budget)  # the router's sub-network; None for a plain model
    row["spec"] = None if spec is None else dataclasses.asdict(spec)
    row["val_loss"] = row["perplexity"] = row["val_tokens"] = None
    if inputs.batches is not None:
        loss = validation_loss(ckpt.model, inputs.batches)
        row.update(val_loss=loss.loss, perplexity=loss.perplexity, val_tokens=loss.num_tokens)
    row["accuracy"] = None
    if inputs.problems:
        complete = model_completer(
            ckpt.model,
            inputs.tokenizer,
            max_new_tokens=inputs.max_new_tokens,
            max_sequence_length=inputs.max_length,
        )
        acc = reasoning_accuracy(inputs.problems, complete, batch_size=inputs.batch_size)
        row.update(
            accuracy=acc.accuracy,
            correct=acc.correct,
            total=acc.total,
            per_task={
                t: {"correct": c.correct, "total": c.total, "accuracy": c.accuracy}
                for t, c in acc.per_task.items()
            },
        )
    return row


def evaluate_checkpoint(
    checkpoint: str,
    *,
    budgets: str = "all",
    architectures_from: str | None = None,
    inputs: EvalInputsConfig | None = None,
    output: str | None = None,
    log: Callable[[str], None] = _say,
) -> dict[str, Any]:
    """Evaluate ``budgets`` (see :func:`megatron_elastic.budgets.parse_budgets`; fractions on an
    elastic checkpoint or with ``architectures_from``) of ``checkpoint`` on ``inputs`` (None:
    the defaults): the loss on ``data``'s valid share (skipped without ``data``) and accuracy on
    ``num_problems`` problems (0 skips it). Logs one line per budget and the table; writes
    ``output`` (JSON) when given. Returns the results. Unknown budgets, a missing tokenizer or
    dataset: ``ValueError`` before any weight is read."""
    from megatron_elastic.budgets import parse_budgets
    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.eval import open_checkpoint
    from megatron_elastic.eval.loading import checkpoint_budgets
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups

    pruned = architectures_from
    kind, trained = checkpoint_budgets(checkpoint, architectures_from=pruned)
    chosen = parse_budgets(budgets, trained, allow_fractions=kind == "elastic" or bool(pruned))
    # before any process group exists: bad input fails here and leaves nothing behind
    inputs = inputs or EvalInputsConfig()
    prepared = prepare_inputs(checkpoint, inputs)
    pgs = init_process_groups(ParallelConfig())
    ckpt = open_checkpoint(checkpoint, pgs, architectures_from=pruned)
    rows = []
    for budget in chosen:
        rows.append(evaluate_budget(ckpt, budget, prepared))
        log(f"evaluated budget {budget}")
    destroy_process_groups()

    log(format_table(rows))
    result = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "kind": kind,
        "architectures_from": str(Path(pruned).resolve()) if pruned else None,
        "data": inputs.data,
        "split": inputs.split if inputs.data else None,
        "seq_length": inputs.seq_length,
        "num_problems": len(prepared.problems),
        "problem_seed": inputs.problem_seed,
        "max_new_tokens": inputs.max_new_tokens,
        "results": rows,
    }
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {output}")
    return result
