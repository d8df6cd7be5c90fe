"""Latency of a sub-network from a measured per-layer table (Flextron's latency budgets).

A :class:`LatencyTable` holds seconds per token, measured on one device by
``tools/profile_latency.py``, for each layer kind on a grid of widths and hidden sizes, in two
phases (``decode``: one token with ``context`` tokens cached; ``prefill``: per token of a
``prefill_tokens``-token prompt), plus the ``base`` cost (embedding, final norm, output layer)
per hidden size. Between grid points the cost is interpolated (multi-)linearly and clamped at the
grid's ends, in torch ops, so expected (probability-weighted) sizes give a differentiable cost
for the router's budget loss, and exact sizes the table's latency of a :class:`SubnetSpec`::

    latency = base(hidden) + sum over layers that run of t_kind(hidden, width[, head_dim])
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_elastic.config import ModelConfig
from megatron_elastic.elastic.axes import Number, layer_kinds
from megatron_elastic.elastic.subnet import SubnetSpec

__all__ = [
    "PHASES",
    "LatencyTable",
    "expected_latency",
    "interpolate",
    "latency_table_from_json",
    "load_latency_table",
    "subnet_latency",
]

PHASES = ("decode", "prefill")


def _grids() -> dict[str, tuple[str, ...]]:
    """The axes each timed table is indexed by: hidden, then the layer kind's axes. A kind with
    no elastic axis, or not ``timed`` (``moe``: issue 26 step 4), is not timed."""
    grids = {k.name: ("hidden", *k.axes) for k in layer_kinds() if k.axes and k.timed}
    return {**grids, "base": ("hidden",)}


@dataclass(frozen=True)
class LatencyTable:
    """Measured seconds per token, per layer kind and phase, on grids of sizes."""

    grids: dict[str, tuple[int, ...]]
    """Sorted sizes measured per axis: ``hidden``, ``mamba_heads``, ``mamba_head_dim``,
    ``attention_heads``, ``ffn``."""
    seconds: dict[str, dict[str, Any]]
    """``seconds[phase][kind]``: nested lists indexed like the kind's grids (``mamba``: hidden x
    heads x head_dim; ``attention``: hidden x heads; ``mlp``: hidden x ffn; ``base``: hidden)."""
    context: int
    """Tokens cached when decode was timed."""
    device: str = ""
    """What the table was measured on (free text)."""

    def __post_init__(self) -> None:
        for phase in PHASES:
            if phase not in self.seconds:
                raise ValueError(f"latency table: no {phase!r} timings; re-run profile_latency")
            for kind, axes in _grids().items():
                if kind not in self.seconds[phase]:
                    raise ValueError(f"latency table: no {phase}/{kind} timings")
                shape = tuple(len(self.grids[a]) for a in axes)
                got = tuple(torch.as_tensor(self.seconds[phase][kind]).shape)
                if got != shape:
                    raise ValueError(
                        f"latency table: {phase}/{kind} has shape {got}, its grids give {shape}"
                    )
        for axis, grid in self.grids.items():
            if not grid or list(grid) != sorted(set(grid)):
                raise ValueError(f"latency table: grid {axis!r} must be increasing, got {grid}")

    def table(self, phase: str, kind: str) -> torch.Tensor:
        return torch.as_tensor(self.seconds[phase][kind], dtype=torch.float64)

    def to_json(self) -> dict[str, Any]:
        return {
            "grids": {k: list(v) for k, v in self.grids.items()},
            "seconds": self.seconds,
            "context": self.context,
            "device": self.device,
        }


def latency_table_from_json(data: Any, where: str = "latency table") -> LatencyTable:
    """The table of :meth:`LatencyTable.to_json`'s dict; ``ValueError`` naming ``where``."""
    try:
        grids = {k: tuple(int(x) for x in v) for k, v in data["grids"].items()}
        for axes in _grids().values():
            for axis in axes:
                if axis not in grids:
                    raise KeyError(axis)
        return LatencyTable(grids, data["seconds"], int(data["context"]), str(data["device"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{where} is malformed ({exc})") from None


def load_latency_table(path: str | Path) -> LatencyTable:
    """A table written by ``tools/profile_latency.py``; ``ValueError`` naming the file if it is
    missing or malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(
            f"latency table {str(path)!r} not found; write it with tools/profile_latency.py"
        ) from None
    except (OSError, json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"latency table {str(path)!r} is malformed ({exc})") from None
    return latency_table_from_json(data, f"latency table {str(path)!r}")


def interpolate(values: torch.Tensor, grids: Sequence[Sequence[int]], point: Sequence[Number]):
    """Multilinear interpolation of ``values`` (one axis per grid) at ``point``, clamped to the
    grids' ends; differentiable in tensor coordinates."""
    if not grids:
        return values
    grid = torch.as_tensor(grids[0], dtype=torch.float64)
    x = torch.as_tensor(point[0], dtype=torch.float64)
    if len(grid) == 1:
        return interpolate(values[0], grids[1:], point[1:])
    x = x.clamp(grid[0], grid[-1])
    i = int(torch.searchsorted(grid, x.detach(), right=True).clamp(1, len(grid) - 1)) - 1
    w = (x - grid[i]) / (grid[i + 1] - grid[i])
    low = interpolate(values[i], grids[1:], point[1:])
    high = interpolate(values[i + 1], grids[1:], point[1:])
    return (1 - w) * low + w * high


def _layer_latency(table: LatencyTable, phase: str, axes: tuple[str, ...], kind, hidden, sizes):
    """One layer's seconds per token: the kind's table at (hidden, its axes' sizes)."""
    point = [hidden, *(sizes[a] for a in axes[1:])]
    return interpolate(table.table(phase, kind), [table.grids[a] for a in axes], point)


def expected_latency(
    model: ModelConfig,
    table: LatencyTable,
    hidden: Number,
    sizes: Sequence[Mapping[str, Number]],
    keep: Sequence[Number],
    phase: str = "decode",
) -> torch.Tensor:
    """Seconds per token of (expected) sizes per layer (``keep``: probability each layer runs);
    the same form as :func:`~megatron_elastic.elastic.budget.expected_param_count`."""
    grids = _grids()
    untimed = sorted({k for k in model.layer_kinds() if k not in grids})
    if untimed:
        raise ValueError(
            f"latency budgets of parents with {untimed} layers are not supported yet (issue 26 "
            "step 4); use router.budget_target: params or memory"
        )
    total = interpolate(table.table(phase, "base"), [table.grids["hidden"]], [hidden])
    for kind, s, k in zip(model.layer_kinds(), sizes, keep, strict=True):
        total = total + k * _layer_latency(table, phase, grids[kind], kind, hidden, s)
    return total


def subnet_latency(
    model: ModelConfig, table: LatencyTable, spec: SubnetSpec, phase: str = "decode"
) -> float:
    """The table's seconds per token of ``spec``."""
    return float(
        expected_latency(
            model,
            table,
            spec.hidden,
            [dict(c.sizes) for c in spec.layers],
            [int(c.active) for c in spec.layers],
            phase,
        )
    )
