"""One forward/backward over micro-batches through megatron-core's pipeline schedules."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_model_config
from torch import nn

__all__ = [
    "Batch",
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
    loss_mask: torch.Tensor, extra_loss: torch.Tensor | None, per_token_loss: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Masked token-summed cross entropy (+ ``extra_loss``, e.g. the router's budget loss, counted
    once per micro-batch), the token count, and both for logging. megatron's 3-tuple loss
    contract: the schedule divides the first by the token count."""
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum()
    logged = {"lm loss": torch.stack([loss_sum.detach(), num_tokens])}
    if extra_loss is not None:
        loss_sum = loss_sum + extra_loss * num_tokens.clamp(min=1)
        logged["extra loss"] = torch.stack([extra_loss.detach(), torch.ones_like(num_tokens)])
    return loss_sum, num_tokens.to(torch.int), logged


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
    hook: MicroBatchHook | None, run: ModelForward, data_iterator: Any, model: nn.Module
):
    index, batch = next(data_iterator)
    extra = hook(index) if hook is not None else None
    return run(model, batch), partial(lm_loss, batch["loss_mask"], extra)


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
        forward_step_func=partial(_forward_step, micro_batch_hook, model_forward),
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
    return totals[0] / totals[1]
