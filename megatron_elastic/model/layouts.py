"""megatron-core's fused weight layouts, stated once.

Two of megatron's weights pack several tensors along their output rows, and every module that
cuts, permutes, splits, converts or counts them reads the order from here:

- attention's ``linear_qkv`` (:class:`AttentionLayout`): per query group ``g``, the rows of its
  query heads, then its key head, then its value head (``[q_g..., k_g, v_g]``), groups one after
  another. TP splits it by whole groups: rank ``r`` holds a contiguous run of groups, so a shard
  is the same layout with ``num_groups / tp`` groups (:meth:`AttentionLayout.shard`).
- the Mamba mixer's ``in_proj`` (:class:`MambaLayout`): ``[z, x, B, C, dt]``, where the conv's
  channels ``[x, B, C]`` (``conv1d_weight`` / ``conv1d_bias`` rows) sit between ``z`` and ``dt``.
  TP packs it: every segment is split across ranks separately, so rank ``r``'s shard is
  ``[z_r, x_r, B_r, C_r, dt_r]`` (megatron's ``partition_sizes``), the same layout with
  ``num_heads / tp`` heads and ``num_groups / tp`` groups (:meth:`MambaLayout.shard`).

A layout is a table of named segments (:class:`Packed`); ``rows(...)`` lists the rows to keep
(each segment whole, or only the listed entries of it), ``split(...)`` cuts a tensor into its
segments. Everything else (the elastic slices, the importance permutation, the HF/GGUF
conversion, the serving forward, the parameter count) goes through these.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = ["AttentionLayout", "MambaLayout", "Packed"]


@dataclass(frozen=True)
class Packed:
    """One dimension made of named segments laid one after another: ``((name, size), ...)``."""

    segments: tuple[tuple[str, int], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.segments)

    @cached_property
    def sizes(self) -> list[int]:
        return [size for _, size in self.segments]

    @cached_property
    def size(self) -> int:
        return sum(self.sizes)

    def offset(self, name: str) -> int:
        """Where segment ``name`` starts."""
        start = 0
        for n, size in self.segments:
            if n == name:
                return start
            start += size
        raise KeyError(f"no segment {name!r} in {self.names}")

    def segment(self, t: torch.Tensor, name: str, dim: int = -1) -> torch.Tensor:
        """Segment ``name`` of ``t`` along ``dim`` (a view)."""
        assert t.size(dim) == self.size, f"{t.size(dim)} entries along dim {dim}, not {self.size}"
        return t.narrow(dim, self.offset(name), dict(self.segments)[name])

    def rows(self, **keep: Iterable[int]) -> list[int]:
        """Rows of the packed dimension, segment by segment: all of a segment's rows, or (for a
        segment named in ``keep``) only the listed entries of it, in the listed order."""
        unknown = set(keep) - set(self.names)
        assert not unknown, f"no segments {sorted(unknown)} in {self.names}"
        rows, start = [], 0
        for name, size in self.segments:
            rows += [start + i for i in keep[name]] if name in keep else range(start, start + size)
            start += size
        return rows

    def split(self, t: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, ...]:
        """``t`` cut along ``dim`` into its segments (views)."""
        assert t.size(dim) == self.size, f"{t.size(dim)} entries along dim {dim}, not {self.size}"
        return torch.split(t, self.sizes, dim=dim)


@dataclass(frozen=True)
class AttentionLayout:
    """megatron's fused ``linear_qkv`` rows (on one TP rank: its ``num_groups``)."""

    num_groups: int
    """Query groups (key/value heads)."""
    heads_per_group: int
    """Query heads of each group."""
    head_dim: int
    """Channels per head."""

    @classmethod
    def from_rows(cls, rows: int, num_groups: int, head_dim: int) -> AttentionLayout:
        """The layout of a ``linear_qkv`` of ``rows`` rows (its query heads read from its size);
        ``ValueError`` if the rows are no whole number of query groups."""
        per_group = rows // (num_groups * head_dim)  # query heads per group + k + v
        if rows != num_groups * per_group * head_dim or per_group < 3:
            raise ValueError(
                f"linear_qkv has {rows} rows, not a whole number of query groups "
                f"({num_groups} groups x (heads + 2) x head_dim {head_dim})"
            )
        return cls(num_groups, per_group - 2, head_dim)

    @property
    def num_heads(self) -> int:
        return self.num_groups * self.heads_per_group

    @cached_property
    def group(self) -> Packed:
        """The rows of one query group."""
        d = self.head_dim
        return Packed((("q", self.heads_per_group * d), ("k", d), ("v", d)))

    @property
    def size(self) -> int:
        """Rows of the whole weight."""
        return self.num_groups * self.group.size

    @staticmethod
    def head_rows(num_heads: int, num_groups: int) -> int:
        """The weight's rows in heads (``size / head_dim``): every query head, and a key and a
        value head per group. Also for expected (tensor) head counts."""
        return num_heads + 2 * num_groups

    def shard(self, tp_size: int) -> AttentionLayout:
        """The layout of one TP rank's shard (a contiguous run of whole groups)."""
        assert self.num_groups % tp_size == 0, f"{self.num_groups} groups over TP {tp_size}"
        return AttentionLayout(self.num_groups // tp_size, self.heads_per_group, self.head_dim)

    def heads(self, orders: Sequence[Iterable[int]]) -> list[int]:
        """Query heads (indices over all groups) of ``orders[g]`` (heads local to group g)."""
        assert len(orders) == self.num_groups, f"{len(orders)} orders for {self.num_groups} groups"
        return [g * self.heads_per_group + h for g, order in enumerate(orders) for h in order]

    def rows(self, orders: Sequence[Iterable[int]]) -> list[int]:
        """``linear_qkv`` rows that keep, in every group g, the query heads ``orders[g]`` (local
        to the group, in that order) and the group's key and value."""
        assert len(orders) == self.num_groups, f"{len(orders)} orders for {self.num_groups} groups"
        d, group, rows = self.head_dim, self.group, []
        for g, order in enumerate(orders):
            q = [h * d + c for h in order for c in range(d)]
            rows += [g * group.size + r for r in group.rows(q=q)]
        return rows

    def proj_cols(self, orders: Sequence[Iterable[int]]) -> list[int]:
        """``linear_proj`` columns (the attention output, heads group-major) of the same heads."""
        d = self.head_dim
        return [h * d + c for h in self.heads(orders) for c in range(d)]

    def split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A ``(rows, ...)`` weight -> q ``(heads * d, ...)`` (heads group-major), k and v
        ``(groups * d, ...)``."""
        grouped = t.reshape(self.num_groups, self.group.size, *t.shape[1:])
        return tuple(s.flatten(0, 1) for s in self.group.split(grouped, dim=1))

    def fuse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`split`."""
        parts = [s.reshape(self.num_groups, -1, *s.shape[1:]) for s in (q, k, v)]
        return torch.cat(parts, dim=1).flatten(0, 1)

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``(..., rows)`` output of ``linear_qkv`` -> q ``(..., heads, d)``, k and v
        ``(..., groups, d)``."""
        group = self.group
        q, k, v = torch.split(
            qkv.view(*qkv.shape[:-1], self.num_groups, group.size), group.sizes, -1
        )
        return q.reshape(*q.shape[:-2], self.num_heads, self.head_dim), k, v


@dataclass(frozen=True)
class MambaLayout:
    """The Mamba mixer's packed ``in_proj`` rows and conv channels (on one TP rank: its heads
    and groups). Sizes may be tensors of expected sizes in :attr:`in_proj_size` /
    :attr:`conv_size` (the parameter count's router loss)."""

    num_heads: int
    head_dim: int
    """Channels per head."""
    num_groups: int
    """B/C groups."""
    state_dim: int

    @classmethod
    def from_conv(
        cls, channels: int, num_heads: int, num_groups: int, state_dim: int
    ) -> MambaLayout:
        """The layout of a mixer whose conv has ``channels`` channels and ``num_heads`` heads."""
        inner = channels - 2 * num_groups * state_dim
        assert inner % num_heads == 0, f"{inner} x channels for {num_heads} heads"
        return cls(num_heads, inner // num_heads, num_groups, state_dim)

    @property
    def inner(self) -> int:
        """Channels of z / x / the SSM output (``d_inner``)."""
        return self.num_heads * self.head_dim

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups

    @cached_property
    def conv(self) -> Packed:
        """Channels of ``conv1d_weight`` / ``conv1d_bias``: ``[x, B, C]``."""
        gn = self.num_groups * self.state_dim
        return Packed((("x", self.inner), ("B", gn), ("C", gn)))

    @cached_property
    def in_proj(self) -> Packed:
        """Rows of ``in_proj``: ``[z, x, B, C, dt]`` (the conv's channels between z and dt)."""
        return Packed((("z", self.inner), *self.conv.segments, ("dt", self.num_heads)))

    @property
    def in_proj_size(self) -> int:
        """``in_proj.size``, in arithmetic that also takes (expected) tensor sizes."""
        return 2 * self.inner + 2 * self.num_groups * self.state_dim + self.num_heads

    @property
    def conv_size(self) -> int:
        """``conv.size``, in arithmetic that also takes (expected) tensor sizes."""
        return self.inner + 2 * self.num_groups * self.state_dim

    def shard(self, tp_size: int) -> MambaLayout:
        """The layout of one TP rank's shard (every segment split across ranks separately)."""
        assert self.num_groups % tp_size == 0, f"{self.num_groups} groups over TP {tp_size}"
        return MambaLayout(
            self.num_heads // tp_size, self.head_dim, self.num_groups // tp_size, self.state_dim
        )

    def shard_rows(self, packed: Packed, tp_rank: int, tp_size: int) -> list[int]:
        """Rows of the full ``packed`` (``self.in_proj`` or ``self.conv``) that TP rank
        ``tp_rank`` holds, in its shard's order."""
        keep = {
            n: range(s // tp_size * tp_rank, s // tp_size * (tp_rank + 1))
            for n, s in packed.segments
        }
        return packed.rows(**keep)

    def heads(self, orders: Sequence[Iterable[int]]) -> list[int]:
        """Heads (indices over all groups) of ``orders[g]`` (heads local to group g)."""
        assert len(orders) == self.num_groups, f"{len(orders)} orders for {self.num_groups} groups"
        return [g * self.heads_per_group + h for g, order in enumerate(orders) for h in order]

    def channels(self, heads: Iterable[int], channels: Iterable[int]) -> list[int]:
        """Channels of z / x / the SSM output of ``heads``, each head's ``channels``."""
        channels = list(channels)
        return [h * self.head_dim + c for h in heads for c in channels]

    def in_proj_rows(self, heads: Iterable[int], channels: Iterable[int]) -> list[int]:
        """``in_proj`` rows of ``heads`` (each head's ``channels``), all of B and C."""
        heads = list(heads)
        inner = self.channels(heads, channels)
        return self.in_proj.rows(z=inner, x=inner, dt=heads)

    def conv_rows(self, heads: Iterable[int], channels: Iterable[int]) -> list[int]:
        """Conv channels of ``heads`` (each head's ``channels``), all of B and C."""
        return self.conv.rows(x=self.channels(heads, channels))

    @cached_property
    def _z_conv_dt(self) -> list[int]:
        return [self.in_proj.sizes[0], self.conv.size, self.in_proj.sizes[-1]]

    def split_in_proj(
        self, zxbcdt: torch.Tensor, dim: int = -1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``in_proj``'s output -> z, the conv's input ``[x, B, C]``, dt (views)."""
        return torch.split(zxbcdt, self._z_conv_dt, dim=dim)

    def split_conv(
        self, xbc: torch.Tensor, dim: int = -1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The conv's channels -> x, B, C."""
        return self.conv.split(xbc, dim)
