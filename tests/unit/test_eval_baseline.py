"""The quickstart's baseline: the ranked parent pruned to the architecture the elastic model runs
at each budget, with no elastic training. It is the same sub-network (spec, parameter count) as
the elastic child, evaluated through the same loading, slicing and scoring code; only the weights
differ. Bad pairs of checkpoints are refused before any weight is read."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_elastic.checkpoint import save_checkpoint
from megatron_elastic.data.indexed import write_indexed_dataset
from megatron_elastic.data.reasoning import generate_records, render_text
from megatron_elastic.data.tokenizers import train_bpe_tokenizer
from megatron_elastic.elastic import build_elastic_model, load_elastic_recipe
from megatron_elastic.elastic.budget import subnet_param_count
from megatron_elastic.eval import EvalCheckpoint, open_checkpoint, validation_batches
from megatron_elastic.eval.loading import checkpoint_budgets
from megatron_elastic.eval.loss import validation_loss
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.training.lm_step import position_ids_like

ROOT = Path(__file__).parents[2]
SEQ, MBS, SAMPLES = 32, 2, 4


@pytest.fixture(scope="module")
def ranked(tmp_path_factory, pgs) -> tuple[Path, torch.nn.Module]:
    """A ranked checkpoint of the tiny parent whose weights differ from the elastic fixture's."""
    model_cfg, elastic = load_elastic_recipe(ROOT / "examples" / "tiny" / "elastic.yaml")
    torch.manual_seed(5)
    model = build_elastic_model(model_cfg, elastic, pgs)
    path = tmp_path_factory.mktemp("ranked") / "ranked"
    save_checkpoint(path, model, model_cfg, kind="ranked", metadata={"layer_ranking": None})
    return path, model


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("baseline_data")
    texts = [render_text(r) for r in generate_records(30, seed=3)]
    tokenizer = train_bpe_tokenizer(texts, 300, root / "tokenizer.json")
    docs = [[*tokenizer.encode(t), tokenizer.eod] for t in texts]
    prefix = write_indexed_dataset(root / "valid", docs, tokenizer.vocab_size)
    return root / "tokenizer.json", prefix


def test_baseline_is_the_elastic_architecture_with_the_ranked_weights(
    tiny_elastic_checkpoint, ranked, pgs
) -> None:
    elastic_path, _, router = tiny_elastic_checkpoint
    ranked_path, ranked_model = ranked
    child = open_checkpoint(elastic_path, pgs)
    base = open_checkpoint(ranked_path, pgs, architectures_from=elastic_path)
    # the same class, model type and budget switch as the elastic checkpoint: one code path
    assert type(base) is type(child) is EvalCheckpoint
    assert type(base.model) is type(child.model)
    assert base.kind == "ranked" and base.budgets() == child.budgets() == ["full", "75%", "50%"]
    assert checkpoint_budgets(ranked_path, architectures_from=elastic_path) == (
        "ranked",
        ["full", "75%", "50%"],
    )
    # the weights are the ranked parent's
    for name, value in base.model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, ranked_model.state_dict()[name]), name
    tokens = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    specs = set()
    for budget in base.budgets():
        spec = router.decide(budget, 0, None, deterministic=True).spec
        assert base.spec(budget) == child.spec(budget) == spec
        assert base.params(budget) == child.params(budget)
        assert base.params(budget) == subnet_param_count(base.model_config, spec)
        specs.add(spec)
        base.set_budget(budget)
        child.set_budget(budget)
        with torch.no_grad():
            got = base.model(tokens, position_ids_like(tokens), None)
            ranked_model.set_subnet(spec, mode="slice")
            direct = ranked_model(tokens, position_ids_like(tokens), None)
            ranked_model.set_subnet(None)
            trained = child.model(tokens, position_ids_like(tokens), None)
        assert torch.equal(got, direct), budget  # the ranked weights sliced to the child's spec
        assert not torch.allclose(got, trained), budget  # other weights than the elastic model's
    assert len(specs) == 3  # each budget its own sub-network
    assert base.params("50%") < base.params("75%") < base.params("full")


def test_evaluate_cli_baseline_rows_match_the_elastic_rows(
    tiny_elastic_checkpoint, ranked, data, pgs, tmp_path
) -> None:
    elastic_path, ranked_path = tiny_elastic_checkpoint[0], ranked[0]
    tok_path, prefix = data
    common = ["--data", str(prefix), "--tokenizer", str(tok_path), "--seq-length", str(SEQ)]
    common += ["--micro-batch-size", str(MBS), "--max-samples", str(SAMPLES)]
    common += ["--num-problems", "2", "--max-new-tokens", "4", "--budgets", "all"]
    rows = {}
    for name, flags in (
        ("elastic", ["--checkpoint", str(elastic_path)]),
        ("baseline", ["--checkpoint", str(ranked_path), "--architectures-from", str(elastic_path)]),
    ):
        out = tmp_path / f"{name}.json"
        argv = [*flags, "--output", str(out)]
        done = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "evaluate.py"), *argv, *common],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        rows[name] = json.loads(out.read_text())
    assert rows["baseline"]["kind"] == "ranked"
    assert rows["baseline"]["architectures_from"] == str(elastic_path.resolve())
    assert rows["elastic"]["architectures_from"] is None
    base = open_checkpoint(ranked_path, pgs, architectures_from=elastic_path)
    from megatron_elastic.data.tokenizers import load_tokenizer

    batches = validation_batches(
        prefix, load_tokenizer(tok_path), seq_length=SEQ, micro_batch_size=MBS, max_samples=SAMPLES
    )
    for b_row, e_row in zip(rows["baseline"]["results"], rows["elastic"]["results"], strict=True):
        assert b_row.keys() == e_row.keys()
        assert b_row["budget"] == e_row["budget"]
        assert b_row["params"] == e_row["params"] and b_row["spec"] == e_row["spec"]
        spec = dataclasses.asdict(base.spec(b_row["budget"]))
        assert b_row["spec"] == json.loads(json.dumps(spec))
        base.set_budget(b_row["budget"])
        assert b_row["val_loss"] == pytest.approx(validation_loss(base.model, batches).loss)
        assert b_row["val_loss"] != e_row["val_loss"]
        assert b_row["total"] == e_row["total"] == 2


def _evaluate_main():
    spec = importlib.util.spec_from_file_location("tool_evaluate", ROOT / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_bad_baseline_pairs_are_refused(
    tiny_elastic_checkpoint, ranked, small_config, pgs, tmp_path, capsys
) -> None:
    elastic_path, ranked_path = str(tiny_elastic_checkpoint[0]), str(ranked[0])
    other = tmp_path / "other_ranked"
    save_checkpoint(other, build_hybrid_model(small_config, pgs), small_config, kind="ranked")
    main = _evaluate_main()
    cases = [
        # the elastic checkpoint itself is not a baseline's weights
        ([elastic_path, elastic_path], "is of kind 'elastic'; --architectures-from evaluates"),
        # the architectures come from an elastic checkpoint's router
        ([ranked_path, ranked_path], "is of kind 'ranked'; pass an elastic checkpoint"),
        # a ranked checkpoint of another parent
        (
            [str(other), elastic_path],
            "have different parents (hybrid_pattern: 'M-*M-*' vs 'M-M*-M-M*-'; hidden_size: 64 vs",
        ),
    ]
    for (weights, source), message in cases:
        argv = ["--checkpoint", weights, "--architectures-from", source, "--num-problems", "0"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert len(err.strip().splitlines()) == 1, err
