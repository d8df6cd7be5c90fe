"""Model/parallel config validation, strict YAML loading and parameter accounting."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_elastic.config import (
    ModelConfig,
    ParallelConfig,
    check_parallel_fit,
    load_model_config,
)
from megatron_elastic.model import count_parameters
from megatron_elastic.model.param_count import layer_parameter_counts

ROOT = Path(__file__).parents[2]
NANO_12B = ROOT / "examples" / "nemotron_nano_12b" / "model.yaml"
NANO3_30B = ROOT / "examples" / "nemotron3_nano_30b" / "model.yaml"


def test_nano_12b_recipe_has_paper_dims_and_count() -> None:
    cfg = load_model_config(NANO_12B)
    kinds = cfg.layer_kinds()
    assert (len(kinds), kinds.count("mamba"), kinds.count("mlp"), kinds.count("attention")) == (
        62,
        28,
        28,
        6,
    )
    assert (cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size) == (5120, 20480, 131072)
    total = count_parameters(cfg)
    assert abs(total - 12.31e9) <= 0.005 * 12.31e9, total


def test_nemotron3_nano_recipe_has_the_published_counts() -> None:
    """NVIDIA states 31.6B total and 3.2B active parameters (3.6B with embeddings): our counts of
    the recipe's published dims give them (the 3.2B leaves out the input embedding lookup)."""
    from megatron_elastic.model.param_count import count_active_parameters

    cfg = load_model_config(NANO3_30B)
    kinds = cfg.layer_kinds()
    assert (len(kinds), kinds.count("mamba"), kinds.count("moe"), kinds.count("attention")) == (
        52,
        23,
        23,
        6,
    )
    assert (cfg.num_moe_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size) == (128, 6, 1856)
    total, active = count_parameters(cfg), count_active_parameters(cfg)
    embedding = cfg.vocab_size * cfg.hidden_size
    assert abs(total - 31.6e9) <= 0.005 * 31.6e9, total
    assert abs(active - 3.6e9) <= 0.01 * 3.6e9, active
    assert abs(active - embedding - 3.2e9) <= 0.01 * 3.2e9, active - embedding


def test_invariant_tiny_count_equals_instantiated_model(pgs, tiny_config) -> None:
    from megatron_elastic.model import build_hybrid_model

    model = build_hybrid_model(tiny_config, pgs)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(tiny_config)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in model.decoder.layers]
    assert per_layer == layer_parameter_counts(tiny_config)
    assert 1_000_000 <= count_parameters(tiny_config) <= 20_000_000
    assert set(tiny_config.hybrid_pattern) == {"M", "*", "-"}


def _with(cfg: ModelConfig, **changes) -> dict:
    return {**dataclasses.asdict(cfg), **changes}


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"num_attention_heads": 6, "num_query_groups": 4}, "num_attention_heads"),
        ({"mamba_num_heads": 6, "mamba_num_groups": 4}, "mamba_num_heads"),
        ({"hybrid_pattern": "M-X"}, "hybrid_pattern"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"mamba_state_dim": -1}, "mamba_state_dim"),
    ],
)
def test_impossible_shapes_name_the_field(tiny_config, changes, field) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig(**_with(tiny_config, **changes))


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"num_attention_heads": 3, "num_query_groups": 1}, "num_attention_heads"),
        ({"num_query_groups": 1, "num_attention_heads": 8}, "num_query_groups"),
        ({"mamba_num_groups": 1}, "mamba_num_groups"),
        ({"vocab_size": 4095}, "vocab_size"),
    ],
)
def test_tp_size_must_divide_split_dims(tiny_config, changes, field) -> None:
    cfg = ModelConfig(**_with(tiny_config, **changes))
    with pytest.raises(ValueError, match=rf"{field}=.*tensor_parallel_size=2"):
        check_parallel_fit(cfg, ParallelConfig(tensor_parallel_size=2))


def test_pipeline_layout(tiny_config) -> None:
    assert ParallelConfig(pipeline_parallel_size=2).pipelined_pattern("M-M*-M") == "M-M|*-M"
    with pytest.raises(ValueError, match="pipeline_layout"):
        check_parallel_fit(
            tiny_config.__class__(**_with(tiny_config, hybrid_pattern="M-*")),
            ParallelConfig(pipeline_parallel_size=2),
        )
    uneven = ParallelConfig(pipeline_parallel_size=2, pipeline_layout=(2, 1))
    assert uneven.pipelined_pattern("M-*") == "M-|*"


def test_unknown_yaml_key_is_rejected_with_suggestion(tmp_path, tiny_config) -> None:
    data = dataclasses.asdict(tiny_config)
    data["hiden_size"] = data.pop("hidden_size")
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="did you mean 'hidden_size'"):
        load_model_config(path)


def test_missing_config_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_model_config(tmp_path / "nope.yaml")


def test_inspect_model_prints_table_and_count() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "inspect_model.py"), "--config", str(NANO_12B)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == f"params: {count_parameters(load_model_config(NANO_12B))}"
    assert sum(1 for line in lines if line.lstrip().startswith(("61 ", "0 "))) == 2
    assert "mamba" in done.stdout and "attention" in done.stdout
