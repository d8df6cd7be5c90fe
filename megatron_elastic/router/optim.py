"""Optimising the routers: AdamW with linear warmup, and gradient reduction across ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import nn

from megatron_elastic.router.config import RouterConfig

__all__ = [
    "build_router_optimizer",
    "finalize_router_grads",
    "fit_to_budgets",
    "reduce_router_grads",
]


def build_router_optimizer(
    router: nn.Module, config: RouterConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the router's parameters at ``config.lr`` with ``config.warmup_steps`` of linear
    warmup (call ``scheduler.step()`` after each ``optimizer.step()``).

    No weight decay: the logits must be free to grow sharp as the choices settle.
    """
    optimizer = torch.optim.AdamW(router.parameters(), lr=config.lr, weight_decay=0.0)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
    return optimizer, scheduler


def fit_to_budgets(router: nn.Module, steps: int) -> None:
    """Train ``router`` (an :class:`~megatron_elastic.router.ElasticRouter`) on its budget loss
    alone, the model frozen: every trained budget each step, with the router's optimizer, warmup
    and annealing schedules. What benchmarks and tests use to give each budget its own
    architecture without a training run (``benchmarks/bench_router_targets.py`` measures how
    close to its target each one lands)."""
    optimizer, scheduler = build_router_optimizer(router, router.config)
    for step in range(steps):
        loss = sum(
            router.budget_loss(router.decide(name, step, router.config.generator(step, i)))
            for i, name in enumerate(router.encoding.names)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def reduce_router_grads(
    router: nn.Module, group: dist.ProcessGroup | None, *, average: bool = True
) -> None:
    """All-reduce the router's gradients over ``group`` in one flat buffer, in place.

    The router is replicated on every rank and must stay identical, so every rank must apply the
    same gradient. ``average=True`` (default) is for data-parallel replicas: each holds the full
    gradient of its own micro-batches, and averaging keeps the router's step independent of the
    data-parallel size, like megatron's averaged model gradients (the budget loss, the same on
    every replica, is left unchanged). ``average=False`` sums, for tensor/pipeline-parallel ranks
    whose task-loss gradients are partial (each sees only its share of the heads and layers);
    there the budget loss must be added on one rank of the group only.

    No-op for ``group=None`` or a group of one rank. Missing gradients count as zeros, so every
    rank contributes buffers of the same size.
    """
    if group is None or dist.get_world_size(group) == 1:
        return
    params = [p for p in router.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)  # gloo has no AVG
    if average:
        flat /= dist.get_world_size(group)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def finalize_router_grads(router: nn.Module, pgs: ProcessGroupCollection) -> None:
    """Make the router's gradients the single-process gradients on every rank, in place.

    Tensor parallel: nothing to do (the elastic model all-reduces the gradients of router weights
    that multiply TP-sharded activations, or under sequence parallelism TP-split tokens, so they
    are complete on every TP rank). Pipeline parallel: each stage holds the gradient of its own
    layers: summed (the budget loss is added on the last stage only). Data and context parallel:
    averaged over both, like megatron's model gradients (a CP rank's task loss is scaled by CP,
    see :func:`~megatron_elastic.training.lm_step.lm_loss`, and its budget loss is not).
    """
    reduce_router_grads(router, pgs.pp, average=False)
    reduce_router_grads(router, pgs.dp_cp, average=True)
