"""Exported Hugging Face directories evaluate like the elastic model they came from:
``tools/evaluate.py`` on each ``export_budget.py --format hf`` directory gives the elastic
checkpoint's validation loss per budget (rel 1e-4), accuracy and parameter count in the same JSON
rows; a heterogeneous (remote-code) export matches too; the HF model in our greedy loop decodes
what ``transformers``' own greedy ``generate`` decodes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_elastic.data.indexed import write_indexed_dataset
from megatron_elastic.data.reasoning import generate_records, render_prompt, render_text
from megatron_elastic.data.tokenizers import train_bpe_tokenizer
from megatron_elastic.elastic.budget import subnet_param_count
from megatron_elastic.eval import (
    greedy_generate,
    model_completer,
    open_checkpoint,
    reasoning_accuracy,
    validation_batches,
    validation_loss,
)
from megatron_elastic.eval.hf_model import HFEvalCheckpoint, is_hf_directory
from megatron_elastic.eval.loading import checkpoint_budgets
from megatron_elastic.export.hf import EXPORT_MANIFEST, export_subnet_to_hf

ROOT = Path(__file__).parents[2]
SEQ, MBS, SAMPLES = 64, 2, 6
NUM_PROBLEMS, NEW_TOKENS = 4, 8
REL = 1e-4


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / tool), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def _evaluate_main():
    """tools/evaluate.py's ``main``, for in-process calls that stop before process groups."""
    spec = importlib.util.spec_from_file_location("tool_evaluate_hf", ROOT / "tools/evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A BPE tokenizer trained on reasoning records and an indexed dataset of them."""
    root = tmp_path_factory.mktemp("eval_hf_data")
    texts = [render_text(r) for r in generate_records(60, seed=7)]
    tokenizer = train_bpe_tokenizer(texts, 400, root / "tokenizer.json")
    docs = [[*tokenizer.encode(t), tokenizer.eod] for t in texts]
    prefix = write_indexed_dataset(root / "valid", docs, tokenizer.vocab_size)
    return root / "tokenizer.json", tokenizer, prefix


@pytest.fixture(scope="module")
def hf_exports(perturbed_checkpoint, data, tmp_path_factory) -> Path:
    """Every budget of the tiny elastic checkpoint exported by ``export_budget.py --format hf``
    with the tokenizer."""
    out = tmp_path_factory.mktemp("eval_hf_export")
    args = ["--checkpoint", str(perturbed_checkpoint[0]), "--all", "--format", "hf"]
    done = _run("export_budget.py", *args, "--tokenizer", str(data[0]), "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _common(prefix: Path) -> list[str]:
    args = ["--data", str(prefix), "--seq-length", str(SEQ), "--micro-batch-size", str(MBS)]
    args += ["--max-samples", str(SAMPLES), "--num-problems", str(NUM_PROBLEMS)]
    return [*args, "--max-new-tokens", str(NEW_TOKENS), "--batch-size", "3"]


def test_invariant_evaluate_cli_on_hf_exports_matches_the_elastic_checkpoint(
    perturbed_checkpoint, hf_exports, data, tmp_path, run_cli
) -> None:
    tok_path, _, prefix = data
    common = _common(prefix)
    budgets = ["full", "75%", "50%"]
    # the elastic checkpoint, then each export with no --tokenizer (its own tokenizer.json), as
    # separate evaluate.py runs in one process (megatron and transformers imported once)
    elastic_args = [str(perturbed_checkpoint[0]), *common, "--tokenizer", str(tok_path)]
    runs = run_cli(
        [("tools/evaluate.py", ["--checkpoint", *elastic_args, "--output", str(tmp_path / "e")])]
        + [
            (
                "tools/evaluate.py",
                ["--checkpoint", str(hf_exports / b), *common, "--output", str(tmp_path / b)],
            )
            for b in budgets
        ]
    )
    for done in runs:
        assert done["rc"] == 0, done["stderr"][-3000:] + str(done["traceback"])
    elastic = json.loads((tmp_path / "e").read_text())
    rows = {r["budget"]: r for r in elastic["results"]}
    assert list(rows) == ["full", "75%", "50%"]
    for budget, ref in rows.items():
        directory = hf_exports / budget
        manifest = json.loads((directory / EXPORT_MANIFEST).read_text())
        assert manifest["format"] == "hf" and is_hf_directory(directory)
        assert checkpoint_budgets(directory) == ("hf", [budget])
        result = json.loads((tmp_path / budget).read_text())
        assert result["kind"] == "hf" and result["checkpoint"] == str(directory.resolve())
        for key in ("data", "split", "seq_length", "num_problems", "problem_seed"):
            assert result[key] == elastic[key], key
        [row] = result["results"]
        assert row.keys() == ref.keys()
        print(
            f"budget {budget}: val loss elastic {ref['val_loss']:.8f} hf {row['val_loss']:.8f} "
            f"(rel diff {abs(row['val_loss'] / ref['val_loss'] - 1):.2e}); accuracy "
            f"{ref['accuracy']} / {row['accuracy']}; params {ref['params']} / {row['params']}"
        )
        assert row["val_loss"] == pytest.approx(ref["val_loss"], rel=REL), budget
        assert row["perplexity"] == pytest.approx(ref["perplexity"], rel=REL), budget
        assert row["params"] == ref["params"] == manifest["params"], budget
        exact = ("budget", "val_tokens", "accuracy", "correct", "total", "per_task")
        assert {k: row[k] for k in exact} == {k: ref[k] for k in exact}, budget
        assert row["total"] == NUM_PROBLEMS and row["val_tokens"] == SAMPLES * SEQ


def test_invariant_remote_code_export_evaluates_like_the_elastic_subnet(
    perturbed_checkpoint, data, pgs, tmp_path, tiny_heterogeneous_spec
) -> None:
    tok_path, tokenizer, prefix = data
    _, model, _ = perturbed_checkpoint
    spec = tiny_heterogeneous_spec(model.model_config)
    meta = {"budget": "het"}
    export_subnet_to_hf(model, spec, tmp_path / "het", tokenizer_path=tok_path, metadata=meta)
    ckpt = open_checkpoint(tmp_path / "het", pgs)
    assert isinstance(ckpt, HFEvalCheckpoint) and ckpt.kind == "hf-remote-code"
    assert ckpt.budgets() == ["het"] and checkpoint_budgets(tmp_path / "het")[0] == ckpt.kind
    ckpt.set_budget("het")
    assert ckpt.params("het") == subnet_param_count(model.model_config, spec)
    batches = validation_batches(
        prefix, tokenizer, seq_length=SEQ, micro_batch_size=MBS, max_samples=SAMPLES
    )
    problems = generate_records(NUM_PROBLEMS, seed=20250)
    prompts = [render_prompt(r) for r in problems]
    model.set_subnet(spec, mode="slice")
    try:
        ref_loss = validation_loss(model, batches)
        ref_complete = model_completer(model, tokenizer, max_new_tokens=NEW_TOKENS)
        ref_texts = ref_complete(prompts)
        ref_acc = reasoning_accuracy(problems, ref_complete)
    finally:
        model.set_subnet(None)
    loss = validation_loss(ckpt.model, batches)
    print(f"remote code: val loss elastic {ref_loss.loss:.8f} hf {loss.loss:.8f}")
    assert loss.num_tokens == ref_loss.num_tokens
    assert loss.loss == pytest.approx(ref_loss.loss, rel=REL)
    complete = model_completer(ckpt.model, tokenizer, max_new_tokens=NEW_TOKENS)
    assert complete(prompts) == ref_texts
    acc = reasoning_accuracy(problems, complete)
    assert acc.predictions == ref_acc.predictions and acc.correct == ref_acc.correct
    with pytest.raises(ValueError, match=r"unknown budget 'full'; this Hugging Face directory"):
        ckpt.set_budget("full")


def test_invariant_hf_exports_decode_like_the_elastic_model(
    perturbed_checkpoint, hf_exports, data, pgs
) -> None:
    """Same completions of the reasoning prompts (EOD stop, tokenizer vocabulary) per budget, and
    our loop on the HF model equals transformers' greedy ``generate`` on it."""
    _, tokenizer, _ = data
    _, model, router = perturbed_checkpoint
    prompts = [render_prompt(r) for r in generate_records(NUM_PROBLEMS, seed=20250)]
    for budget in router.elastic_config.budgets:
        model.set_subnet(router.decide(budget, 0, None, deterministic=True).spec, mode="slice")
        try:
            ref = model_completer(model, tokenizer, max_new_tokens=NEW_TOKENS)(prompts)
        finally:
            model.set_subnet(None)
        ckpt = open_checkpoint(hf_exports / budget, pgs)
        assert model_completer(ckpt.model, tokenizer, max_new_tokens=NEW_TOKENS)(prompts) == ref
    ids = torch.randint(1, 400, (2, 9), generator=torch.Generator().manual_seed(4))
    ours = greedy_generate(ckpt.model, ids.tolist(), max_new_tokens=NEW_TOKENS)
    with torch.no_grad():
        theirs = ckpt.hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
        )
    assert ours.tokens == theirs[:, ids.size(1) :].tolist()


def test_hf_directory_errors(perturbed_checkpoint, hf_exports, data, tmp_path, capsys) -> None:
    main = _evaluate_main()
    directory = str(hf_exports / "75%")
    assert main(["--checkpoint", directory, "--budgets", "full"]) == 2
    assert "unknown budget 'full'; trained budgets: ['75%']" in capsys.readouterr().err
    assert main(["--checkpoint", directory, "--budgets", "0.6"]) == 2
    assert "unknown budget '0.6'" in capsys.readouterr().err
    assert main(["--checkpoint", directory, "--seq-length", "4096", "--num-problems", "0"]) == 2
    assert "exceeds the model's max_sequence_length 1024" in capsys.readouterr().err
    # exported without a tokenizer: none in the directory, none in the manifest
    _, model, router = perturbed_checkpoint
    spec = router.decide("50%", 0, None, deterministic=True).spec
    export_subnet_to_hf(model, spec, tmp_path / "bare", metadata={"budget": "50%"})
    assert main(["--checkpoint", str(tmp_path / "bare"), "--num-problems", "1"]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
    # a megatron checkpoint is not taken for an HF directory
    assert not is_hf_directory(perturbed_checkpoint[0])
