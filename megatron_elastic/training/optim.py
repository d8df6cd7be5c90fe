"""megatron-core DDP, optimizer and LR schedule for a model chunk."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import nn

__all__ = ["OptimConfig", "build_optimizer", "cast_parameters", "wrap_ddp"]


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 10
    """Linear warmup from 0 to ``lr``."""
    total_steps: int = 1000
    """Steps of the schedule (warmup included)."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW)."""
    clip_grad: float = 1.0
    """Global gradient-norm clip."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (megatron's distributed optimizer)."""

    def __post_init__(self) -> None:
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"OptimConfig needs 0 < min_lr <= lr, got {self.min_lr}, {self.lr}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(
                f"OptimConfig.warmup_steps={self.warmup_steps} must be in [0, total_steps="
                f"{self.total_steps})"
            )


def cast_parameters(model: nn.Module, params_dtype: torch.dtype) -> None:
    """Every floating-point parameter of ``model`` in ``params_dtype`` (in place), before DDP.

    megatron's Mamba mixer keeps ``A_log`` and ``D`` in fp32 whatever ``params_dtype`` says, and
    megatron's bf16 optimizer numbers the parameters of its checkpointed state over its bf16
    groups only: with fp32 parameters among them, saving fails on a shape mismatch. Megatron-LM's
    ``Float16Module`` casts the whole model likewise (the fp32 main weights keep the precision)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != params_dtype:
            param.data = param.data.to(params_dtype)


def wrap_ddp(model: nn.Module, pgs: ProcessGroupCollection, optim: OptimConfig) -> nn.Module:
    """megatron's DDP (fp32 grad buffers; grads reduced across data-parallel ranks)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )
    return DistributedDataParallel(
        config=model.config, ddp_config=ddp_config, module=model, pg_collection=pgs
    )


def build_optimizer(
    ddp_model: nn.Module, optim: OptimConfig, *, params_dtype: torch.dtype = torch.float32
) -> tuple[object, OptimizerParamScheduler]:
    """megatron's Adam(W) optimizer and its warmup + cosine schedule."""
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
    )
    optimizer = get_megatron_optimizer(config, [ddp_model])
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=optim.total_steps,
        lr_decay_style="cosine",
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=optim.total_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
