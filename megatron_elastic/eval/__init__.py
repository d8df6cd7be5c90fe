"""Evaluation from one elastic checkpoint: per-budget validation loss, greedy generation and
reasoning accuracy, switching budgets without reloading weights."""

from megatron_elastic.eval.accuracy import (
    AccuracyResult,
    Completer,
    TaskCount,
    completion_answer,
    model_completer,
    reasoning_accuracy,
)
from megatron_elastic.eval.generate import Generation, greedy_generate
from megatron_elastic.eval.loading import KINDS, EvalCheckpoint, open_checkpoint
from megatron_elastic.eval.loss import LossResult, validation_batches, validation_loss

__all__ = [
    "KINDS",
    "AccuracyResult",
    "Completer",
    "EvalCheckpoint",
    "Generation",
    "LossResult",
    "TaskCount",
    "completion_answer",
    "greedy_generate",
    "model_completer",
    "open_checkpoint",
    "reasoning_accuracy",
    "validation_batches",
    "validation_loss",
]
