"""Process groups for one model replica: torch.distributed init (gloo on CPU, NCCL on GPU) and
megatron-core's model-parallel groups, returned as an explicit ``ProcessGroupCollection``.

Every ``init_process_groups`` is paired with one ``destroy_process_groups``. The groups are
held, not rebuilt: a caller that asks for the layout already initialised here shares those groups,
and only the last ``destroy_process_groups`` tears them down. A tool run in-process (a test, a
notebook, a driver that trains and then exports) therefore leaves its caller's groups, and every
model built on them, working."""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass
class _Held:
    """The groups this module initialised: their layout and how many callers hold them."""

    layout: tuple[int, ...] | None = None
    count: int = 0


_held = _Held()


def _layout(parallel: ParallelConfig) -> tuple[int, ...]:
    """What sharing requires to match (the timeout does not: the first caller's holds)."""
    return (
        parallel.tensor_parallel_size,
        parallel.pipeline_parallel_size,
        parallel.context_parallel_size,
        parallel.expert_model_parallel_size,
    )


def init_process_groups(parallel: ParallelConfig, *, seed: int = 1234) -> ProcessGroupCollection:
    """Initialise torch.distributed (from torchrun/SLURM env vars, or a single local process) and
    megatron-core's tensor/pipeline/data/context/expert-parallel groups (``pgs.ep``: the ranks
    sharing one layer's routed experts, ``pgs.expt_dp``: the replicas of one expert, over which
    megatron's DDP reduces expert gradients); seed the model-parallel RNG streams.

    Returns the process groups to pass explicitly to every model and helper. Groups of the same
    layout already initialised here are shared (and the RNG streams reseeded); another layout
    replaces them. Pair every call with ``destroy_process_groups``.
    """
    platform.apply()
    layout = _layout(parallel)
    if _held.count and _held.layout == layout and parallel_state.model_parallel_is_initialized():
        _held.count += 1
        pgs = ProcessGroupCollection.use_mpu_process_groups()
        _seed(pgs, seed)
        return pgs
    with console.drop_native_output():  # gloo reports each new group on stdout
        pgs = _init_process_groups(parallel, seed)
    _held.layout, _held.count = layout, 1
    return pgs


def _seed(pgs: ProcessGroupCollection, seed: int) -> None:
    platform.seed_model_parallel_rng(
        seed, tp_rank=pgs.tp.rank(), ep_rank=pgs.ep.rank(), etp_rank=pgs.expt_tp.rank()
    )


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
    _seed(pgs, seed)
    return pgs


def destroy_process_groups() -> None:
    """Release one ``init_process_groups``; the last release tears down megatron's groups and
    torch.distributed."""
    _held.count = max(0, _held.count - 1)
    if _held.count:
        return
    _held.layout = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
