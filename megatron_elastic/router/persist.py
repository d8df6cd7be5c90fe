"""Saving and restoring a router together with the elastic configuration it was trained for."""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_elastic.config import ModelConfig, config_from_dict
from megatron_elastic.elastic.config import elastic_from_dict
from megatron_elastic.elastic.latency import latency_table_from_json
from megatron_elastic.router.config import RouterConfig
from megatron_elastic.router.router import ElasticRouter

__all__ = ["router_state", "router_from_state"]


def router_state(router: ElasticRouter) -> dict[str, Any]:
    """Everything needed to rebuild ``router``: its configs (plain data) and weights."""
    state = {
        "router_config": dataclasses.asdict(router.config),
        "elastic_config": dataclasses.asdict(router.elastic_config),
        "state_dict": {k: v.detach().cpu() for k, v in router.state_dict().items()},
    }
    if router.latency_table is not None:  # the table itself: the file may not travel along
        state["latency_table"] = router.latency_table.to_json()
    return state


def router_from_state(model: ModelConfig, state: dict[str, Any]) -> ElasticRouter:
    """The router saved by :func:`router_state`, for ``model``."""
    if "router_config" not in state or "state_dict" not in state:
        raise ValueError("this checkpoint's extra state holds no router")
    rcfg = config_from_dict(RouterConfig, dict(state["router_config"]), where="saved router")
    # Saved before min_attention_layers existed: trained without the constraint.
    saved = {"min_attention_layers": 0, **state["elastic_config"]}
    elastic = elastic_from_dict(saved, where="saved elastic config")
    table = state.get("latency_table")
    if table is not None:
        table = latency_table_from_json(table, "the saved router's latency table")
    router = ElasticRouter(model, elastic, rcfg, latency_table=table)
    router.load_state_dict(state["state_dict"])
    return router
