"""Process groups for one model replica: torch.distributed init (gloo on CPU, NCCL on GPU) and
megatron-core's model-parallel groups, returned as an explicit ``ProcessGroupCollection``."""

from __future__ import annotations

import datetime
import math
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_elastic import console, platform
from megatron_elastic.config import ParallelConfig

__all__ = ["destroy_process_groups", "init_process_groups"]


def init_process_groups(parallel: ParallelConfig, *, seed: int = 1234) -> ProcessGroupCollection:
    """Initialise torch.distributed (from torchrun/SLURM env vars, or a single local process) and
    megatron-core's tensor/pipeline/data/context/expert-parallel groups (``pgs.ep``: the ranks
    sharing one layer's routed experts, ``pgs.expt_dp``: the replicas of one expert, over which
    megatron's DDP reduces expert gradients); seed the model-parallel RNG streams.

    Returns the process groups to pass explicitly to every model and helper.
    """
    platform.apply()
    with console.drop_native_output():  # gloo reports each new group on stdout
        return _init_process_groups(parallel, seed)


def _init_process_groups(parallel: ParallelConfig, seed: int) -> ProcessGroupCollection:
    if not dist.is_initialized():
        backend = "nccl" if platform.cuda_available() else "gloo"
        timeout = datetime.timedelta(minutes=parallel.distributed_timeout_minutes)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if platform.cuda_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(
                backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    world = dist.get_world_size()
    model_parallel = parallel.model_parallel_size
    if world % model_parallel != 0:
        raise ValueError(
            f"world size {world} is not a multiple of tensor_parallel_size x "
            f"pipeline_parallel_size x context_parallel_size = {model_parallel}; launch a "
            f"multiple of {model_parallel} processes"
        )
    ep = parallel.expert_model_parallel_size
    data_context = world // (parallel.tensor_parallel_size * parallel.pipeline_parallel_size)
    if data_context % ep:
        raise ValueError(
            f"ParallelConfig.expert_model_parallel_size={ep} must divide the {data_context} data x "
            f"context parallel ranks of a world of {world} (EP is carved from them); launch a "
            f"multiple of {world // data_context * math.lcm(ep, parallel.context_parallel_size)} "
            f"processes or choose an EP dividing {data_context}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        # experts split over EP ranks; within an expert, megatron's default expert-TP (= TP)
        expert_model_parallel_size=ep,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    platform.seed_model_parallel_rng(
        seed, tp_rank=pgs.tp.rank(), ep_rank=pgs.ep.rank(), etp_rank=pgs.expt_tp.rank()
    )
    return pgs


def destroy_process_groups() -> None:
    """Tear down megatron's groups and torch.distributed (tests and tools that re-initialise)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
