"""How much two importance rankings agree, axis by axis: Spearman's rho and Kendall's tau between
the orders two backends give the same components (pure torch, no megatron).

An order lists components most-important-first; two orders of the same components are compared
through each component's position in both. Axes made of several independent orders (FFN neurons
per layer, heads per layer and group) report the mean over those orders and the worst one. Orders
of fewer than two components carry no information and are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from megatron_elastic.elastic.axes import axes
from megatron_elastic.importance.scores import Ranking

__all__ = ["AxisAgreement", "kendall_tau", "ranking_agreement", "spearman_rho"]

Order = Sequence[int] | torch.Tensor


def _positions(a: Order, b: Order) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of every component in ``a`` and in ``b`` (indexed by component)."""
    a = torch.as_tensor(a, dtype=torch.long).flatten()
    b = torch.as_tensor(b, dtype=torch.long).flatten()
    if a.numel() != b.numel() or not torch.equal(a.sort().values, b.sort().values):
        raise ValueError("the two orders must rank the same components (each exactly once)")
    if a.numel() and not torch.equal(a.sort().values, torch.unique(a)):
        raise ValueError("an order lists a component more than once")
    items = a.sort().values
    pos_a = torch.empty(a.numel(), dtype=torch.long)
    pos_b = torch.empty(b.numel(), dtype=torch.long)
    pos_a[torch.searchsorted(items, a)] = torch.arange(a.numel())
    pos_b[torch.searchsorted(items, b)] = torch.arange(b.numel())
    return pos_a, pos_b


def spearman_rho(a: Order, b: Order) -> float:
    """Spearman's rank correlation of two orders of the same components (1: identical, -1:
    reversed; ``nan`` for fewer than two components). Orders have no ties, so
    ``rho = 1 - 6 sum d^2 / (n (n^2 - 1))``."""
    pos_a, pos_b = _positions(a, b)
    n = pos_a.numel()
    if n < 2:
        return float("nan")
    d2 = (pos_a - pos_b).double().pow(2).sum()
    return float(1.0 - 6.0 * d2 / (n * (n * n - 1.0)))


def kendall_tau(a: Order, b: Order, *, max_block: int = 1 << 22) -> float:
    """Kendall's tau of two orders of the same components: (concordant - discordant pairs) /
    pairs (``nan`` for fewer than two components). Counts pairs in row blocks of at most
    ``max_block`` comparisons, so a 20k-neuron FFN layer fits in a few MB."""
    pos_a, pos_b = _positions(a, b)
    n = pos_a.numel()
    if n < 2:
        return float("nan")
    rows = max(1, max_block // n)
    total = 0
    for start in range(0, n, rows):
        da = torch.sign(pos_a[start : start + rows, None] - pos_a[None, :])  # (rows, n)
        db = torch.sign(pos_b[start : start + rows, None] - pos_b[None, :])
        total += int((da * db).sum())
    return total / (n * (n - 1))  # every unordered pair was counted twice


@dataclass(frozen=True)
class AxisAgreement:
    """Agreement of two rankings on one axis."""

    spearman: float
    """Mean Spearman's rho over the axis's orders."""
    kendall: float
    """Mean Kendall's tau over the axis's orders."""
    min_spearman: float
    """The worst order's Spearman's rho."""
    num_orders: int
    """How many orders (layers, or layer x group) the means are over."""


def _axis_orders(a: Ranking, b: Ranking) -> Iterator[tuple[str, list, list]]:
    yield "hidden", a.hidden, b.hidden
    for axis in axes():
        if not axis.per_layer:
            continue
        da, db = a.orders.get(axis.name, {}), b.orders.get(axis.name, {})
        if da.keys() != db.keys():
            raise ValueError(f"the rankings cover different {axis.key} layers")
        for j in sorted(da):
            grouped = bool(da[j]) and isinstance(da[j][0], list)
            if not grouped:
                yield axis.key, da[j], db[j]
                continue
            if len(da[j]) != len(db[j]):
                raise ValueError(f"{axis.key} of layer {j}: different numbers of groups")
            for ga, gb in zip(da[j], db[j], strict=True):
                yield axis.key, ga, gb
    if a.layers is not None and b.layers is not None:
        yield "layers", a.layers, b.layers


def ranking_agreement(a: Ranking, b: Ranking) -> dict[str, AxisAgreement]:
    """Per axis (``hidden``, ``ffn``, ``mamba_channels``, ``mamba_heads``, ``attention_heads``,
    ``layers`` when both rankings have a layer order) the rank correlation of ``a`` and ``b``.
    Axes with no order of two or more components are left out."""
    per_axis: dict[str, list[tuple[float, float]]] = {}
    for axis, oa, ob in _axis_orders(a, b):
        if len(oa) < 2 and len(ob) < 2:
            _positions(oa, ob)  # still the same components
            continue
        per_axis.setdefault(axis, []).append((spearman_rho(oa, ob), kendall_tau(oa, ob)))
    return {
        axis: AxisAgreement(
            spearman=sum(r for r, _ in values) / len(values),
            kendall=sum(t for _, t in values) / len(values),
            min_spearman=min(r for r, _ in values),
            num_orders=len(values),
        )
        for axis, values in per_axis.items()
    }
