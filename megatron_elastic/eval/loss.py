"""Validation loss and perplexity of a language model over fixed-length batches of a megatron
indexed dataset (the same ``GPTDataset`` samples training reads)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset

from megatron_elastic.data.gpt_data import build_gpt_datasets, micro_batches
from megatron_elastic.data.tokenizers import Tokenizer
from megatron_elastic.training.lm_step import Batch, position_ids_like

__all__ = ["LossResult", "validation_batches", "validation_loss"]


@dataclass(frozen=True)
class LossResult:
    """Token-weighted mean cross entropy over every loss-masked token."""

    loss: float
    """Mean cross entropy in nats per token."""
    num_tokens: int
    """Tokens counted (loss mask 1)."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def validation_batches(
    prefix: str | Path,
    tokenizer: Tokenizer,
    *,
    seq_length: int,
    micro_batch_size: int,
    split: str = "0,1,0",
    max_samples: int | None = None,
    cache_dir: str | Path | None = None,
) -> list[Batch]:
    """Micro-batches of the validation split of ``prefix``: one pass over its documents in
    megatron's (seeded) sample order, at most ``max_samples`` samples. ``split`` is megatron's
    train,valid,test proportions: the default makes the whole prefix the validation set (a
    separate validation file); give the training split, e.g. ``98,2,0``, to evaluate on the
    documents training held out. Batches are kept in memory so every budget sees the same ones."""
    if max_samples is not None and max_samples < micro_batch_size:
        raise ValueError(
            f"max_samples ({max_samples}) must be >= micro_batch_size ({micro_batch_size})"
        )
    _, valid, _ = build_gpt_datasets(
        prefix,
        seq_length=seq_length,
        tokenizer=tokenizer,
        num_samples=(None, None, None),
        split=split,
        cache_dir=cache_dir,
    )
    if valid is None:
        raise ValueError(f"split {split!r} gives no validation share; e.g. '0,1,0' or '98,2,0'")
    available = len(valid) if max_samples is None else min(len(valid), max_samples)
    batches = list(micro_batches(Subset(valid, range(available)), micro_batch_size))
    if not batches:
        raise ValueError(
            f"the validation split of {str(prefix)!r} has {len(valid)} samples of {seq_length} "
            f"tokens, fewer than one micro-batch of {micro_batch_size}; lower the sequence length "
            "or the micro-batch size"
        )
    return batches


@torch.no_grad()
def validation_loss(model: nn.Module, batches: Iterable[Batch]) -> LossResult:
    """Mean next-token cross entropy of ``model`` (whole model on this rank, any TP: the loss is
    megatron's vocab-parallel one) over the loss-masked tokens of ``batches``. Sums accumulate in
    float64 on the model's device; the host reads them once at the end."""
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        tokens = batch["tokens"].to(device)
        labels = batch["labels"].to(device)
        mask = batch["loss_mask"].to(device).double()  # (b, s)
        per_token = model(tokens, position_ids_like(tokens), None, labels=labels)  # (b, s)
        loss_sum += (per_token.double() * mask).sum()
        count += mask.sum()
    total, n = loss_sum.item(), int(count.item())
    if n == 0:
        raise ValueError("no loss-masked tokens in the validation batches")
    return LossResult(loss=total / n, num_tokens=n)
