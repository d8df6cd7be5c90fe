"""Evaluation from one elastic checkpoint: generation at a budget equals the exported model's,
budgets switch without copying weights, per-budget validation loss equals a direct computation,
accuracy goes through reasoning-gym's scorers, and the evaluate/generate CLIs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_elastic.checkpoint import read_manifest
from megatron_elastic.data.gpt_data import build_gpt_datasets
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
from megatron_elastic.eval.accuracy import completion_answer
from megatron_elastic.eval.loading import recorded_tokenizer
from megatron_elastic.model import count_parameters
from megatron_elastic.training.lm_step import position_ids_like

ROOT = Path(__file__).parents[2]
TRAINED = "['50%', '75%', 'full']"
SEQ, MBS, SAMPLES = 32, 2, 8


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / tool), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def _tool(name: str):
    """A tools/ script as a module, to call ``main`` in-process on paths that exit before any
    process group is created."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A BPE tokenizer trained on reasoning records and an indexed dataset of them."""
    root = tmp_path_factory.mktemp("eval_data")
    texts = [render_text(r) for r in generate_records(60, seed=7)]
    tokenizer = train_bpe_tokenizer(texts, 400, root / "tokenizer.json")
    assert tokenizer.vocab_size <= 400 <= 4096  # fits the tiny model's vocabulary
    docs = [[*tokenizer.encode(t), tokenizer.eod] for t in texts]
    prefix = write_indexed_dataset(root / "valid", docs, tokenizer.vocab_size)
    return root / "tokenizer.json", tokenizer, prefix


@pytest.fixture(scope="module")
def loaded(perturbed_checkpoint, pgs):
    return open_checkpoint(perturbed_checkpoint[0], pgs)


@pytest.fixture(scope="module")
def exported(perturbed_checkpoint, tmp_path_factory):
    """Every budget exported as a standalone megatron checkpoint by tools/export_budget.py."""
    out = tmp_path_factory.mktemp("eval_export")
    args = ["--checkpoint", str(perturbed_checkpoint[0]), "--all", "--output", str(out)]
    done = _run("export_budget.py", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _prompts(lengths=(5, 9, 3), seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 4096, (n,), generator=g).tolist() for n in lengths]


def test_invariant_elastic_generation_equals_exported_model(loaded, exported, pgs) -> None:
    prompts = _prompts()
    for budget in loaded.budgets():
        loaded.set_budget(budget)
        ref = greedy_generate(loaded.model, prompts, max_new_tokens=12)
        plain = open_checkpoint(exported / budget, pgs)
        assert plain.kind == "exported" and plain.budgets() == [budget]
        assert plain.params(budget) == loaded.params(budget)
        plain.set_budget(budget)
        out = greedy_generate(plain.model, prompts, max_new_tokens=12)
        assert out.tokens == ref.tokens, budget
        assert all(len(t) == 12 for t in out.tokens) and not any(out.stopped)


def test_right_padded_batch_equals_one_prompt_at_a_time(loaded) -> None:
    loaded.set_budget("75%")
    prompts = _prompts((4, 11, 7), seed=1)
    batch = greedy_generate(loaded.model, prompts, max_new_tokens=10)
    for prompt, tokens in zip(prompts, batch.tokens, strict=True):
        assert greedy_generate(loaded.model, [prompt], max_new_tokens=10).tokens == [tokens]


def test_generation_stops_at_eos(loaded) -> None:
    loaded.set_budget("50%")
    prompts = _prompts((6, 8, 5), seed=2)
    ref = greedy_generate(loaded.model, prompts, max_new_tokens=10).tokens
    eos = ref[0][3]
    out = greedy_generate(loaded.model, prompts, max_new_tokens=10, eos_id=eos, pad_id=1)
    for row, tokens, stopped in zip(ref, out.tokens, out.stopped, strict=True):
        cut = row.index(eos) if eos in row else len(row)
        assert tokens == row[:cut] and stopped == (eos in row)
    assert out.stopped[0] and out.tokens[0] == ref[0][: ref[0].index(eos)]
    with pytest.raises(ValueError, match="max_sequence_length"):
        greedy_generate(loaded.model, prompts, max_new_tokens=1020, max_sequence_length=1024)


def test_switching_budgets_reuses_the_weights(loaded, perturbed_checkpoint, pgs) -> None:
    path, _, router = perturbed_checkpoint
    model = loaded.model
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    prompts = _prompts((7, 4), seed=3)
    tokens = torch.randint(0, 4096, (2, 16))
    switched, logits = {}, {}
    for budget in ["50%", "full", "75%", "50%"]:
        loaded.set_budget(budget)
        out = greedy_generate(model, prompts, max_new_tokens=8).tokens
        assert switched.setdefault(budget, out) == out  # back to a budget: same as before
        with torch.no_grad():
            logits[budget] = model(tokens, position_ids_like(tokens), None)
        spec = router.decide(budget, 0, None, deterministic=True).spec
        assert loaded.spec(budget) == spec
        assert loaded.params(budget) == subnet_param_count(loaded.model_config, spec)
    # one copy of the weights: same storage, parent's parameter count, nothing added
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    assert sum(p.numel() for p in model.parameters()) == count_parameters(loaded.model_config)
    assert not torch.allclose(logits["50%"], logits["75%"])
    for budget, out in switched.items():
        fresh = open_checkpoint(path, pgs)
        fresh.set_budget(budget)
        assert greedy_generate(fresh.model, prompts, max_new_tokens=8).tokens == out, budget
    assert loaded.params("50%") < loaded.params("75%") < loaded.params("full")


def test_unknown_budget_is_refused(loaded) -> None:
    with pytest.raises(ValueError, match=r"unknown budget '7B'; trained budgets: \['50%'"):
        loaded.set_budget("7B")
    with pytest.raises(ValueError, match="outside the trained range"):
        loaded.set_budget(0.2)


def test_invariant_validation_loss_per_budget_equals_direct_computation(
    loaded, exported, data, perturbed_checkpoint, pgs
) -> None:
    _, tokenizer, prefix = data
    _, model, router = perturbed_checkpoint
    batches = validation_batches(
        prefix, tokenizer, seq_length=SEQ, micro_batch_size=MBS, max_samples=SAMPLES
    )
    assert len(batches) == SAMPLES // MBS and batches[0]["tokens"].shape == (MBS, SEQ)
    _, valid, _ = build_gpt_datasets(
        prefix, seq_length=SEQ, tokenizer=tokenizer, num_samples=(None, None, None), split="0,1,0"
    )
    losses = {}
    for budget in loaded.budgets():
        loaded.set_budget(budget)
        result = validation_loss(loaded.model, batches)
        # direct: the fixture's own model at the router's spec, one sample at a time
        model.set_subnet(router.decide(budget, 0, None, deterministic=True).spec, mode="slice")
        total = count = 0.0
        with torch.no_grad():
            for i in range(SAMPLES):
                sample = valid[i]
                tokens = sample["tokens"].long()[None]
                logits = model(tokens, position_ids_like(tokens), None)[0]  # (s, V)
                ce = F.cross_entropy(logits.float(), sample["labels"].long(), reduction="none")
                total += float((ce * sample["loss_mask"]).sum())
                count += float(sample["loss_mask"].sum())
        model.set_subnet(None)
        assert result.num_tokens == count
        assert result.loss == pytest.approx(total / count, rel=1e-5), budget
        assert result.perplexity == pytest.approx(torch.tensor(total / count).exp().item())
        losses[budget] = result.loss
        # the exported standalone model of the budget has the same loss
        plain = open_checkpoint(exported / budget, pgs)
        assert validation_loss(plain.model, batches).loss == pytest.approx(result.loss, rel=1e-5)
    assert len({round(v, 6) for v in losses.values()}) == 3
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        validation_batches(prefix, tokenizer, seq_length=SEQ, micro_batch_size=10**4)


class _AnswerKnowingModel(nn.Module):
    """Stands in for a language model: logits pick, after each known prompt, the tokens of a
    scripted continuation and then EOD (tests the generation + scoring path, not a network)."""

    def __init__(self, scripts: dict[tuple[int, ...], list[int]], eod: int, vocab: int) -> None:
        super().__init__()
        self.scripts, self.eod, self.vocab = scripts, eod, vocab
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, tokens, position_ids, attention_mask, runtime_gather_output=None):
        b, s = tokens.shape
        logits = torch.zeros(b, s, self.vocab)
        for i in range(b):
            row = tokens[i].tolist()
            prompt = next(p for p in self.scripts if tuple(row[: len(p)]) == p)
            target = [*self.scripts[prompt], self.eod]
            for t in range(len(prompt) - 1, s):
                logits[i, t, target[min(t - len(prompt) + 1, len(target) - 1)]] = 1.0
        return logits


def test_accuracy_goes_through_the_task_scorers(data) -> None:
    _, tokenizer, _ = data
    records = generate_records(12, seed=11)
    assert len({r.task for r in records}) >= 3

    def completer(answers):
        by_prompt = {render_prompt(r): a for r, a in zip(records, answers, strict=True)}
        return lambda prompts: [f" some steps\n#### {by_prompt[p]}\n" for p in prompts]

    right = reasoning_accuracy(records, completer([r.answer for r in records]), batch_size=5)
    assert right.accuracy == 1.0 and right.correct == right.total == 12
    assert sum(c.total for c in right.per_task.values()) == 12
    assert all(c.accuracy == 1.0 for c in right.per_task.values())
    # a prediction containing the answer gets partial credit from some scorers: still wrong
    wrong = reasoning_accuracy(records, completer([f"{r.answer}0 1" for r in records]))
    assert wrong.accuracy == 0.0 and wrong.correct == 0 and wrong.total == 12
    silent = reasoning_accuracy(records, lambda prompts: ["no answer"] * len(prompts))
    assert silent.accuracy == 0.0 and silent.predictions == [None] * 12
    assert completion_answer(" 2\n#### 5\nQuestion: x?\nAnswer: #### 7") == "5"

    # the same through greedy generation and the tokenizer, with a model that knows the answers
    scripts = {
        tuple(tokenizer.encode(render_prompt(r))): tokenizer.encode(f" 1 + 1 = 2\n#### {r.answer}")
        for r in records
    }
    fake = _AnswerKnowingModel(scripts, tokenizer.eod, 4096)
    complete = model_completer(fake, tokenizer, max_new_tokens=40)
    assert reasoning_accuracy(records, complete, batch_size=4).accuracy == 1.0


def test_evaluate_cli(perturbed_checkpoint, loaded, data, tmp_path) -> None:
    path = perturbed_checkpoint[0]
    tok_path, tokenizer, prefix = data
    common = ["--data", str(prefix), "--tokenizer", str(tok_path), "--seq-length", str(SEQ)]
    common += ["--micro-batch-size", str(MBS), "--max-samples", str(SAMPLES)]
    common += ["--num-problems", "3", "--max-new-tokens", "6"]
    out = tmp_path / "results.json"
    done = _run("evaluate.py", "--checkpoint", str(path), *common, "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["budget"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["full", "75%", "50%"]
    batches = validation_batches(
        prefix, tokenizer, seq_length=SEQ, micro_batch_size=MBS, max_samples=SAMPLES
    )
    for budget, row in rows.items():
        loaded.set_budget(budget)
        assert row["val_loss"] == pytest.approx(validation_loss(loaded.model, batches).loss)
        assert row["params"] == loaded.params(budget)
        assert row["total"] == 3 and 0.0 <= row["accuracy"] <= 1.0
        assert sum(c["total"] for c in row["per_task"].values()) == 3
        assert budget in done.stdout
    assert "val loss" in done.stdout and "accuracy" in done.stdout


def test_sweep_budgets_measures_every_budget_and_plots(
    perturbed_checkpoint, loaded, data, tmp_path
) -> None:
    """tools/sweep_budgets.py: a row per trained budget and per interpolated fraction, whose loss
    and parameters are evaluate.py's; the measured memory of each budget's serving network and
    decode state equals the planner's exact count (subnet_memory at fp32), the full budget copies
    nothing; the table, JSON and PNG plot are written."""
    from megatron_elastic.elastic.budget import subnet_memory
    from megatron_elastic.model.layouts import MambaLayout

    path = perturbed_checkpoint[0]
    tok_path, tokenizer, prefix = data
    args = ["--checkpoint", str(path), "--data", str(prefix), "--tokenizer", str(tok_path)]
    args += ["--seq-length", str(SEQ), "--micro-batch-size", str(MBS)]
    args += ["--max-samples", str(SAMPLES), "--num-problems", "2", "--max-new-tokens", "4"]
    args += ["--interpolate", "2", "--prompt-tokens", "8", "--new-tokens", "4"]
    args += ["--repeats", "2", "--no-progress", "--output", str(tmp_path)]
    done = _run("sweep_budgets.py", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "sweep.json").read_text())["results"]
    fractions = loaded.router.elastic_config.budgets
    lo, hi = min(fractions.values()), max(fractions.values())
    grid = [round(lo + (hi - lo) / 3, 3), round(lo + 2 * (hi - lo) / 3, 3)]
    assert [r["budget"] for r in rows] == ["full", grid[1], "75%", grid[0], "50%"]
    batches = validation_batches(
        prefix, tokenizer, seq_length=SEQ, micro_batch_size=MBS, max_samples=SAMPLES
    )
    model_cfg = loaded.model_config
    for row in rows:
        budget = row["budget"]
        spec = loaded.spec(budget)
        loaded.set_budget(budget)
        assert row["val_loss"] == pytest.approx(validation_loss(loaded.model, batches).loss)
        assert row["params"] == row["active_params"] == loaded.params(budget)
        assert row["total"] == 2 and 0.0 <= row["accuracy"] <= 1.0
        assert row["decode_tok_s_min"] <= row["decode_tok_s"] <= row["decode_tok_s_max"]
        mem = subnet_memory(model_cfg, spec, seq_length=12, param_bytes=4, state_bytes=4)
        assert row["weights_bytes"] == mem.weights
        # the decode state keeps kernel - 1 conv inputs per Mamba layer; the planner counts the
        # kernel-wide conv state megatron-core and mamba-ssm allocate: one column more
        column = sum(
            MambaLayout(
                c.size("mamba_heads"),
                c.size("mamba_head_dim"),
                model_cfg.mamba_num_groups,
                model_cfg.mamba_state_dim,
            ).conv_size
            * 4
            for c in spec.layers
            if c.kind == "mamba" and c.active
        )
        assert column > 0
        assert row["state_bytes"] == mem.kv_cache + mem.mamba_state - column
    full, small = rows[0], rows[-1]
    assert full["copied_bytes"] == 0
    assert [r["params"] for r in rows] == sorted((r["params"] for r in rows), reverse=True)
    assert 0 < small["copied_bytes"] <= small["weights_bytes"]
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "sweep.md").read_text()
    assert f"| {grid[0]}* |" in table and "| 50% |" in table


def test_pareto_front_keeps_the_points_nothing_beats() -> None:
    from megatron_elastic.eval.sweep import pareto_front

    points = [(1.0, 1.0), (2.0, 0.0), (0.0, 2.0), (0.5, 0.5), (1.0, 1.0), (2.0, -1.0)]
    assert pareto_front(points) == [True, True, True, False, True, False]


def test_tokenizer_recorded_in_the_checkpoint_or_its_source(tmp_path) -> None:
    source = tmp_path / "elastic"
    (source / "weights").mkdir(parents=True)
    manifest = {"format_version": 1, "kind": "elastic", "metadata": {"tokenizer": "/t.json"}}
    (source / "manifest.json").write_text(json.dumps(manifest))
    assert recorded_tokenizer(read_manifest(source)) == "/t.json"
    exported = {"kind": "exported", "metadata": {"source_checkpoint": str(source)}}
    assert recorded_tokenizer(exported) == "/t.json"
    assert (
        recorded_tokenizer({"kind": "exported", "metadata": {"source_checkpoint": "/gone"}}) is None
    )


def test_evaluate_cli_errors(perturbed_checkpoint, data, capsys) -> None:
    path = str(perturbed_checkpoint[0])
    evaluate = _tool("evaluate")
    assert evaluate.main(["--checkpoint", path, "--budgets", "full,7B"]) == 2
    assert f"unknown budget '7B'; trained budgets: {TRAINED}" in capsys.readouterr().err
    # the checkpoint records no tokenizer
    assert evaluate.main(["--checkpoint", path, "--num-problems", "1"]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err


def test_generate_cli(perturbed_checkpoint, loaded, data) -> None:
    path = str(perturbed_checkpoint[0])
    tok_path, tokenizer, _ = data
    prompts = ["Question: What is 2 + 3?\\nAnswer:", "Question: Solve x + 1 = 3\\nAnswer:"]
    args = ["--checkpoint", path, "--tokenizer", str(tok_path), "--max-new-tokens", "6"]
    args += [a for p in prompts for a in ("--prompt", p)]
    done = _run("generate.py", *args, "--budget", "50%", "--budget", "full")
    assert done.returncode == 0, done.stderr[-3000:]
    ids = [tokenizer.encode(p.replace("\\n", "\n")) for p in prompts]
    sections = done.stdout.split("=== budget ")[1:]
    assert [s.split(":")[0] for s in sections] == ["50%", "full"]
    for budget, section in zip(["50%", "full"], sections, strict=True):
        loaded.set_budget(budget)
        out = greedy_generate(
            loaded.model,
            ids,
            max_new_tokens=6,
            eos_id=tokenizer.eod,
            vocab_size=tokenizer.vocab_size,
        )
        for tokens in out.tokens:
            # the pipe is read in text mode: a decoded "\r" (before print's "\n") arrives as "\n"
            text = tokenizer.decode(tokens).replace("\r\n", "\n").replace("\r", "\n")
            assert text in section


def test_generate_cli_errors(perturbed_checkpoint, data, capsys) -> None:
    path, tok_path = str(perturbed_checkpoint[0]), str(data[0])
    generate = _tool("generate")
    args = ["--checkpoint", path, "--tokenizer", tok_path, "--prompt", "Question:"]
    assert generate.main([*args, "--budget", "full", "--budget", "9B"]) == 2
    assert f"unknown budget '9B'; trained budgets: {TRAINED}" in capsys.readouterr().err
    assert generate.main([*args[:2], "--prompt", "Question:"]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
