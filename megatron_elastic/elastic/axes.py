"""The elastic axes and the layer kinds they size: one registry every other module iterates.

An :class:`Axis` is one elastic dimension: its candidates' config field, the parent's size, the
groups its units nest in, how it is validated, ranked and permuted, and which units a size keeps.
A :class:`LayerKind` is one kind of hybrid layer: its symbol in the hybrid pattern, the axes that
size it (in the order its units are laid out: Mamba heads, then channels within a head), its
parameter count and its inference-state bytes, as functions of those sizes.

``hidden`` (embedding width) and ``depth`` (active layers) are global axes (``kind=None``); every
other axis sizes the layers of one kind. :mod:`~megatron_elastic.elastic.config`,
:mod:`~megatron_elastic.elastic.subnet`, :mod:`~megatron_elastic.elastic.budget`,
:mod:`~megatron_elastic.elastic.latency`, :mod:`~megatron_elastic.elastic.architectures`, the
router and :mod:`~megatron_elastic.importance.permute` loop over :func:`axes` and
:func:`layer_kinds`. Adding an axis: write its :class:`Axis` (and, for a new kind of layer, its
:class:`LayerKind`), :func:`register` it, and add the layer code that slices it (see
``tests/unit/test_axis_registry.py`` for a complete one). The built-in objects live in
:mod:`megatron_elastic.elastic.builtin_axes`, the mixture-of-experts ones in
:mod:`megatron_elastic.elastic.moe_axes`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from megatron_elastic.config import LAYER_SYMBOLS, ModelConfig, ParallelConfig

if TYPE_CHECKING:
    from megatron_elastic.elastic.config import ElasticConfig

__all__ = [
    "Axis",
    "LayerKind",
    "Number",
    "Order",
    "StateDict",
    "axes",
    "axis",
    "kind_axes",
    "layer_kind",
    "layer_kinds",
    "per_layer_sizes",
    "register",
    "registered",
    "unregister",
]

Number = int | float | torch.Tensor
"""A size: an int (exact) or a tensor of probability-weighted sizes (differentiable)."""
StateDict = dict[str, torch.Tensor]
Order = Any
"""An axis's most-important-first order: a list of units, or per group a list of local units."""


def _one(model: ModelConfig, elastic: ElasticConfig | None) -> int:
    return 1


def _no_check(
    choices: tuple[int, ...],
    model: ModelConfig,
    elastic: ElasticConfig,
    parallel: ParallelConfig,
) -> None:
    return None


@dataclass(frozen=True)
class Axis:
    """One elastic dimension."""

    name: str
    """Registry key, also the key of recipes' ``budget_choices`` and the router's axis."""
    kind: str | None
    """The layer kind it sizes; ``None`` for a global axis (``hidden``, ``depth``)."""
    full: Callable[[ModelConfig], int]
    """The parent's size."""
    label: str
    """What a size counts, for messages (``"attention heads"``)."""
    config_field: str | None = None
    """The :class:`ElasticConfig` field holding its candidates; ``None``: given in
    ``ElasticConfig.choices`` under :attr:`name`."""
    groups: Callable[[ModelConfig, ElasticConfig | None], int] = _one
    """How many equal groups its units nest in: a size keeps the same prefix of every group
    (query groups, Mamba groups, FFN nesting blocks); sizes are multiples of it."""
    unit: str = ""
    """What one group is called, for messages (``"query group"``)."""
    check: Callable[[tuple[int, ...], ModelConfig, ElasticConfig, ParallelConfig], None] = _no_check
    """Constraints beyond ``[groups, full]`` and divisibility (e.g. what CP or TP demand);
    raises ``ValueError``. Runs before the generic check."""
    rank: Callable[[torch.Tensor, ModelConfig, Mapping[str, Any]], tuple[Order, Any]] | None = None
    """(a layer's calibration statistic, the parent, options) -> (order, scores as JSON): how
    importance ranks its units. ``None``: ranked elsewhere (``hidden`` from the norms, ``depth``
    by iterative NMSE)."""
    permute: Callable[[StateDict, ModelConfig, Order, int, int], None] | None = None
    """(full state dict, parent, order, layer, ffn_nesting_blocks): put the layer's units in
    ``order`` in place, moving everything that reads or writes them. Global axes get layer
    ``-1``. ``None``: not permuted (``depth``: the layer ranking selects layers instead)."""
    ranking_key: str = ""
    """Its key in a ranking file (default: :attr:`name`)."""
    check_layer: Callable[[int, int, ModelConfig], None] | None = None
    """(layer, size, parent): constraints on one layer's size beyond ``[groups, full]`` (e.g. at
    least top-k routed experts); raises ``ValueError``. Runs in :meth:`validate_layer`."""

    @property
    def per_layer(self) -> bool:
        return self.kind is not None

    @property
    def key(self) -> str:
        return self.ranking_key or self.name

    def kept_units(
        self, model: ModelConfig, size: int, elastic: ElasticConfig | None = None
    ) -> list[int]:
        """The units (in the permuted order) a size keeps: the first ``size / groups`` of every
        group, group-major."""
        g = self.groups(model, elastic)
        per_group, keep = self.full(model) // g, size // g
        return [b * per_group + j for b in range(g) for j in range(keep)]

    def validate(
        self,
        choices: tuple[int, ...],
        model: ModelConfig,
        elastic: ElasticConfig,
        parallel: ParallelConfig,
    ) -> None:
        """``ValueError`` for candidates the parent (or its parallel split) cannot realise."""
        self.check(choices, model, elastic, parallel)
        limit, multiple = self.full(model), self.groups(model, elastic)
        bad = [c for c in choices if c > limit or c % multiple]
        if bad:
            ok = list(range(multiple, limit + 1, multiple))
            why = f"at most {limit}"
            if multiple > 1:
                why = f"{self.label} are kept per {self.unit} ({multiple} of them), at most {limit}"
            raise ValueError(
                f"ElasticConfig {self.name} choices {bad} are not possible: {why}; "
                f"valid values are {ok if len(ok) <= 16 else [*ok[:8], '...', *ok[-4:]]}"
            )

    def validate_layer(
        self, layer: int, size: int, model: ModelConfig, elastic: ElasticConfig | None
    ) -> None:
        """``ValueError`` for a per-layer size the parent cannot run. An axis the parent lacks
        (full size 0, e.g. the shared expert's width without a shared expert) takes only 0."""
        limit, groups = self.full(model), self.groups(model, elastic)
        if size == 0 == limit:
            return
        if self.check_layer is not None:
            self.check_layer(layer, size, model)
        if groups == 1:
            if not 0 < size <= limit:
                raise ValueError(f"layer {layer}: {self.label}={size} must be in [1, {limit}]")
            return
        if not 0 < size <= limit or size % groups:
            raise ValueError(
                f"layer {layer}: {size} {self.label} is not possible: at most {limit} and a "
                f"multiple of {groups} (the same count in every {self.unit}); e.g. "
                f"{list(range(groups, limit + 1, groups))[-4:]}"
            )


@dataclass(frozen=True)
class LayerKind:
    """One kind of hybrid layer and how its elastic sizes cost."""

    name: str
    """``mamba``, ``attention``, ``mlp``, ..."""
    symbol: str
    """Its character in megatron-core's hybrid pattern."""
    axes: tuple[str, ...]
    """The axes sizing it, outermost first (a unit of the second nests within one of the first)."""
    params: Callable[[ModelConfig, Number, Mapping[str, Number]], Number]
    """(parent, hidden, sizes per axis) -> parameters; ``+`` and ``*`` only, so tensors of
    expected sizes give a differentiable count."""
    state_bytes: Callable[[ModelConfig, Mapping[str, Number], int, int, int], Number] | None = None
    """(parent, sizes, tokens, batch, bytes per element) -> inference-state bytes (KV cache,
    recurrent state); ``None``: stateless."""
    state_field: str = ""
    """The :class:`~megatron_elastic.elastic.budget.MemoryEstimate` field its state counts in."""
    active_params: Callable[[ModelConfig, Number, Mapping[str, Number]], Number] | None = None
    """(parent, hidden, sizes) -> the parameters one token touches (a mixture of experts: its
    top-k routed experts); ``None``: all of :attr:`params`."""
    unit_weights: Callable[[Sequence[torch.Tensor]], torch.Tensor] | None = None
    """The router's soft per-unit weights of one layer from each axis's (outermost first);
    ``None``: their outer product, flattened outermost-major (Mamba heads x channels)."""
    timed: bool = True
    """Whether latency tables time it (:mod:`~megatron_elastic.elastic.latency`)."""

    def combine_weights(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """One layer's per-unit router weights from its axes' (see :attr:`unit_weights`)."""
        if self.unit_weights is not None:
            return self.unit_weights(vectors)
        w = vectors[0]
        for v in vectors[1:]:
            w = (w[:, None] * v[None, :]).flatten()
        return w


_AXES: dict[str, Axis] = {}
_KINDS: dict[str, LayerKind] = {}


def register(*objects: Axis | LayerKind) -> None:
    """Add axes and layer kinds (a kind's symbol joins the hybrid pattern's alphabet)."""
    for obj in objects:
        if isinstance(obj, LayerKind):
            if obj.name in _KINDS:
                raise ValueError(f"layer kind {obj.name!r} is already registered")
            known = LAYER_SYMBOLS.get(obj.symbol)
            if known is not None and known != obj.name:
                raise ValueError(f"symbol {obj.symbol!r} already stands for {known!r}")
            LAYER_SYMBOLS[obj.symbol] = obj.name
            _KINDS[obj.name] = obj
        else:
            if obj.name in _AXES:
                raise ValueError(f"axis {obj.name!r} is already registered")
            _AXES[obj.name] = obj


def unregister(*objects: Axis | LayerKind) -> None:
    for obj in objects:
        if isinstance(obj, LayerKind):
            _KINDS.pop(obj.name, None)
            LAYER_SYMBOLS.pop(obj.symbol, None)
        else:
            _AXES.pop(obj.name, None)


@contextmanager
def registered(*objects: Axis | LayerKind) -> Iterator[None]:
    """Register ``objects`` for the duration of a ``with`` block (tests, experiments)."""
    register(*objects)
    try:
        yield
    finally:
        unregister(*objects)


def _builtins() -> None:
    import megatron_elastic.elastic.builtin_axes  # (registers on import)
    import megatron_elastic.elastic.moe_axes  # noqa: F401  (after the built-ins: draw order)


def axes() -> tuple[Axis, ...]:
    """Every registered axis, in registration order (the router's draw order)."""
    _builtins()
    return tuple(_AXES.values())


def axis(name: str) -> Axis:
    _builtins()
    if name not in _AXES:
        raise ValueError(f"unknown axis {name!r}; axes are {list(_AXES)}")
    return _AXES[name]


def layer_kinds() -> tuple[LayerKind, ...]:
    _builtins()
    return tuple(_KINDS.values())


def layer_kind(name: str) -> LayerKind:
    _builtins()
    if name not in _KINDS:
        raise ValueError(f"unknown layer kind {name!r}; kinds are {list(_KINDS)}")
    return _KINDS[name]


def kind_axes(kind: str) -> tuple[Axis, ...]:
    """The axes sizing layers of ``kind``, outermost first."""
    return tuple(axis(a) for a in layer_kind(kind).axes)


def per_layer_sizes(
    model: ModelConfig, values: Mapping[str, Sequence[Number]]
) -> list[dict[str, Number]]:
    """Per layer, ``{axis: size}`` for the axes of its kind, from per-axis lists (one entry per
    layer; entries for layers of other kinds are ignored)."""
    return [
        {a: values[a][j] for a in layer_kind(kind).axes}
        for j, kind in enumerate(model.layer_kinds())
    ]
