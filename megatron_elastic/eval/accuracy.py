"""Task accuracy on generated reasoning problems: each record's prompt (``Question: ...\\nAnswer:``)
is continued greedily, the final answer after ``####`` is extracted and scored with the task's own
reasoning-gym scorer. Only a full score (1.0) counts as correct: the scorers give partial credit
to some wrong answers (see :func:`megatron_elastic.data.reasoning.score_answer`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from megatron_elastic.data.reasoning import (
    ReasoningRecord,
    extract_answer,
    render_prompt,
    score_answer,
)
from megatron_elastic.data.tokenizers import Tokenizer
from megatron_elastic.eval.generate import greedy_generate

__all__ = [
    "AccuracyResult",
    "Completer",
    "TaskCount",
    "completion_answer",
    "model_completer",
    "reasoning_accuracy",
]

Completer = Callable[[Sequence[str]], list[str]]
"""Prompts -> their completions (the generated text only, without the prompt)."""


@dataclass
class TaskCount:
    """Correct answers out of the problems of one task."""

    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass(frozen=True)
class AccuracyResult:
    """Accuracy over all problems and per reasoning-gym task."""

    correct: int
    total: int
    per_task: dict[str, TaskCount]
    predictions: list[str | None] = field(repr=False)
    """The extracted answer of each problem (None: the completion had no ``####`` line)."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def completion_answer(completion: str) -> str | None:
    """The final answer of a completion. A model that goes on to write a new problem after its
    answer is judged on its own answer, not on the invented one."""
    own = completion.split("\nQuestion:", 1)[0]
    return extract_answer(own)


def reasoning_accuracy(
    records: Sequence[ReasoningRecord], complete: Completer, *, batch_size: int = 16
) -> AccuracyResult:
    """Accuracy of ``complete`` on ``records``, prompts sent ``batch_size`` at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_task: dict[str, TaskCount] = {}
    predictions: list[str | None] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        completions = complete([render_prompt(r) for r in chunk])
        if len(completions) != len(chunk):
            raise ValueError(f"the completer returned {len(completions)} texts for {len(chunk)}")
        for record, text in zip(chunk, completions, strict=True):
            predicted = completion_answer(text)
            predictions.append(predicted)
            count = per_task.setdefault(record.task, TaskCount())
            count.total += 1
            count.correct += int(score_answer(record, predicted) == 1.0)
    correct = sum(c.correct for c in per_task.values())
    return AccuracyResult(correct, len(records), dict(sorted(per_task.items())), predictions)


def model_completer(
    model: nn.Module,
    tokenizer: Tokenizer,
    *,
    max_new_tokens: int,
    max_sequence_length: int | None = None,
) -> Completer:
    """A :data:`Completer` that greedily continues prompts with ``model`` (as it is set now, e.g.
    an elastic model at a budget) and stops at the tokenizer's end-of-document token."""

    def complete(prompts: Sequence[str]) -> list[str]:
        ids = [tokenizer.encode(p) for p in prompts]
        out = greedy_generate(
            model,
            ids,
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eod,
            max_sequence_length=max_sequence_length,
            vocab_size=tokenizer.vocab_size,
        )
        return [tokenizer.decode(t) for t in out.tokens]

    return complete
