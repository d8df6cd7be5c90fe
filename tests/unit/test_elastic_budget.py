"""Analytic budgets of sub-networks, physical slicing, and rejection of impossible specs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_elastic.config import ParallelConfig
from megatron_elastic.elastic import ElasticConfig, SubnetSpec, build_elastic_model
from megatron_elastic.elastic.architectures import budget_specs
from megatron_elastic.elastic.budget import (
    expected_memory_bytes,
    expected_param_count,
    subnet_memory,
    subnet_param_count,
)
from megatron_elastic.model import count_parameters
from megatron_elastic.training.recipe import load_train_recipe

ROOT = Path(__file__).parents[2]
ELASTIC = ElasticConfig(budgets={"full": 1.0}, ffn_nesting_blocks=2)


def _specs(cfg):
    n = cfg.num_layers
    return [
        SubnetSpec.full(cfg),
        SubnetSpec.homogeneous(
            cfg, hidden=48, attention_heads=2, mamba_heads=2, mamba_head_dim=10, ffn=64
        ),
        SubnetSpec.homogeneous(
            cfg, hidden=33, mamba_head_dim=7, depth=3, layer_ranking=[5, 0, 3, 1, 2, 4]
        ),
        SubnetSpec.heterogeneous(
            cfg,
            hidden=60,
            attention_heads=[4, 2, 2, 4, 2, 2][:n],
            mamba_heads=[2, 4, 2, 4, 2, 4][:n],
            mamba_head_dim=[1, 16, 9, 2, 3, 4][:n],
            ffn=[2, 4, 126, 64, 8, 128][:n],
            active=[True, False, True, True, True, False][:n],
        ),
    ]


@pytest.fixture(scope="module")
def elastic_model(pgs, small_config):
    return build_elastic_model(small_config, ELASTIC, pgs)


@pytest.mark.parametrize("which", range(4))
def test_invariant_counted_params_equal_physically_sliced(
    elastic_model, small_config, which
) -> None:
    spec = _specs(small_config)[which]
    sliced = elastic_model.sliced_state_dict(spec)
    assert sum(t.numel() for t in sliced.values()) == subnet_param_count(small_config, spec)
    if which == 0:
        assert subnet_param_count(small_config, spec) == count_parameters(small_config)
        params = dict(elastic_model.named_parameters())
        assert set(sliced) == set(params)
        assert all(torch.equal(sliced[k], params[k]) for k in sliced)


def test_sliced_shapes_follow_the_spec(elastic_model, small_config) -> None:
    spec = _specs(small_config)[3]
    sd = elastic_model.sliced_state_dict(spec)
    assert sd["embedding.word_embeddings.weight"].shape == (small_config.vocab_size, 60)
    # layer 0: Mamba, 2 heads x 1 channel, groups=2 x state=8 kept: [z, x, B, C, dt] rows
    assert sd["decoder.layers.0.mixer.in_proj.weight"].shape == (2 + 2 + 2 * 2 * 8 + 2, 60)
    assert sd["decoder.layers.0.mixer.conv1d_weight"].shape == (2 + 2 * 2 * 8, 1, 4)
    assert not any(k.startswith("decoder.layers.1.") for k in sd)  # skipped
    # layer 2: attention with 2 query heads (1 per group) + 2 kv groups of k,v: (2 + 2*2) * 16
    assert sd["decoder.layers.2.self_attention.linear_qkv.weight"].shape == (6 * 16, 60)
    assert sd["decoder.layers.2.self_attention.linear_proj.weight"].shape == (60, 2 * 16)
    assert sd["decoder.layers.4.mlp.linear_fc1.weight"].shape == (8, 60)


def test_expected_count_is_differentiable_and_exact_at_one_hot(small_config) -> None:
    spec = _specs(small_config)[1]
    hidden = torch.tensor(float(spec.hidden), requires_grad=True)
    widths = [torch.tensor(float(c.width), requires_grad=True) for c in spec.layers]
    # each layer's outermost axis (heads, neurons) a tensor, the others (Mamba head dim) floats
    sizes = [
        {name: w if k == 0 else float(v) for k, (name, v) in enumerate(c.sizes)}
        for c, w in zip(spec.layers, widths, strict=True)
    ]
    keep = [torch.tensor(1.0, requires_grad=True) for _ in spec.layers]
    total = expected_param_count(small_config, hidden, sizes, keep)
    assert total.item() == subnet_param_count(small_config, spec)
    total.backward()
    assert hidden.grad > 0 and all(w.grad > 0 for w in widths) and all(k.grad > 0 for k in keep)


def test_memory_counts_weights_kv_cache_and_mamba_state(small_config) -> None:
    full = SubnetSpec.full(small_config)
    mem = subnet_memory(small_config, full, seq_length=100, batch_size=3)
    attn = small_config.layer_kinds().count("attention")
    assert (
        mem.kv_cache
        == attn * 2 * small_config.num_query_groups * small_config.head_dim * 100 * 3 * 2
    )
    assert mem.weights == 2 * count_parameters(small_config)
    assert mem.mamba_state > 0 and mem.total == mem.weights + mem.kv_cache + mem.mamba_state
    # dropping the attention layers removes their KV cache; longer context grows only KV
    no_attn = full.with_depth(4, layer_ranking=[0, 1, 3, 4, 2, 5])
    assert subnet_memory(small_config, no_attn, seq_length=100, batch_size=3).kv_cache == 0
    longer = subnet_memory(small_config, full, seq_length=200, batch_size=3)
    assert longer.kv_cache == 2 * mem.kv_cache and longer.mamba_state == mem.mamba_state
    sizes = [{name: float(v) for name, v in c.sizes} for c in full.layers]
    expected = expected_memory_bytes(
        small_config,
        float(full.hidden),
        sizes,
        [1.0] * len(sizes),
        seq_length=100,
        batch_size=3,
    )
    assert expected == mem.total


@pytest.mark.parametrize("stage", ["stage1_8k", "stage2_49k"])
def test_nano_12b_budgets_of_the_recipe(stage) -> None:
    """The 12B recipe's starting architectures (``budget_choices``; the parent for 12B) cost
    their budget within the router's own bound (``router.target_tolerance`` of the stage,
    counted in its ``budget_target``): 9B 0.748, 6B 0.496 of the parent's 12.31B."""
    recipe = load_train_recipe(ROOT / "examples" / "nemotron_nano_12b" / f"{stage}.yaml")
    model, elastic, router = recipe.model, recipe.elastic, recipe.router
    assert router.budget_target == "params"
    parent = count_parameters(model)
    # ~12.31B: docs/background.md#the-parent-nemotron-nano-v2-12b
    assert parent == pytest.approx(12.31e9, rel=1e-3)
    specs = budget_specs(model, elastic)
    assert {name: how for name, (_, how) in specs.items()} == {
        "12B": "parent",
        "9B": "explicit",
        "6B": "explicit",
    }
    for name, (spec, _) in specs.items():
        ratio = subnet_param_count(model, spec) / (elastic.budgets[name] * parent)
        assert abs(ratio - 1) <= router.target_tolerance, (name, ratio)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"attention_heads": 8}, "at most 4"),  # more heads than the parent
        ({"attention_heads": 3}, "multiple of 2"),  # breaks the query groups
        ({"mamba_heads": 3}, "Mamba heads"),
        ({"mamba_head_dim": 17}, "head_dim=17"),
        ({"ffn": 63}, "FFN neurons"),  # not a multiple of ffn_nesting_blocks=2
        ({"hidden": 65}, "hidden=65"),
    ],
)
def test_invalid_specs_raise(elastic_model, small_config, kwargs, match) -> None:
    spec = SubnetSpec.homogeneous(small_config, **kwargs)
    with pytest.raises(ValueError, match=match):
        elastic_model.set_subnet(spec)


def test_invalid_elastic_configs_name_valid_values(small_config) -> None:
    with pytest.raises(ValueError, match=r"valid values are \[2, 4\]"):
        ElasticConfig(budgets={"a": 1.0}, attention_head_choices=(3,)).validate_for(small_config)
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        ElasticConfig(budgets={"a": 1.0}).validate_for(
            small_config, ParallelConfig(tensor_parallel_size=2)
        )
    with pytest.raises(ValueError, match=r"budgets\['6B'\]"):
        ElasticConfig(budgets={"6B": 1.5})
    with pytest.raises(ValueError, match="mode"):
        ElasticConfig(budgets={"a": 1.0}, mode="prune")
    cfg = dataclasses.replace(small_config)
    with pytest.raises(ValueError, match="depth"):
        ElasticConfig(budgets={"a": 1.0}, depth_choices=(7,)).validate_for(cfg)
