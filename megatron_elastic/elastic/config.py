"""Elastic configuration: named budgets and the candidate sizes of every elastic axis."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_elastic.config import (
    ModelConfig,
    ParallelConfig,
    config_from_dict,
    load_model_config,
    load_yaml,
)
from megatron_elastic.elastic import axes as registry

__all__ = ["ElasticConfig", "elastic_from_dict", "load_elastic_recipe"]

MODES = ("mask", "slice")


@dataclass(frozen=True)
class ElasticConfig:
    """Which nested sub-networks the parent can run, and the budgets they serve."""

    budgets: dict[str, float]
    """Budget name (free text, e.g. ``"6B"``) -> target fraction of the parent's parameters."""
    hidden_choices: tuple[int, ...] = ()
    """Candidate embedding widths; the parent's width is always a candidate."""
    attention_head_choices: tuple[int, ...] = ()
    """Candidate query-head counts per attention layer (multiples of ``num_query_groups``:
    heads are kept per query group, key/value heads stay)."""
    mamba_head_choices: tuple[int, ...] = ()
    """Candidate Mamba head counts per mixer (multiples of ``mamba_num_groups``)."""
    mamba_head_dim_choices: tuple[int, ...] = ()
    """Candidate channels per Mamba head."""
    ffn_choices: tuple[int, ...] = ()
    """Candidate FFN neuron counts (multiples of ``ffn_nesting_blocks``)."""
    depth_choices: tuple[int, ...] = ()
    """Candidate numbers of active layers; skipped layers pass the residual through."""
    heterogeneous: bool = False
    """One choice per layer for Mamba, attention and FFN (hidden stays global) instead of one per
    axis."""
    mode: str = "slice"
    """``slice``: weights cut to the active prefix (compute shrinks); ``mask``: full compute with
    0/1 activation masks (the paper's formulation)."""
    ffn_nesting_blocks: int = 1
    """FFN neurons (of MLP layers, and of every routed expert and the shared expert of ``E``
    layers) nest as a prefix within each of this many equal blocks, so that every tensor-
    parallel rank keeps the same number of active neurons. Must be a multiple of the TP size;
    independent of it, so a model trained at one TP size means the same at another."""
    moe_expert_nesting_blocks: int = 1
    """Routed experts nest as a prefix within each of this many equal blocks of consecutive
    experts (within every routing group of group-limited routing too), so that every expert-
    parallel rank, which holds whole blocks, keeps the same number of active experts. Must be a
    multiple of ``ParallelConfig.expert_model_parallel_size``; independent of it, so a model
    trained at one EP size means the same at another. Importance lays its ranking out across the
    blocks (best expert first in block 0, second best first in block 1, ...), so a size keeps the
    globally best experts."""
    layer_ranking: tuple[int, ...] | None = None
    """Layers from most to least important (importance estimation writes it); depth ``d`` keeps
    the first ``d``. ``None``: keep the first ``d`` layers of the stack."""
    min_attention_layers: int = 1
    """Every sub-network keeps at least this many attention layers: the layer ranking keeps them
    (importance estimation ranks the most important ones first), so no depth choice drops them.
    An attention-free model cannot be served by transformers' NemotronH cache or llama.cpp's
    hybrid cache; 0 allows it."""
    choices: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Candidates of axes without a field of their own (an axis registered beyond the built-in
    ones, :mod:`megatron_elastic.elastic.axes`), by axis name."""
    budget_choices: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Optional explicit architecture per budget (axis -> choice, or a per-layer list for Mamba,
    attention and FFN axes when heterogeneous); used before a router is trained."""

    def __post_init__(self) -> None:
        if not self.budgets:
            raise ValueError("ElasticConfig.budgets is empty; name at least one budget")
        for name, frac in self.budgets.items():
            if not isinstance(frac, int | float) or not 0 < frac <= 1:
                raise ValueError(
                    f"ElasticConfig.budgets[{name!r}]={frac!r}: a budget is a fraction of the "
                    "parent's parameters in (0, 1]"
                )
        for name in ("ffn_nesting_blocks", "moe_expert_nesting_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ElasticConfig.{name} must be a positive integer, got {value!r}")
        if self.mode not in MODES:
            raise ValueError(f"ElasticConfig.mode={self.mode!r}; choose one of {MODES}")
        extra, normal_extra = dict(self.choices), {}
        for axis in registry.axes():
            if axis.config_field is not None:
                name, values = axis.config_field, tuple(getattr(self, axis.config_field))
            else:
                name, values = f"choices[{axis.name!r}]", tuple(extra.pop(axis.name, ()))
            if any(not isinstance(v, int) or v <= 0 for v in values):
                raise ValueError(f"ElasticConfig.{name} must hold positive integers, got {values}")
            normal = tuple(sorted(set(values)))
            if axis.config_field is not None:
                object.__setattr__(self, name, normal)
            elif normal:
                normal_extra[axis.name] = normal
        if extra:
            fields = {a.name: a.config_field for a in registry.axes() if a.config_field}
            raise ValueError(
                f"ElasticConfig.choices names {sorted(extra)}: not axes of their own registry "
                f"entry; built-in axes take their own fields ({fields})"
            )
        object.__setattr__(self, "choices", normal_extra)
        k = self.min_attention_layers
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(
                f"ElasticConfig.min_attention_layers must be an integer >= 0, got {k!r}"
            )
        if self.layer_ranking is not None:
            object.__setattr__(self, "layer_ranking", tuple(self.layer_ranking))
        unknown = set(self.budget_choices) - set(self.budgets)
        if unknown:
            raise ValueError(
                f"ElasticConfig.budget_choices names unknown budgets {sorted(unknown)}; "
                f"trained budgets are {sorted(self.budgets)}"
            )

    def axis_choices(self, model: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Candidates of every axis, the parent's size included, ascending."""
        out = {}
        for axis in registry.axes():
            given = (
                getattr(self, axis.config_field)
                if axis.config_field
                else self.choices.get(axis.name, ())
            )
            out[axis.name] = tuple(sorted(set(given) | {axis.full(model)}))
        return out

    def validate_for(self, model: ModelConfig, parallel: ParallelConfig | None = None) -> None:
        """Raise ``ValueError`` for candidates the parent (or its TP split) cannot realise."""
        parallel = parallel or ParallelConfig()
        if "moe" in model.layer_kinds():
            _check_moe_parent(model, parallel)
        _check_expert_nesting(model, self, parallel)
        candidates = self.axis_choices(model)
        for axis, choices in candidates.items():
            registry.axis(axis).validate(choices, model, self, parallel)
        if self.layer_ranking is not None and sorted(self.layer_ranking) != list(
            range(model.num_layers)
        ):
            raise ValueError(
                f"ElasticConfig.layer_ranking must be a permutation of 0..{model.num_layers - 1}"
            )
        self._check_attention_kept(model, candidates["depth"])

    def _check_attention_kept(self, model: ModelConfig, depths: tuple[int, ...]) -> None:
        """Every depth choice keeps ``min_attention_layers`` attention layers."""
        kinds, k = model.layer_kinds(), self.min_attention_layers
        available = kinds.count("attention")
        if k > available:
            raise ValueError(
                f"ElasticConfig.min_attention_layers={k}, but the parent has {available} attention "
                f"layers; use min_attention_layers <= {available}"
            )
        order = self.layer_ranking or tuple(range(model.num_layers))
        for depth in depths:
            kept = [j for j in order[:depth] if kinds[j] == "attention"]
            if len(kept) < k:
                where = "layer_ranking" if self.layer_ranking else "the first layers of the stack"
                raise ValueError(
                    f"ElasticConfig depth choice {depth} keeps {len(kept)} attention layer(s) "
                    f"({where}: {list(order[:depth])}), fewer than min_attention_layers={k}; "
                    "rank the layers with tools/estimate_importance.py (its ranking keeps them), "
                    "drop that depth choice, or set min_attention_layers=0"
                )


def _check_moe_parent(model: ModelConfig, parallel: ParallelConfig) -> None:
    """What elastic ``E`` layers do not run yet, refused before anything is built."""
    if parallel.tensor_parallel_size > 1 and not parallel.sequence_parallel:
        raise ValueError(
            f"ParallelConfig.tensor_parallel_size={parallel.tensor_parallel_size} with 'E' layers "
            "needs sequence parallelism (megatron's MoE layer refuses to train without it: its "
            "token dispatcher gathers each TP rank's share of the sequence); set "
            "parallel.sequence_parallel: true"
        )
    if model.moe_router_load_balancing_type in ("seq_aux_loss", "global_aux_loss"):
        raise ValueError(
            f"ModelConfig.moe_router_load_balancing_type={model.moe_router_load_balancing_type!r}: "
            "elastic MoE sub-networks apply aux_loss (and the z-loss) only (issue 26 step 2); "
            "use aux_loss or none"
        )


def _check_expert_nesting(model: ModelConfig, elastic: ElasticConfig, parallel) -> None:
    """Expert nesting blocks: whole blocks per EP rank, whole blocks per routing group (or whole
    routing groups per block), equal blocks of experts."""
    blocks, ep = elastic.moe_expert_nesting_blocks, parallel.expert_model_parallel_size
    field = f"ElasticConfig.moe_expert_nesting_blocks={blocks}"
    if blocks % ep:
        raise ValueError(
            f"{field} must be a multiple of expert_model_parallel_size={ep} (every EP rank keeps "
            f"the same experts' prefix of whole blocks); use {ep * max(1, blocks // ep)}"
        )
    if blocks == 1:
        return
    experts = model.num_moe_experts or 0
    groups = model.moe_router_num_groups if model.moe_router_group_topk else 1
    if not experts or experts % math.lcm(blocks, groups):
        raise ValueError(
            f"{field}: the parent's num_moe_experts={experts} (routing groups: {groups}) do not "
            f"split into {math.lcm(blocks, groups)} equal blocks of experts; use 1 or a divisor "
            "of the routed experts"
        )


def elastic_from_dict(data: dict[str, Any], where: str) -> ElasticConfig:
    """An :class:`ElasticConfig` from plain data (YAML lists become tuples in validation)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of elastic settings")
    return config_from_dict(ElasticConfig, data, where=where)


def load_elastic_recipe(path: str | Path) -> tuple[ModelConfig, ElasticConfig]:
    """Load an elastic recipe: ``model:`` (path of the model YAML, relative to this file) and
    ``elastic:`` (the :class:`ElasticConfig` keys)."""
    path = Path(path)
    data = load_yaml(path)
    unknown = set(data) - {"model", "elastic"}
    if unknown or "model" not in data or "elastic" not in data:
        raise ValueError(
            f"{path}: an elastic recipe has exactly two keys, 'model' (path of the model YAML) and "
            f"'elastic' (the elastic settings); got {sorted(data)}"
        )
    model = load_model_config(path.parent / data["model"])
    elastic = elastic_from_dict(data["elastic"], where=f"{path}: elastic")
    elastic.validate_for(model)
    return model, elastic
