"""Budgets by latency: the per-layer table (measured by tools/profile_latency.py), its
interpolation, and the router trained on a table meeting its latency target on that table."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from megatron_elastic.elastic import SubnetSpec, load_elastic_recipe
from megatron_elastic.elastic.budget import _layer_params
from megatron_elastic.elastic.latency import (
    LatencyTable,
    interpolate,
    load_latency_table,
    subnet_latency,
)
from megatron_elastic.router import ElasticRouter, RouterConfig
from megatron_elastic.serving.profile import profile_latency

ROOT = Path(__file__).parents[2]
RECIPE = ROOT / "examples" / "tiny" / "elastic.yaml"
STEPS = 400


@pytest.fixture(scope="module")
def recipe():
    return load_elastic_recipe(RECIPE)


def _flop_table(model, elastic, overhead: float = 2e-5) -> LatencyTable:
    """A table shaped like a device's: per-token time proportional to a layer's weights (the
    memory-bound decode of a small model) plus a fixed launch overhead per layer."""
    c = elastic.axis_choices(model)
    grids = {a: c[a] for a in ("hidden", "mamba_heads", "mamba_head_dim", "attention_heads", "ffn")}

    def t(kind, h, w, d=0):
        return overhead + 1e-9 * float(_layer_params(model, kind, h, w, d))

    hs = grids["hidden"]
    seconds = {
        "mamba": [
            [[t("mamba", h, w, d) for d in grids["mamba_head_dim"]] for w in grids["mamba_heads"]]
            for h in hs
        ],
        "attention": [[t("attention", h, w) for w in grids["attention_heads"]] for h in hs],
        "mlp": [[t("mlp", h, w) for w in grids["ffn"]] for h in hs],
        "base": [overhead + 1e-9 * 2 * h * model.vocab_size for h in hs],
    }
    return LatencyTable(grids, {"decode": seconds, "prefill": seconds}, context=1024)


def test_interpolation_hits_grid_points_and_is_linear_between() -> None:
    values = torch.tensor([[1.0, 2.0], [3.0, 8.0]], dtype=torch.float64)
    grids = [(10, 20), (1, 3)]
    assert float(interpolate(values, grids, [20, 1])) == 3.0
    assert float(interpolate(values, grids, [15, 2])) == pytest.approx((1.5 + 5.5) / 2)
    assert float(interpolate(values, grids, [99, 0])) == 3.0  # clamped at the ends
    x = torch.tensor(15.0, requires_grad=True)
    interpolate(values, grids, [x, 1]).backward()
    assert float(x.grad) == pytest.approx(0.2)  # (3 - 1) / 10


@pytest.mark.parametrize("fraction", [0.6, 0.8])
def test_router_meets_its_latency_target_on_the_table(
    recipe, tmp_path, train_on_budget_loss, fraction
) -> None:
    model, elastic = recipe
    table = _flop_table(model, elastic)
    path = tmp_path / "lut.json"
    path.write_text(json.dumps(table.to_json()))
    config = RouterConfig(
        anneal_steps=STEPS,
        lr=1e-3,
        warmup_steps=10,
        budget_target="latency",
        latency_table=str(path),
    )
    name = f"{fraction:.0%}"
    router = ElasticRouter(model, dataclasses.replace(elastic, budgets={name: fraction}), config)
    parent = subnet_latency(model, table, SubnetSpec.full(model))
    assert router.parent_cost == pytest.approx(parent)
    train_on_budget_loss(router, STEPS)
    spec = router.decide(name, STEPS, None, deterministic=True).spec
    ratio = subnet_latency(model, table, spec) / (fraction * parent)
    assert abs(ratio - 1) <= 0.05, (ratio, spec)


def test_profiled_table_round_trips_and_drives_the_router(recipe, tmp_path) -> None:
    model, elastic = recipe
    table = profile_latency(model, elastic, context=16, prefill_tokens=8, repeats=2)
    for phase in ("decode", "prefill"):
        for kind in ("mamba", "attention", "mlp", "base"):
            values = torch.as_tensor(table.seconds[phase][kind])
            assert bool((values > 0).all()), (phase, kind)
    path = tmp_path / "lut.json"
    path.write_text(json.dumps(table.to_json()))
    loaded = load_latency_table(path)
    assert loaded == table
    full = SubnetSpec.full(model)
    config = RouterConfig(anneal_steps=10, budget_target="latency", latency_table=str(path))
    router = ElasticRouter(model, elastic, config)
    assert router.parent_cost == pytest.approx(subnet_latency(model, loaded, full))
    prefill = dataclasses.replace(config, latency_phase="prefill")
    cost = ElasticRouter(model, elastic, prefill).parent_cost
    assert cost == pytest.approx(subnet_latency(model, loaded, full, "prefill"))


def test_latency_target_errors(recipe, tmp_path) -> None:
    with pytest.raises(ValueError, match="needs latency_table"):
        RouterConfig(anneal_steps=10, budget_target="latency")
    with pytest.raises(ValueError, match="latency_phase"):
        RouterConfig(anneal_steps=10, latency_phase="both")
    model, elastic = recipe
    missing = RouterConfig(
        anneal_steps=10, budget_target="latency", latency_table=str(tmp_path / "no.json")
    )
    with pytest.raises(ValueError, match=r"not found; write it with tools/profile_latency\.py"):
        ElasticRouter(model, elastic, missing)
    bad = tmp_path / "bad.json"
    bad.write_text('{"grids": {"hidden": [1]}}')
    with pytest.raises(ValueError, match=r"bad\.json' is malformed"):
        load_latency_table(bad)


def test_profile_latency_cli(tmp_path, capsys) -> None:
    spec = importlib.util.spec_from_file_location(
        "profile_latency", ROOT / "tools" / "profile_latency.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "lut.json"
    args = ["--config", str(RECIPE), "--output", str(out)]
    assert tool.main([*args, "--context", "8", "--prefill-tokens", "4", "--repeats", "1"]) == 0
    assert load_latency_table(out).context == 8 and "wrote" in capsys.readouterr().out
    assert tool.main([*args, "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
    assert tool.main(["--config", str(RECIPE), "--output", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_saved_router_carries_its_table_and_unreachable_budgets_are_refused(
    recipe, tmp_path
) -> None:
    from megatron_elastic.router import router_from_state, router_state

    model, elastic = recipe
    table = _flop_table(model, elastic)
    path = tmp_path / "lut.json"
    path.write_text(json.dumps(table.to_json()))
    config = RouterConfig(anneal_steps=10, budget_target="latency", latency_table=str(path))
    router = ElasticRouter(model, elastic, config)
    state = router_state(router)
    path.unlink()  # the file does not travel with the checkpoint; the router does not need it
    restored = router_from_state(model, state)
    assert restored.latency_table == table and restored.parent_cost == router.parent_cost
    # the smallest sub-network the choices allow bounds what a budget may ask for
    smallest = SubnetSpec.heterogeneous(
        model,
        hidden=min(elastic.hidden_choices),
        attention_heads=[min(elastic.attention_head_choices)] * model.num_layers,
        mamba_heads=[min(elastic.mamba_head_choices)] * model.num_layers,
        mamba_head_dim=[min(elastic.mamba_head_dim_choices)] * model.num_layers,
        ffn=[min(elastic.ffn_choices)] * model.num_layers,
        active=[p < min(elastic.depth_choices) for p in restored._position],
    )
    floor = subnet_latency(model, table, smallest) / router.parent_cost
    reachable = dataclasses.replace(elastic, budgets={"low": floor * 1.001})
    ElasticRouter(model, reachable, config, latency_table=table).check_reachable()
    unreachable = dataclasses.replace(elastic, budgets={"low": floor * 0.9})
    with pytest.raises(ValueError, match=f"costs {floor:.3f} of it"):
        ElasticRouter(model, unreachable, config, latency_table=table).check_reachable()
