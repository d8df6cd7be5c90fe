"""Elastic configuration: named budgets and the candidate sizes of every elastic axis."""

from __future__ import annotations

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

__all__ = ["AXES", "ElasticConfig", "elastic_from_dict", "load_elastic_recipe"]

AXES = ("hidden", "attention_heads", "mamba_heads", "mamba_head_dim", "ffn", "depth")
"""Elastic axes: embedding width, attention heads (per query group), Mamba heads (per group),
Mamba head channels, FFN neurons, and active layers."""

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
    """FFN neurons nest as a prefix within each of this many equal blocks, so that every tensor-
    parallel rank keeps the same number of active neurons. Must be a multiple of the TP size;
    independent of it, so a model trained at one TP size means the same at another."""
    layer_ranking: tuple[int, ...] | None = None
    """Layers from most to least important (importance estimation writes it); depth ``d`` keeps
    the first ``d``. ``None``: keep the first ``d`` layers of the stack."""
    min_attention_layers: int = 1
    """Every sub-network keeps at least this many attention layers: the layer ranking keeps them
    (importance estimation ranks the most important ones first), so no depth choice drops them.
    An attention-free model cannot be served by transformers' NemotronH cache or llama.cpp's
    hybrid cache; 0 allows it."""
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
        if self.mode not in MODES:
            raise ValueError(f"ElasticConfig.mode={self.mode!r}; choose one of {MODES}")
        for name in (
            "hidden_choices",
            "attention_head_choices",
            "mamba_head_choices",
            "mamba_head_dim_choices",
            "ffn_choices",
            "depth_choices",
        ):
            values = tuple(getattr(self, name))
            if any(not isinstance(v, int) or v <= 0 for v in values):
                raise ValueError(f"ElasticConfig.{name} must hold positive integers, got {values}")
            object.__setattr__(self, name, tuple(sorted(set(values))))
        k = self.min_attention_layers
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(
                f"ElasticConfig.min_attention_layers must be an integer >= 0, got {k!r}"
            )
        if self.ffn_nesting_blocks <= 0:
            raise ValueError("ElasticConfig.ffn_nesting_blocks must be positive")
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
        full = {
            "hidden": model.hidden_size,
            "attention_heads": model.num_attention_heads,
            "mamba_heads": model.mamba_num_heads,
            "mamba_head_dim": model.mamba_head_dim,
            "ffn": model.ffn_hidden_size,
            "depth": model.num_layers,
        }
        given = {
            "hidden": self.hidden_choices,
            "attention_heads": self.attention_head_choices,
            "mamba_heads": self.mamba_head_choices,
            "mamba_head_dim": self.mamba_head_dim_choices,
            "ffn": self.ffn_choices,
            "depth": self.depth_choices,
        }
        return {axis: tuple(sorted(set(given[axis]) | {full[axis]})) for axis in AXES}

    def validate_for(self, model: ModelConfig, parallel: ParallelConfig | None = None) -> None:
        """Raise ``ValueError`` for candidates the parent (or its TP split) cannot realise."""
        parallel = parallel or ParallelConfig()
        choices = self.axis_choices(model)
        tp = parallel.tensor_parallel_size

        def check(axis: str, limit: int, multiple: int, why: str) -> None:
            bad = [c for c in choices[axis] if c > limit or c % multiple]
            if bad:
                ok = list(range(multiple, limit + 1, multiple))
                raise ValueError(
                    f"ElasticConfig {axis} choices {bad} are not possible: {why}; "
                    f"valid values are {ok if len(ok) <= 16 else [*ok[:8], '...', *ok[-4:]]}"
                )

        check("hidden", model.hidden_size, 1, f"at most hidden_size={model.hidden_size}")
        check(
            "attention_heads",
            model.num_attention_heads,
            model.num_query_groups,
            f"heads are kept per query group (num_query_groups={model.num_query_groups}), at most "
            f"{model.num_attention_heads}",
        )
        check(
            "mamba_heads",
            model.mamba_num_heads,
            model.mamba_num_groups,
            f"Mamba heads are kept per group (mamba_num_groups={model.mamba_num_groups}), at most "
            f"{model.mamba_num_heads}",
        )
        cp = parallel.context_parallel_size
        if cp > 1:
            # Context parallelism gives every CP rank a contiguous share of this TP rank's active
            # heads (megatron's MambaContextParallel), so active heads per TP rank split over CP.
            bad = [h for h in choices["mamba_heads"] if (h // tp) % cp]
            if bad:
                ok = [
                    h
                    for h in range(model.mamba_num_groups, model.mamba_num_heads + 1)
                    if h % model.mamba_num_groups == 0 and h % tp == 0 and (h // tp) % cp == 0
                ]
                raise ValueError(
                    f"ElasticConfig mamba_heads choices {bad} are not possible with "
                    f"context_parallel_size={cp} at tensor_parallel_size={tp}: the active Mamba "
                    f"heads per TP rank must be divisible by CP; valid values are {ok}"
                )
        check("mamba_head_dim", model.mamba_head_dim, 1, f"at most {model.mamba_head_dim}")
        check("depth", model.num_layers, 1, f"the parent has {model.num_layers} layers")
        blocks = self.ffn_nesting_blocks
        if model.ffn_hidden_size % blocks:
            raise ValueError(
                f"ElasticConfig.ffn_nesting_blocks={blocks} must divide ffn_hidden_size="
                f"{model.ffn_hidden_size}"
            )
        if blocks % tp:
            raise ValueError(
                f"ElasticConfig.ffn_nesting_blocks={blocks} must be a multiple of "
                f"tensor_parallel_size={tp} so every rank keeps the same number of active FFN "
                f"neurons; use ffn_nesting_blocks={tp * max(1, blocks // tp)} or a TP size "
                f"dividing {blocks}"
            )
        check(
            "ffn",
            model.ffn_hidden_size,
            blocks,
            f"FFN neurons nest within ffn_nesting_blocks={blocks} blocks, at most "
            f"{model.ffn_hidden_size}",
        )
        if self.layer_ranking is not None and sorted(self.layer_ranking) != list(
            range(model.num_layers)
        ):
            raise ValueError(
                f"ElasticConfig.layer_ranking must be a permutation of 0..{model.num_layers - 1}"
            )
        self._check_attention_kept(model, choices["depth"])

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
