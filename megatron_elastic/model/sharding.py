"""Move weights between the full (TP=1, PP=1) layout and one rank's shard.

Which dimension a parameter is split along, and in which segments, is read from the attributes
megatron-core sets on it (``tensor_model_parallel``, ``partition_dim`` and, for the Mamba mixer's
packed ``in_proj``/``conv1d``, ``partition_sizes``): each segment is split across ranks separately,
so a TP shard of ``in_proj`` is ``[z_r, x_r, B_r, C_r, dt_r]``, not a contiguous slice.
Pipeline stages hold layers under local indices, and expert-parallel ranks their routed experts
(``local_experts.{i}`` of EP rank ``r`` is the parent's expert ``r x E/EP + i``);
:func:`global_parameter_names` maps both to the full model's names, so :func:`load_full_state_dict`
loads each rank's experts and :func:`gather_full_tensors` returns them under the parent's names
(experts are not gathered over EP ranks: each returns its own, as a pipeline stage its layers).
An expert's weights are split over the expert-tensor-parallel group (``pgs.expt_tp``, megatron's
expert parameters: ``allreduce=False``), every other split weight over ``pgs.tp``.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import nn

__all__ = [
    "gather_full_tensors",
    "global_parameter_names",
    "load_full_state_dict",
    "shard_tensor",
    "unshard_tensor",
]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"^(mlp\.experts\.local_experts\.)(\d+)(?=\.)")


def global_parameter_names(model: nn.Module) -> dict[str, str]:
    """Local parameter name -> name in the unsplit model (layer indices made global; under expert
    parallelism a rank's local expert ``i`` is the parent's expert ``first + i``)."""
    offsets = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    first_expert = {
        i: layer.mlp.local_expert_indices[0]
        for i, layer in enumerate(model.decoder.layers)
        if hasattr(getattr(layer, "mlp", None), "local_expert_indices")
    }
    names = {}
    for name, _ in model.named_parameters():
        match = _LAYER.match(name)
        if not match:
            names[name] = name
            continue
        local, rest = int(match.group(1)), name[match.end() :]
        expert = _LOCAL_EXPERT.match(rest)
        if expert and first_expert.get(local):
            number = first_expert[local] + int(expert.group(2))
            rest = f"{expert.group(1)}{number}{rest[expert.end() :]}"
        names[name] = f"decoder.layers.{offsets[local]}.{rest}"
    return names


def _segments(param: nn.Parameter, full_size: int, tp_size: int) -> list[int]:
    """Sizes of the full tensor's segments along the partition dim."""
    local_sizes = getattr(param, "partition_sizes", None)
    if local_sizes is None:
        return [full_size]
    return [s * tp_size for s in local_sizes]


def _is_split(param: nn.Parameter) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def _tp_group(param: nn.Parameter, pgs: ProcessGroupCollection) -> dist.ProcessGroup:
    """The group ``param`` is split over: expert TP for a routed expert's weights, else TP."""
    return pgs.expt_tp if not getattr(param, "allreduce", True) else pgs.tp


def shard_tensor(
    full: torch.Tensor, param: nn.Parameter, tp_rank: int, tp_size: int
) -> torch.Tensor:
    """This rank's shard of ``full`` for local parameter ``param``."""
    if not _is_split(param) or tp_size == 1:
        return full
    dim = param.partition_dim
    pieces = torch.split(full, _segments(param, full.size(dim), tp_size), dim=dim)
    return torch.cat([p.chunk(tp_size, dim=dim)[tp_rank] for p in pieces], dim=dim)


def unshard_tensor(shards: list[torch.Tensor], param: nn.Parameter) -> torch.Tensor:
    """Reassemble the full tensor from every TP rank's shard (rank order)."""
    tp_size = len(shards)
    if not _is_split(param) or tp_size == 1:
        return shards[0]
    dim = param.partition_dim
    local_sizes = getattr(param, "partition_sizes", None) or [shards[0].size(dim)]
    per_rank = [torch.split(s, local_sizes, dim=dim) for s in shards]
    return torch.cat(
        [torch.cat([r[i] for r in per_rank], dim=dim) for i in range(len(local_sizes))], dim=dim
    )


@torch.no_grad()
def load_full_state_dict(
    model: nn.Module, full: dict[str, torch.Tensor], pgs: ProcessGroupCollection
) -> None:
    """Copy this rank's shard of every parameter from a full (unsplit) state dict."""
    names = global_parameter_names(model)
    for name, param in model.named_parameters():
        key = names[name]
        if key not in full:
            raise KeyError(
                f"full state dict has no tensor {key!r} (needed by this rank's {name!r})"
            )
        group = _tp_group(param, pgs)
        shard = shard_tensor(full[key], param, group.rank(), group.size())
        if shard.shape != param.shape:
            raise ValueError(
                f"{key}: full tensor {tuple(full[key].shape)} gives shard {tuple(shard.shape)}, "
                f"but this rank's parameter is {tuple(param.shape)}"
            )
        param.copy_(shard)


def gather_full_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], pgs: ProcessGroupCollection
) -> dict[str, torch.Tensor]:
    """All-gather per-parameter tensors (weights or grads, keyed by local name) across the TP group
    (an expert's: the expert-TP group) and return them under global names, unsplit. Every TP rank
    gets the result."""
    names = global_parameter_names(model)
    params = dict(model.named_parameters())
    out = {}
    for name, tensor in tensors.items():
        param = params[name]
        group = _tp_group(param, pgs)
        if _is_split(param) and group.size() > 1:
            shards = [torch.empty_like(tensor) for _ in range(group.size())]
            dist.all_gather(shards, tensor.contiguous(), group=group)
            out[names[name]] = unshard_tensor(shards, param)
        else:
            out[names[name]] = tensor
    return out
