"""megatron-core DDP, optimizer and LR schedule for a model chunk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import nn

__all__ = [
    "LR_SCHEDULES",
    "WSD_DECAY_STYLES",
    "OptimConfig",
    "build_lr_scheduler",
    "build_optimizer",
    "cast_parameters",
    "sync_params",
    "wrap_ddp",
]

LR_SCHEDULES = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}
"""``optim.lr_schedule`` -> megatron's ``OptimizerParamScheduler`` ``lr_decay_style``."""
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
"""megatron's ``lr_wsd_decay_style`` values (the shape of WSD's final decay)."""


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay (``cosine``, ``wsd``)."""
    warmup_steps: int = 10
    """Linear warmup from 0 to ``lr``."""
    total_steps: int = 1000
    """Steps of the schedule (warmup included)."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW)."""
    clip_grad: float = 1.0
    """Global gradient-norm clip."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (megatron's distributed optimizer:
    gradients reduce-scattered, updated parameters all-gathered)."""
    overlap_grad_reduce: bool = False
    """megatron's ``overlap_grad_reduce``: each gradient bucket's all-reduce (reduce-scatter with
    the distributed optimizer) starts in the backward of the last micro-batch, as soon as the
    bucket is complete, instead of after it. The same gradients; not with elastic budgets that
    skip layers (megatron starts a bucket when every parameter in it got its gradient)."""
    overlap_param_gather: bool = False
    """megatron's ``overlap_param_gather``: the distributed optimizer's parameter all-gather
    runs bucket by bucket in the next forward (forward pre-hooks) instead of after the step.
    Needs ``use_distributed_optimizer``."""
    ddp_bucket_size: int | None = None
    """Parameters per gradient-reduction bucket with ``overlap_grad_reduce`` (megatron's
    ``--ddp-bucket-size``); ``None``: megatron's default, max(40M, 1M x data-parallel size)."""
    lr_schedule: str = "cosine"
    """After the linear warmup: ``cosine`` (decay to ``min_lr`` over the rest of
    ``total_steps``), ``wsd`` (warmup-stable-decay: ``lr`` held, then a decay to ``min_lr`` over
    the last ``lr_decay_fraction`` of ``total_steps``, so a checkpoint taken before the decay is
    a point of the same curve as a shorter run's) or ``constant`` (``lr`` to the end). megatron's
    ``OptimizerParamScheduler`` computes all three."""
    lr_decay_fraction: float = 0.2
    """``wsd``: the fraction of ``total_steps`` the final decay takes (rounded to whole steps, at
    least one, at most the steps after warmup); unused by the other schedules."""
    lr_wsd_decay_style: str = "linear"
    """``wsd``: the shape of its final decay, megatron's ``lr_wsd_decay_style`` (``linear``,
    ``cosine``, ``exponential``, ``minus_sqrt``)."""

    def __post_init__(self) -> None:
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"OptimConfig needs 0 < min_lr <= lr, got {self.min_lr}, {self.lr}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(
                f"OptimConfig.warmup_steps={self.warmup_steps} must be in [0, total_steps="
                f"{self.total_steps})"
            )
        for name in ("use_distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"optim.{name} must be true or false, got {getattr(self, name)!r}")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError(
                "optim.overlap_param_gather needs optim.use_distributed_optimizer=true (only the "
                "distributed optimizer all-gathers parameters)"
            )
        size = self.ddp_bucket_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError(
                f"optim.ddp_bucket_size must be a positive integer or null, got {size!r}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"optim.lr_schedule={self.lr_schedule!r}; choose one of {tuple(LR_SCHEDULES)}"
            )
        fraction = self.lr_decay_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise ValueError(f"optim.lr_decay_fraction must be a number, got {fraction!r}")
        if not 0 < fraction <= 1:
            raise ValueError(
                f"optim.lr_decay_fraction must be in (0, 1] (0.2: decay over the last 20% of "
                f"the steps), got {fraction}"
            )
        if self.lr_wsd_decay_style not in WSD_DECAY_STYLES:
            raise ValueError(
                f"optim.lr_wsd_decay_style={self.lr_wsd_decay_style!r}; choose one of "
                f"{WSD_DECAY_STYLES}"
            )

    @property
    def wsd_decay_steps(self) -> int:
        """Steps of WSD's final decay: ``lr_decay_fraction`` of ``total_steps``, rounded, at
        least 1 and at most the steps after warmup."""
        steps = round(self.lr_decay_fraction * self.total_steps)
        return min(max(steps, 1), self.total_steps - self.warmup_steps)


def cast_parameters(model: nn.Module, params_dtype: torch.dtype) -> None:
    """Every floating-point parameter of ``model`` in ``params_dtype`` (in place), before DDP.

    megatron's Mamba mixer keeps ``A_log`` and ``D`` in fp32 whatever ``params_dtype`` says, and
    megatron's bf16 optimizer numbers the parameters of its checkpointed state over its bf16
    groups only: with fp32 parameters among them, saving fails on a shape mismatch. Megatron-LM's
    ``Float16Module`` casts the whole model likewise (the fp32 main weights keep the precision)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != params_dtype:
            param.data = param.data.to(params_dtype)


def wrap_ddp(
    model: nn.Module, pgs: ProcessGroupCollection, optim: OptimConfig
) -> DistributedDataParallel:
    """megatron's DDP (fp32 grad buffers; grads reduced across data-parallel ranks).

    With ``overlap_grad_reduce`` the pipeline schedules get the hooks Megatron-LM's training loop
    sets on the model config: ``no_sync_func`` (no bucket starts its reduction before the last
    micro-batch) and ``grad_sync_func`` (1F1B: every stage launches what is left at the end, as
    with megatron's default ``align_grad_reduce``). The caller still runs
    ``finalize_model_grads``, which waits for the reductions. With ``overlap_param_gather`` DDP
    registers its forward pre-hooks itself; :func:`sync_params` completes the gather when the
    parameters are read outside a forward (checkpoints)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=optim.overlap_grad_reduce,
        overlap_param_gather=optim.overlap_param_gather,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        bucket_size=optim.ddp_bucket_size,
    )
    ddp = DistributedDataParallel(
        config=model.config, ddp_config=ddp_config, module=model, pg_collection=pgs
    )
    if optim.overlap_grad_reduce:
        model.config.no_sync_func = ddp.no_sync
        model.config.grad_sync_func = ddp.start_grad_sync
    return ddp


def sync_params(ddp: DistributedDataParallel) -> None:
    """With ``overlap_param_gather`` the parameters updated by the last step are all-gathered in
    the next forward: gather them now (before a checkpoint reads them). A no-op otherwise."""
    if ddp.ddp_config.overlap_param_gather:
        with torch.no_grad():
            ddp.start_param_sync(force_sync=True)


def build_optimizer(
    ddp_model: nn.Module, optim: OptimConfig, *, params_dtype: torch.dtype = torch.float32
) -> tuple[object, OptimizerParamScheduler]:
    """megatron's Adam(W) optimizer and its learning-rate schedule: linear warmup, then
    ``optim.lr_schedule`` (cosine, warmup-stable-decay or constant)."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        clip_grad=optim.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        fp16=False,
        params_dtype=params_dtype,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        overlap_param_gather=optim.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(config, [ddp_model])
    return optimizer, build_lr_scheduler(optimizer, optim)


def build_lr_scheduler(optimizer: Any, optim: OptimConfig) -> OptimizerParamScheduler:
    """megatron's ``OptimizerParamScheduler`` for ``optim``'s schedule over ``optimizer``'s
    parameter groups (anything with ``param_groups``): ``lr`` and ``weight_decay`` set at step 0
    and at every ``step(1)``."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=optim.total_steps,
        lr_decay_style=LR_SCHEDULES[optim.lr_schedule],
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=optim.total_steps,
        wd_incr_style="constant",
        wsd_decay_steps=optim.wsd_decay_steps if optim.lr_schedule == "wsd" else None,
        lr_wsd_decay_style=optim.lr_wsd_decay_style if optim.lr_schedule == "wsd" else None,
    )
