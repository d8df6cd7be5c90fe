"""One forward/backward over micro-batches through megatron-core's pipeline schedules."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_model_config
from torch import nn

__all__ = ["Batch", "forward_backward", "lm_loss", "position_ids_like"]

Batch = dict[str, torch.Tensor]
"""A micro-batch: ``tokens`` and ``labels`` (b, s) int64, ``loss_mask`` (b, s) float."""


def position_ids_like(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.size(1), device=tokens.device).unsqueeze(0).expand_as(tokens)


def lm_loss(
    loss_mask: torch.Tensor, per_token_loss: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Masked token-summed cross entropy, the token count, and both for logging (megatron's
    3-tuple loss contract: the schedule divides by the token count)."""
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def _forward_step(data_iterator: Any, model: nn.Module) -> tuple[torch.Tensor, Any]:
    batch = next(data_iterator)
    tokens = batch["tokens"]
    output = model(tokens, position_ids_like(tokens), None, labels=batch["labels"])
    return output, partial(lm_loss, batch["loss_mask"])


def forward_backward(
    model: nn.Module,
    micro_batches: Iterable[Batch],
    pgs: ProcessGroupCollection,
    *,
    num_micro_batches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> torch.Tensor | None:
    """Run megatron's schedule (no pipelining or 1F1B) over the micro-batches; gradients accumulate
    in ``.grad``/``main_grad``. Returns the token-mean loss on the last pipeline stage, else None.
    """
    pp_size = pgs.pp.size()
    schedule = get_forward_backward_func(pp_size=pp_size)
    pipeline_kwargs = {}
    if pp_size > 1:
        pipeline_kwargs["p2p_communicator"] = P2PCommunicator(pgs.pp, get_model_config(model))
    reduced = schedule(
        forward_step_func=_forward_step,
        data_iterator=iter(micro_batches),
        model=model,
        num_microbatches=num_micro_batches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        pg_collection=pgs,
        **pipeline_kwargs,
    )
    if not reduced:
        return None
    totals = torch.stack([r["lm loss"] for r in reduced]).sum(0)
    return totals[0] / totals[1]
