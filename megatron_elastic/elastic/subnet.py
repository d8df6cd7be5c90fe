"""The active architecture of one forward pass, and the channel indices it keeps on each rank.

A :class:`SubnetSpec` lists the embedding width and, per layer, whether it runs and its width
(attention query heads, Mamba heads and head dim, FFN neurons). Sizes are totals over the tensor-
parallel group; :mod:`indices <megatron_elastic.elastic.subnet>` turn them into the rows/columns
each rank keeps: heads are a prefix *within every query/Mamba group*, head channels a prefix within
every head, FFN neurons a prefix within every nesting block, hidden a prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from megatron_elastic.config import ModelConfig
from megatron_elastic.elastic import axes as registry
from megatron_elastic.elastic.config import ElasticConfig
from megatron_elastic.model.layouts import AttentionLayout, MambaLayout

__all__ = [
    "LayerChoice",
    "SubnetSpec",
    "Index",
    "take",
    "attention_indices",
    "mamba_indices",
    "ffn_indices",
]


@dataclass(frozen=True)
class LayerChoice:
    """One layer's part of a sub-network."""

    kind: str
    """The layer kind (``mamba``, ``attention``, ``mlp``; :mod:`~megatron_elastic.elastic.axes`)."""
    sizes: tuple[tuple[str, int], ...]
    """``(axis, size)`` for every axis of the kind, outermost first (totals over TP ranks)."""
    active: bool = True
    """False: the layer is skipped (its input passes through the residual)."""

    def size(self, axis: str) -> int:
        """This layer's size on ``axis`` (``ValueError`` if the axis does not size its kind)."""
        for name, value in self.sizes:
            if name == axis:
                return value
        raise ValueError(f"a {self.kind} layer has no {axis!r} axis")

    def with_size(self, axis: str, size: int) -> LayerChoice:
        """This choice with ``axis`` set to ``size``."""
        self.size(axis)  # (ValueError for an axis of another kind)
        return replace(self, sizes=tuple((a, size if a == axis else v) for a, v in self.sizes))

    @property
    def width(self) -> int:
        """The size of the kind's outermost axis: attention query heads, Mamba heads, FFN
        neurons."""
        return self.sizes[0][1]

    @property
    def head_dim(self) -> int:
        """Mamba channels per head (0 for other kinds): the Mamba layer code's second size."""
        return dict(self.sizes).get("mamba_head_dim", 0)


@dataclass(frozen=True)
class SubnetSpec:
    """The sub-network one forward pass runs."""

    hidden: int
    layers: tuple[LayerChoice, ...]

    @classmethod
    def full(cls, model: ModelConfig) -> SubnetSpec:
        """The parent itself."""
        return cls.homogeneous(model)

    @classmethod
    def homogeneous(
        cls,
        model: ModelConfig,
        *,
        hidden: int | None = None,
        depth: int | None = None,
        layer_ranking: Sequence[int] | None = None,
        **sizes: int | None,
    ) -> SubnetSpec:
        """One choice per axis, by axis name (``None`` or absent = the parent's size)."""
        n = model.num_layers
        per_layer = {name: [size] * n for name, size in sizes.items() if size is not None}
        return cls.heterogeneous(
            model, hidden=hidden, active=_active_layers(n, depth, layer_ranking), **per_layer
        )

    @classmethod
    def heterogeneous(
        cls,
        model: ModelConfig,
        *,
        hidden: int | None = None,
        active: Sequence[bool] | None = None,
        **sizes: Sequence[int],
    ) -> SubnetSpec:
        """Per-layer choices by axis name: each list has one entry per layer (entries for layers
        of other kinds are ignored); an absent axis is the parent's size."""
        n = model.num_layers
        per_layer = {a.name for a in registry.axes() if a.per_layer}
        unknown = set(sizes) - per_layer
        if unknown:
            raise ValueError(
                f"unknown per-layer axes {sorted(unknown)}; axes are {sorted(per_layer)}"
            )
        for name, values in sizes.items():
            if len(values) != n:
                raise ValueError(f"{name} needs one entry per layer ({n}), got {len(values)}")
        active = [True] * n if active is None else list(active)
        layers = []
        for i, kind in enumerate(model.layer_kinds()):
            chosen = tuple(
                (a.name, sizes[a.name][i] if a.name in sizes else a.full(model))
                for a in registry.kind_axes(kind)
            )
            layers.append(LayerChoice(kind, chosen, active[i]))
        return cls(hidden or model.hidden_size, tuple(layers))

    def with_depth(self, depth: int, layer_ranking: Sequence[int] | None = None) -> SubnetSpec:
        active = _active_layers(len(self.layers), depth, layer_ranking)
        return replace(
            self,
            layers=tuple(replace(c, active=a) for c, a in zip(self.layers, active, strict=True)),
        )

    @property
    def depth(self) -> int:
        return sum(c.active for c in self.layers)

    def is_full(self, model: ModelConfig) -> bool:
        return self == SubnetSpec.full(model)

    def layer_is_full(self, model: ModelConfig, index: int) -> bool:
        return self.layers[index] == SubnetSpec.full(model).layers[index]

    def validate(self, model: ModelConfig, elastic: ElasticConfig | None = None) -> None:
        """Raise ``ValueError`` for a spec the parent cannot run (sizes above the parent's, head
        counts that break groups, FFN widths that break the nesting blocks)."""
        if len(self.layers) != model.num_layers:
            raise ValueError(f"spec has {len(self.layers)} layers, the parent {model.num_layers}")
        if not 0 < self.hidden <= model.hidden_size:
            raise ValueError(f"hidden={self.hidden} must be in [1, {model.hidden_size}]")
        for i, (c, kind) in enumerate(zip(self.layers, model.layer_kinds(), strict=True)):
            if c.kind != kind:
                raise ValueError(f"layer {i} is {kind}, the spec says {c.kind}")
            axes = registry.kind_axes(kind)
            if tuple(name for name, _ in c.sizes) != tuple(a.name for a in axes):
                raise ValueError(
                    f"layer {i}: sizes {c.sizes} are not those of a {kind} layer's axes "
                    f"{[a.name for a in axes]}"
                )
            for a, (_, size) in zip(axes, c.sizes, strict=True):
                a.validate_layer(i, size, model, elastic)
        if self.depth == 0:
            raise ValueError("spec skips every layer; keep at least one")


def _active_layers(n: int, depth: int | None, ranking: Sequence[int] | None) -> list[bool]:
    if depth is None or depth == n:
        return [True] * n
    if not 0 < depth <= n:
        raise ValueError(f"depth={depth} must be in [1, {n}]")
    order = list(ranking) if ranking is not None else list(range(n))
    keep = set(order[:depth])
    return [i in keep for i in range(n)]


# ---- indices each TP rank keeps -------------------------------------------------------------

Index = torch.Tensor | slice
"""Rows/columns to keep: a ``slice`` when they are contiguous (a view, no copy), else a tensor."""


def take(t: torch.Tensor, dim: int, idx: Index) -> torch.Tensor:
    if isinstance(idx, slice):
        return t[(slice(None),) * dim + (idx,)]
    return t.index_select(dim, idx.to(t.device))


def _as_index(rows: list[int]) -> Index:
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.long)


@dataclass(frozen=True)
class AttentionIndices:
    qkv_rows: Index  # rows of this rank's linear_qkv weight
    proj_cols: Index  # columns of this rank's linear_proj weight
    heads_per_group: int  # active query heads per group


@lru_cache(maxsize=256)
def attention_indices(
    num_heads: int, num_groups: int, head_dim: int, active_heads: int, tp_size: int
) -> AttentionIndices:
    """The first ``active_heads / num_groups`` query heads of every group of this rank's shard
    (:class:`~megatron_elastic.model.layouts.AttentionLayout`)."""
    local = AttentionLayout(num_groups, num_heads // num_groups, head_dim).shard(tp_size)
    a = active_heads // num_groups
    orders = [range(a)] * local.num_groups
    return AttentionIndices(_as_index(local.rows(orders)), _as_index(local.proj_cols(orders)), a)


@dataclass(frozen=True)
class MambaIndices:
    in_proj_rows: Index  # rows of this rank's in_proj
    conv_channels: Index  # channels of conv1d
    heads: Index  # entries of dt_bias / A_log / D
    inner: Index  # channels of z / x / y / norm.weight / out_proj columns
    num_heads: int  # active heads on this rank
    heads_per_group: int
    head_dim: int


@lru_cache(maxsize=256)
def mamba_indices(
    num_heads: int,
    num_groups: int,
    head_dim: int,
    state_dim: int,
    active_heads: int,
    active_head_dim: int,
    tp_size: int,
) -> MambaIndices:
    """The first ``active_heads / num_groups`` heads of every group of this rank's shard, the
    first ``active_head_dim`` channels of each (:class:`~megatron_elastic.model.layouts.
    MambaLayout`)."""
    local = MambaLayout(num_heads, head_dim, num_groups, state_dim).shard(tp_size)
    a = active_heads // num_groups
    heads = local.heads([range(a)] * local.num_groups)
    channels = range(active_head_dim)
    inner = local.channels(heads, channels)
    rows, conv = local.in_proj_rows(heads, channels), local.conv_rows(heads, channels)
    return MambaIndices(
        _as_index(rows),
        _as_index(conv),
        _as_index(heads),
        _as_index(inner),
        len(heads),
        a,
        active_head_dim,
    )


@lru_cache(maxsize=256)
def ffn_indices(ffn: int, blocks: int, active: int, tp_size: int) -> Index:
    """Neurons kept on one rank: a prefix of each of its ``blocks / tp_size`` nesting blocks."""
    size, keep = ffn // blocks, active // blocks
    return _as_index([b * size + j for b in range(blocks // tp_size) for j in range(keep)])
