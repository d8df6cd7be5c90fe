"""tools/estimate_importance.py end to end: parent checkpoint + indexed data -> ranked checkpoint
that computes the same function, plus clear errors for bad input. Also checkpoint basics."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_elastic.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from megatron_elastic.data import write_indexed_dataset
from megatron_elastic.elastic import ElasticConfig, build_elastic_model
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.training.lm_step import position_ids_like

ROOT = Path(__file__).parents[2]
TOOL = ROOT / "tools" / "estimate_importance.py"
MODEL_YAML = ROOT / "tests" / "fixtures" / "hybrid_small.yaml"


@pytest.fixture(scope="module")
def parent(tmp_path_factory, pgs, small_config):
    work = tmp_path_factory.mktemp("importance_cli")
    torch.manual_seed(3)
    model = build_hybrid_model(small_config, pgs)
    with torch.no_grad():  # off their init value of 1, so a norm or D left unpermuted shows
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", ".D")):
                p.uniform_(0.5, 1.5)
    save_checkpoint(work / "parent", model, small_config, kind="parent", metadata={"step": 0})
    g = torch.Generator().manual_seed(0)
    docs = [
        torch.randint(0, small_config.vocab_size, (int(n),), generator=g).tolist()
        for n in torch.randint(20, 200, (30,), generator=g)
    ]
    write_indexed_dataset(work / "data" / "calib", docs, small_config.vocab_size)
    return work, model


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=600
    )


def test_invariant_ranked_checkpoint_keeps_function(parent, pgs, small_config) -> None:
    work, model = parent
    done = _run(
        "--model-config",
        str(MODEL_YAML),
        "--checkpoint",
        str(work / "parent"),
        "--data",
        str(work / "data" / "calib"),
        "--num-samples",
        "6",
        "--seq-length",
        "32",
        "--batch-size",
        "3",
        "--ffn-nesting-blocks",
        "2",
        "--output",
        str(work / "ranked"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(work / "ranked")
    assert manifest["kind"] == "ranked"
    assert sorted(manifest["metadata"]["layer_ranking"]) == list(range(small_config.num_layers))
    info = json.loads((work / "ranked" / "importance.json").read_text())
    assert len(info["hidden"]) == small_config.hidden_size and "scores" in info
    ranked = build_elastic_model(
        small_config, ElasticConfig(budgets={"a": 1.0}, ffn_nesting_blocks=2), pgs
    )
    load_checkpoint(work / "ranked", ranked, small_config, kinds=("ranked",))
    tokens = torch.randint(0, small_config.vocab_size, (2, 40))
    with torch.no_grad():
        ref = model(tokens, position_ids_like(tokens), None)
        out = ranked(tokens, position_ids_like(tokens), None)
    # a permutation moves weights exactly: fp32 summation order only (measured 3.3e-7 at logit
    # scale 0.77, perturbed parent; test_importance.py's PERMUTATION_TOL, ~3x)
    assert (ref - out).abs().max().item() <= 1e-6
    assert not torch.equal(
        ranked.embedding.word_embeddings.weight, model.embedding.word_embeddings.weight
    )  # permuted, not copied


def test_bad_inputs_fail_clearly_before_compute(parent, tmp_path, run_cli) -> None:
    work, _ = parent
    base = ["--model-config", str(MODEL_YAML), "--output", str(tmp_path / "out")]
    tiny = ROOT / "examples" / "tiny" / "model.yaml"
    tool, calib = "tools/estimate_importance.py", str(work / "data" / "calib")
    tiny_base = ["--model-config", str(tiny), "--output", str(tmp_path / "out")]
    missing_data, absent, other_arch = run_cli(
        [
            (tool, [*base, "--checkpoint", str(work / "parent"), "--data", str(work / "nope")]),
            (tool, [*base, "--checkpoint", str(tmp_path / "absent"), "--data", calib]),
            (tool, [*tiny_base, "--checkpoint", str(work / "parent"), "--data", calib]),
        ]
    )
    done = missing_data
    assert done["rc"] == 2 and "missing" in done["stderr"] and "nope.bin" in done["stderr"]
    assert absent["rc"] == 2 and "does not exist" in absent["stderr"]
    assert other_arch["rc"] == 2 and "different architecture" in other_arch["stderr"]
    assert not (tmp_path / "out").exists()


def test_invariant_checkpoint_refuses_other_architecture_and_corruption(
    parent, pgs, small_config, tmp_path
) -> None:
    work, model = parent
    other = dataclasses.replace(small_config, ffn_hidden_size=64)
    with pytest.raises(ValueError, match="ffn_hidden_size: checkpoint 128 vs config 64"):
        load_checkpoint(work / "parent", build_hybrid_model(other, pgs), other)
    with pytest.raises(ValueError, match="holds a 'parent' model"):
        load_checkpoint(work / "parent", model, small_config, kinds=("elastic",))
    broken = tmp_path / "broken"
    (broken / "weights").mkdir(parents=True)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        read_manifest(broken)


def test_save_replaces_atomically(pgs, small_config, tmp_path) -> None:
    model = build_hybrid_model(small_config, pgs)
    save_checkpoint(tmp_path / "ckpt", model, small_config, kind="parent", metadata={"v": 1})
    save_checkpoint(tmp_path / "ckpt", model, small_config, kind="parent", metadata={"v": 2})
    assert read_manifest(tmp_path / "ckpt")["metadata"] == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no tmp/old leftovers
