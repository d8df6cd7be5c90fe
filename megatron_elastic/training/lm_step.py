"""One forward/backward over micro-batches through megatron-core's pipeline schedules."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_batch_on_this_cp_rank, get_model_config
from torch import nn

__all__ = [
    "Batch",
    "context_parallel_share",
    "distill_forward",
    "forward_backward",
    "lm_forward",
    "lm_loss",
    "position_ids_like",
]

Batch = dict[str, torch.Tensor]
"""A micro-batch: ``tokens`` and ``labels`` (b, s) int64, ``loss_mask`` (b, s) float."""


def position_ids_like(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.size(1), device=tokens.device).unsqueeze(0).expand_as(tokens)


def lm_loss(
    loss_mask: torch.Tensor,
    extra_loss: torch.Tensor | None,
    cp_group,
    per_token_loss: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Masked token-summed cross entropy (+ ``extra_loss``, e.g. the router's budget loss, counted
    once per micro-batch), the token count, and both for logging. megatron's 3-tuple loss
    contract: the schedule divides the first by the token count.

    Under context parallelism this rank holds a share of the micro-batch's tokens: the count is
    the micro-batch's (all-reduced over CP) and the loss sum is scaled by CP, because megatron's
    DDP averages gradients over the data x context-parallel ranks (and the router's are averaged
    the same way), so the averaged gradient is that of the whole micro-batch's token mean. The
    logged sums stay this rank's (:func:`forward_backward` reduces them over CP)."""
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum()
    logged = {"lm loss": torch.stack([loss_sum.detach(), num_tokens])}
    cp_size = cp_group.size()
    if cp_size > 1:
        num_tokens = num_tokens.clone()
        dist.all_reduce(num_tokens, group=cp_group)
        loss_sum = loss_sum * cp_size
    if extra_loss is not None:
        loss_sum = loss_sum + extra_loss * num_tokens.clamp(min=1)
        logged["extra loss"] = torch.stack([extra_loss.detach(), torch.ones_like(num_tokens)])
    return loss_sum, num_tokens.to(torch.int), logged


def context_parallel_share(batch: Batch, cp_group) -> Batch:
    """This CP rank's load-balanced chunks of every (b, s) tensor of ``batch`` (megatron's
    ``get_batch_on_this_cp_rank``: chunks ``r`` and ``2*CP-1-r`` of ``2*CP``); the batch itself
    at CP=1. The one place the data enters context parallelism."""
    if cp_group.size() == 1:
        return batch
    return get_batch_on_this_cp_rank(dict(batch), is_hybrid_cp=False, cp_group=cp_group)


MicroBatchHook = Callable[[int], "torch.Tensor | None"]
"""Called with the micro-batch index before that micro-batch's forward on every stage (set the
sub-network there); may return an extra loss that the last stage adds to that micro-batch."""


def lm_forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-token cross entropy on the last stage (hidden states elsewhere)."""
    tokens = batch["tokens"]
    return model(tokens, position_ids_like(tokens), None, labels=batch["labels"])


def distill_forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-token KD loss of a :class:`~megatron_elastic.distill.pair.DistillationPair`."""
    tokens = batch["tokens"]
    return model(
        tokens,
        position_ids_like(tokens),
        None,
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )


ModelForward = Callable[[nn.Module, Batch], torch.Tensor]


def _forward_step(
    hook: MicroBatchHook | None, run: ModelForward, cp_group, data_iterator: Any, model: nn.Module
):
    index, batch = next(data_iterator)
    batch = context_parallel_share(batch, cp_group)
    extra = hook(index) if hook is not None else None
    return run(model, batch), partial(lm_loss, batch["loss_mask"], extra, cp_group)


def forward_backward(
    model: nn.Module,
    micro_batches: Iterable[Batch],
    pgs: ProcessGroupCollection,
    *,
    num_micro_batches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    micro_batch_hook: MicroBatchHook | None = None,
    model_forward: ModelForward = lm_forward,
    p2p_batch_factor: int = 1,
) -> torch.Tensor | None:
    """Run megatron's schedule (no pipelining or 1F1B) over the micro-batches; gradients accumulate
    in ``.grad``/``main_grad``. Returns the token-mean loss on the last pipeline stage, else None.

    ``model_forward`` runs the model on one micro-batch (default: cross entropy);
    ``p2p_batch_factor``: the inter-stage tensor holds this many micro-batches' rows (2 for a
    student/teacher pair).
    """
    pp_size = pgs.pp.size()
    schedule = get_forward_backward_func(pp_size=pp_size)
    pipeline_kwargs = {}
    if pp_size > 1:
        pipeline_kwargs["p2p_communicator"] = P2PCommunicator(pgs.pp, get_model_config(model))
    reduced = schedule(
        forward_step_func=partial(_forward_step, micro_batch_hook, model_forward, pgs.cp),
        data_iterator=iter(enumerate(micro_batches)),
        model=model,
        num_microbatches=num_micro_batches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size * p2p_batch_factor,
        forward_only=forward_only,
        pg_collection=pgs,
        **pipeline_kwargs,
    )
    if not reduced:
        return None
    totals = torch.stack([r["lm loss"] for r in reduced]).sum(0)
    if pgs.cp.size() > 1:  # every CP rank of the last stage returns the whole micro-batches' mean
        dist.all_reduce(totals, group=pgs.cp)
    return totals[0] / totals[1]
