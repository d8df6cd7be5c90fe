"""The mixture-of-experts layer kind (``E``) and its elastic axes (registered on import, after the
built-in ones of :mod:`~megatron_elastic.elastic.builtin_axes`, so their draw order is unchanged).

- ``moe_experts``: routed experts kept per layer. Kept experts are a prefix (within every expert
  group when the parent routes group-limited), and dropping an expert drops its row of the
  router's gate and its ``expert_bias`` entry: the kept experts are routed exactly as in a model
  pruned to them (top-k, renormalisation and scaling over the kept experts only). Top-k stays
  the parent's, so a size with fewer experts than ``moe_router_topk`` (or, group-limited, fewer
  than top-k within the selected groups) is refused with a ``ValueError``.
- ``moe_expert_ffn``: neurons kept in every kept routed expert (fc1 rows, fc2 columns; squared
  ReLU, not gated).
- ``moe_shared_ffn``: neurons kept in the shared expert; a parent without one has size 0 there and
  takes no candidates.

Both widths nest as the dense FFN's do: a prefix of every one of ``ElasticConfig.
ffn_nesting_blocks`` equal blocks (a multiple of the TP size), so under tensor parallelism (an
expert's neurons split over the expert-TP ranks, megatron's default expert TP = TP, the shared
expert column/row-parallel) every rank keeps the same number of each expert's neurons.

Candidates are given in ``ElasticConfig.choices`` under these names (no fields of their own).

Importance (issue 26 step 3) ranks from one statistic per ``E`` layer
(:mod:`~megatron_elastic.importance.calibration`), laid out ``[reap (E), routed (E), neurons
(E x F), shared (S)]``: per expert the sum over the tokens routed to it of its gate weight times
the norm of its output (REAP) and how many tokens it got; per expert neuron and shared neuron the
sum of |fc1 pre-activation|. Experts rank by REAP averaged over their tokens (a never-routed
expert scores 0); their routing frequency is reported beside it. Experts move with their gate
rows and ``expert_bias`` entries, neurons with their fc1 rows and fc2 columns: the permuted
parent computes the same function.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from megatron_elastic.config import ModelConfig, ParallelConfig
from megatron_elastic.elastic.axes import Axis, LayerKind, Number, Order, StateDict, register
from megatron_elastic.elastic.builtin_axes import argsort, block_interleave, take
from megatron_elastic.elastic.subnet import Index, ffn_indices
from megatron_elastic.model.param_count import moe_layer_active_params, moe_layer_params

if TYPE_CHECKING:
    from megatron_elastic.elastic.config import ElasticConfig

__all__ = [
    "MOE",
    "MOE_EXPERTS",
    "MOE_EXPERT_FFN",
    "MOE_SHARED_FFN",
    "MoEIndices",
    "deal_over_blocks",
    "expert_groups",
    "moe_indices",
    "routing_groups",
    "split_moe_stat",
]


def routing_groups(model: ModelConfig) -> int:
    """Group-limited routing picks experts within this many groups (1: not group-limited)."""
    return model.moe_router_num_groups if model.moe_router_group_topk else 1


def expert_groups(model: ModelConfig, elastic: ElasticConfig | None = None) -> int:
    """The blocks routed experts nest in: a size keeps the same prefix of each. The finest
    common split of the routing groups (group-limited routing picks experts within each) and
    ``ElasticConfig.moe_expert_nesting_blocks`` (each expert-parallel rank holds whole ones)."""
    blocks = elastic.moe_expert_nesting_blocks if elastic is not None else 1
    return math.lcm(routing_groups(model), blocks)


def _too_few_experts(size: int, model: ModelConfig) -> str | None:
    """Why ``size`` routed experts cannot serve the parent's top-k (``None``: they can)."""
    k = model.moe_router_topk
    if size < k:
        return (
            f"{size} routed experts is fewer than moe_router_topk={k} (top-k stays the "
            f"parent's); keep at least {k}"
        )
    group_topk = model.moe_router_group_topk
    if group_topk and k > group_topk * (size // routing_groups(model)):
        within = group_topk * (size // routing_groups(model))
        return (
            f"{size} routed experts leave {within} in the moe_router_group_topk={group_topk} "
            f"selected groups, fewer than moe_router_topk={k}; keep at least "
            f"{-(-k // group_topk) * routing_groups(model)}"
        )
    return None


def _check_experts(choices, model: ModelConfig, elastic, parallel: ParallelConfig) -> None:
    if not model.num_moe_experts:
        _no_moe_layer(choices, model, "moe_experts")
        return
    for size in choices:
        if size % expert_groups(model, elastic):
            continue  # the generic check names the groups
        why = _too_few_experts(size, model)
        if why is not None:
            raise ValueError(f"ElasticConfig choices['moe_experts']: {why}")


def _check_experts_layer(layer: int, size: int, model: ModelConfig) -> None:
    why = _too_few_experts(size, model)
    if why is not None:
        raise ValueError(f"layer {layer}: {why}")


def _no_moe_layer(choices, model: ModelConfig, name: str) -> None:
    if any(choices):
        raise ValueError(
            f"ElasticConfig choices[{name!r}]={list(choices)}: the parent "
            f"{model.hybrid_pattern!r} has no 'E' (mixture-of-experts) layers; remove them"
        )


def _ffn_blocks(model: ModelConfig, elastic: ElasticConfig | None) -> int:
    """Expert and shared-expert neurons nest in the dense FFN's blocks (a multiple of TP)."""
    return elastic.ffn_nesting_blocks if elastic is not None else 1


def _check_blocks_split(width: int, name: str, model: ModelConfig, elastic, parallel) -> None:
    """``ffn_nesting_blocks`` splits the expert (shared) width ``width``; the fix offered splits
    every FFN width of the parent and is a multiple of the TP size."""
    blocks, tp = elastic.ffn_nesting_blocks, parallel.tensor_parallel_size
    if width and width % blocks:
        shared = model.moe_shared_expert_intermediate_size or 0
        common = math.gcd(model.ffn_hidden_size, model.moe_ffn_hidden_size or 0, shared)
        fit = [b for b in range(tp, common + 1, tp) if common % b == 0]
        fix = max([b for b in fit if b <= blocks] or fit[:1] or [1])
        raise ValueError(
            f"ElasticConfig.ffn_nesting_blocks={blocks} must divide {name}={width} (expert and "
            f"shared-expert neurons nest per FFN nesting block, whole blocks per TP rank); use "
            f"ffn_nesting_blocks={fix}"
        )


def _check_expert_ffn(choices, model: ModelConfig, elastic, parallel) -> None:
    if not model.moe_ffn_hidden_size:
        _no_moe_layer(choices, model, "moe_expert_ffn")
    width = model.moe_ffn_hidden_size or 0
    _check_blocks_split(width, "moe_ffn_hidden_size", model, elastic, parallel)


def _check_shared(choices, model: ModelConfig, elastic, parallel) -> None:
    if not model.moe_shared_expert_intermediate_size and any(choices):
        raise ValueError(
            f"ElasticConfig choices['moe_shared_ffn']={list(choices)}: the parent has no shared "
            "expert (moe_shared_expert_intermediate_size is null); remove them"
        )
    shared = model.moe_shared_expert_intermediate_size or 0
    _check_blocks_split(shared, "moe_shared_expert_intermediate_size", model, elastic, parallel)


def split_moe_stat(stat: torch.Tensor, model: ModelConfig):
    """(REAP sums (E,), routed tokens (E,), expert neurons (E, F), shared neurons (S,))."""
    e, f = model.num_moe_experts, model.moe_ffn_hidden_size
    s = model.moe_shared_expert_intermediate_size or 0
    reap, routed, neurons, shared = stat.split([e, e, e * f, s])
    return reap, routed, neurons.view(e, f), shared


def _rank_experts(stat: torch.Tensor, model: ModelConfig, options: Mapping[str, Any]):
    """An expert: REAP, its gate weight times its output's norm averaged over the tokens routed
    to it, ranked within its routing group; among equal scores (0: dead or never routed) the less
    routed ranks lower (a never-routed expert changes nothing when dropped). With
    ``moe_expert_nesting_blocks`` (``options``) the ranking is dealt across the nesting blocks
    of its group (:func:`deal_over_blocks`), so each block's prefix holds the best experts and a
    size keeps the group's best. Reported with the fraction of tokens routed to it."""
    reap, routed, _, _ = split_moe_stat(stat, model)
    score = reap / routed.clamp(min=1)
    groups, per = routing_groups(model), model.num_moe_experts // routing_groups(model)
    blocks = math.lcm(groups, options.get("moe_expert_nesting_blocks") or 1) // groups

    def ranked(first: int) -> list[int]:  # ties (REAP 0): the less routed last
        local = sorted(range(per), key=lambda i: (-score[first + i], -routed[first + i], i))
        return deal_over_blocks(local, blocks)

    order = ranked(0) if groups == 1 else [ranked(g * per) for g in range(groups)]
    tokens = routed.sum() / model.moe_router_topk
    frequency = routed / tokens.clamp(min=1)
    return order, {"reap": score.tolist(), "frequency": frequency.tolist()}


def deal_over_blocks(ranked: Sequence[int], blocks: int) -> list[int]:
    """Lay a best-first ranking out over ``blocks`` equal blocks of consecutive positions as
    cards are dealt: the best first in block 0, the second best first in block 1, ..., so the
    first ``n`` positions of every block hold the ``n x blocks`` best (EP rank ``r`` holds blocks
    ``r x B/EP ...``: each rank keeps the same number, together the best)."""
    per = len(ranked) // blocks
    laid = [0] * len(ranked)
    for i, unit in enumerate(ranked):
        laid[(i % blocks) * per + i // blocks] = unit
    return laid


def _rank_expert_ffn(stat: torch.Tensor, model: ModelConfig, options: Mapping[str, Any]):
    """A routed expert's neuron: sum over its tokens of ``|X W1^T|``; each expert its own order."""
    _, _, neurons, _ = split_moe_stat(stat, model)
    return [argsort(n) for n in neurons], neurons.tolist()


def _rank_shared(stat: torch.Tensor, model: ModelConfig, options: Mapping[str, Any]):
    """A shared-expert neuron: sum over tokens of ``|X W1^T|``, as the FFN axis."""
    shared = split_moe_stat(stat, model)[3]
    return argsort(shared), shared.tolist()


def _expert_key(layer: int, e: int, fc: int) -> str:
    return f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_fc{fc}.weight"


def _permute_experts(sd: StateDict, model: ModelConfig, order: Order, layer: int, blocks: int):
    """Experts move (within their groups) with their gate rows and ``expert_bias`` entries."""
    if routing_groups(model) > 1:
        per = model.num_moe_experts // routing_groups(model)
        order = [g * per + i for g, local in enumerate(order) for i in local]
    p = f"decoder.layers.{layer}.mlp.router."
    for key in (p + "weight", p + "expert_bias"):
        if key in sd:
            sd[key] = take(sd[key], 0, order)
    old = {(e, fc): sd.pop(_expert_key(layer, e, fc)) for e in order for fc in (1, 2)}
    for i, e in enumerate(order):
        for fc in (1, 2):
            sd[_expert_key(layer, i, fc)] = old[e, fc]


def _permute_expert_ffn(sd: StateDict, model: ModelConfig, order: Order, layer: int, blocks):
    """Each expert's neurons move in its own order (experts stay in place), dealt round-robin
    over the FFN nesting blocks as the dense FFN's, so every block's prefix (hence every TP
    rank's share) holds its best neurons."""
    for e, neurons in enumerate(order):
        neurons = block_interleave(list(neurons), blocks)
        sd[_expert_key(layer, e, 1)] = take(sd[_expert_key(layer, e, 1)], 0, neurons)
        sd[_expert_key(layer, e, 2)] = take(sd[_expert_key(layer, e, 2)], 1, neurons)


def _permute_shared(sd: StateDict, model: ModelConfig, order: Order, layer: int, blocks: int):
    """The shared expert's neurons, dealt over the FFN nesting blocks as the dense FFN's."""
    order = block_interleave(list(order), blocks)
    p = f"decoder.layers.{layer}.mlp.shared_experts."
    sd[p + "linear_fc1.weight"] = take(sd[p + "linear_fc1.weight"], 0, order)
    sd[p + "linear_fc2.weight"] = take(sd[p + "linear_fc2.weight"], 1, order)


MOE_EXPERTS = Axis(
    name="moe_experts",
    kind="moe",
    full=lambda m: m.num_moe_experts or 0,
    label="routed experts",
    groups=expert_groups,
    unit="expert block",
    check=_check_experts,
    check_layer=_check_experts_layer,
    rank=_rank_experts,
    permute=_permute_experts,
)
MOE_EXPERT_FFN = Axis(
    name="moe_expert_ffn",
    kind="moe",
    full=lambda m: m.moe_ffn_hidden_size or 0,
    label="expert FFN neurons",
    groups=_ffn_blocks,
    unit="FFN nesting block",
    check=_check_expert_ffn,
    rank=_rank_expert_ffn,
    permute=_permute_expert_ffn,
)
MOE_SHARED_FFN = Axis(
    name="moe_shared_ffn",
    kind="moe",
    full=lambda m: m.moe_shared_expert_intermediate_size or 0,
    label="shared-expert FFN neurons",
    groups=_ffn_blocks,
    unit="FFN nesting block",
    check=_check_shared,
    rank=_rank_shared,
    permute=_permute_shared,
)


def _sizes(model: ModelConfig, s: Mapping[str, Number]) -> tuple[Number, Number, Number]:
    """(experts, expert FFN, shared FFN); an absent axis is the parent's size."""
    return tuple(
        s.get(a.name, a.full(model)) for a in (MOE_EXPERTS, MOE_EXPERT_FFN, MOE_SHARED_FFN)
    )


def _moe_params(model: ModelConfig, hidden: Number, s: Mapping[str, Number]) -> Number:
    """Every kept routed expert, their gate rows, the pre-norm and the shared expert."""
    return moe_layer_params(hidden, *_sizes(model, s))


def _moe_active_params(model: ModelConfig, hidden: Number, s: Mapping[str, Number]) -> Number:
    """What one token touches: the pre-norm, the kept experts' gate rows, its top-k kept experts
    (top-k stays the parent's) and the shared expert."""
    experts, ffn, shared = _sizes(model, s)
    return moe_layer_active_params(hidden, experts, model.moe_router_topk, ffn, shared)


def _moe_unit_weights(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per routed-expert neuron (expert-major: experts x expert neurons), then per shared-expert
    neuron: the shared expert's width does not nest within the routed experts."""
    experts, ffn, shared = vectors
    return torch.cat([(experts[:, None] * ffn[None, :]).flatten(), shared])


MOE = LayerKind(
    "moe",
    "E",
    ("moe_experts", "moe_expert_ffn", "moe_shared_ffn"),
    _moe_params,
    active_params=_moe_active_params,
    unit_weights=_moe_unit_weights,
    timed=False,
)


@dataclass(frozen=True)
class MoEIndices:
    """What one ``E`` layer keeps on one rank."""

    experts: tuple[int, ...]
    """Kept routed experts (the parent's numbering), in the sliced layer's order."""
    expert_ffn: Index
    """This rank's kept neurons of every kept routed expert (rows of its fc1 shard): a prefix
    of each of its FFN nesting blocks."""
    shared_ffn: Index
    """This rank's kept neurons of the shared expert (empty without one), likewise."""
    tp_size: int = 1
    """Tensor-parallel ranks the neurons are split over (expert TP = TP)."""


@lru_cache(maxsize=256)
def moe_indices(
    num_experts: int,
    groups: int,
    experts: int,
    expert_ffn: tuple[int, int],
    shared_ffn: tuple[int, int],
    blocks: int = 1,
    tp_size: int = 1,
) -> MoEIndices:
    """The experts (the same prefix of every one of ``groups`` expert groups, group-major, as
    :meth:`Axis.kept_units`) and this rank's kept neurons of each kept expert and of the shared
    expert (``(parent's width, kept width)``: a prefix of each of the rank's ``blocks / tp_size``
    FFN nesting blocks, :func:`~megatron_elastic.elastic.subnet.ffn_indices`)."""
    per_group, keep = num_experts // groups, experts // groups
    kept = tuple(g * per_group + j for g in range(groups) for j in range(keep))

    def neurons(full: int, active: int) -> Index:
        return ffn_indices(full, blocks, active, tp_size) if full else slice(0, 0)

    return MoEIndices(kept, neurons(*expert_ffn), neurons(*shared_ffn), tp_size)


# Registration order is the router's draw order and the order rankings are applied in: each
# expert's neurons are permuted (in the parent's expert numbering) before the experts move.
register(MOE, MOE_EXPERT_FFN, MOE_SHARED_FFN, MOE_EXPERTS)
