"""``examples/tiny_moe`` end to end at reduced size: corpus + tokenizer -> pretrain the hybrid
Mamba + attention + MoE parent -> importance (experts ranked and permuted with their router
rows) -> stage 1 -> stage 2 -> HF export of every budget (stock transformers NemotronH ``moe``
layers) -> evaluation of the elastic checkpoint and of an export.

The steps are the tools a user runs (docs/moe.md, "Tiny MoE example"), called in one child
process (``python tests/e2e/test_tiny_moe.py OUT``) so that torch, megatron-core and
transformers are imported once; the test reads what they wrote."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "tiny_moe"
TASKS = ("chain_sum", "simple_equations")
BUDGETS = ("full", "75%", "50%")
HF_REL_TOL = 1e-6
"""The HF export tests' bound on max |logits diff| / max |logits| (test_hf_convert.py)."""


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _latest(save: Path) -> Path:
    return save / json.loads((save / "latest.json").read_text())["checkpoint"]


def run_pipeline(out: Path) -> None:
    """Every step of the recipe at reduced size into ``out``; ``out/steps.json`` holds each
    step's wall time, ``out/hf_logits.json`` each exported budget's logits check."""
    from megatron_elastic import train

    seconds: dict[str, float] = {}

    def step(name: str, main, *argv: str) -> None:
        started = time.time()
        code = main([str(a) for a in argv])
        if code != 0:
            raise SystemExit(f"step {name} exited {code}: {' '.join(map(str, argv))}")
        seconds[name] = round(time.time() - started, 2)

    data, tok = out / "data", out / "data" / "tokenizer.json"
    common = [f"data.tokenizer={tok}", f"data.blend={data / 'train'}"]
    corpus, prepare = _tool("make_tiny_corpus"), _tool("prepare_data")
    step(
        "corpus",
        corpus.main,
        *("--output", out / "corpus", "--num-train", 300, "--num-valid", 40),
        *("--tasks", *TASKS, "--problem-size", "short"),
    )
    step(
        "tokenizer + data",
        prepare.main,
        *("--input", out / "corpus" / "train.jsonl", "--train-tokenizer", 512),
        *("--split-digits", "--output", data / "train", "--append-eod"),
    )
    step(
        "valid data",
        prepare.main,
        *("--input", out / "corpus" / "valid.jsonl", "--tokenizer", tok),
        *("--output", data / "valid", "--append-eod"),
    )
    step(
        "pretrain",
        train.main,
        *("--config", RECIPE / "pretrain.yaml", *common, f"checkpoint.save={out / 'pretrain'}"),
        *("train.steps=6", "optim.warmup_steps=2", "train.seq_length=64", "data.valid_samples=8"),
    )
    step(
        "importance",
        _tool("estimate_importance").main,
        *("--elastic-config", RECIPE / "elastic.yaml", "--checkpoint", _latest(out / "pretrain")),
        *("--data", data / "train", "--output", out / "ranked"),
        *("--num-samples", 4, "--seq-length", 64),
    )
    stages = [
        *common,
        f"distill.teacher_checkpoint={out / 'ranked'}",
        *("train.steps=3", "optim.warmup_steps=1", "router.warmup_steps=1"),
        *("router.anneal_steps=6", "data.valid_samples=4"),
    ]
    step(
        "stage1",
        train.main,
        *("--config", RECIPE / "stage1.yaml", *stages, "train.seq_length=64"),
        *("train.micro_batch_size=2", "train.global_batch_size=6"),
        *(f"checkpoint.init={out / 'ranked'}", f"checkpoint.save={out / 'stage1'}"),
    )
    step(
        "stage2",
        train.main,
        *("--config", RECIPE / "stage2.yaml", *stages, "train.seq_length=128"),
        *(f"checkpoint.init={out / 'stage1'}", f"checkpoint.save={out / 'stage2'}"),
    )
    elastic = _latest(out / "stage2")
    step(
        "export",
        _tool("export_budget").main,
        *("--checkpoint", elastic, "--all", "--format", "hf", "--output", out / "export"),
        *("--tokenizer", tok),
    )
    started = time.time()
    (out / "hf_logits.json").write_text(json.dumps(_hf_logits(elastic, out / "export"), indent=1))
    seconds["hf logits check"] = round(time.time() - started, 2)
    evaluation = [
        *("--data", data / "valid", "--split", "0,1,0", "--seq-length", 64),
        *("--num-problems", 4, "--max-new-tokens", 16, "--tokenizer", tok),
        *("--exclude", out / "corpus" / "train.jsonl", "--tasks", *TASKS),
        *("--problem-size", "short", "--batch-size", 4),
    ]
    evaluate = _tool("evaluate")
    step(
        "evaluate elastic",
        evaluate.main,
        *("--checkpoint", elastic, "--budgets", "all"),
        *("--output", out / "eval" / "elastic.json", *evaluation),
    )
    step(
        "evaluate HF 50%",
        evaluate.main,
        *("--checkpoint", out / "export" / "50%", "--budgets", "all"),
        *("--output", out / "eval" / "hf_50%.json", *evaluation),
    )
    (out / "steps.json").write_text(json.dumps(seconds, indent=1))


def _hf_logits(elastic: Path, export: Path) -> dict[str, dict]:
    """Per budget: the elastic checkpoint's logits at the budget against stock transformers'
    on the exported directory (max |diff| / max |logits|), and the exported expert counts."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.eval.loading import open_checkpoint
    from megatron_elastic.export.hf import use_torch_nemotron_h_kernels
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups
    from megatron_elastic.training.lm_step import position_ids_like

    use_torch_nemotron_h_kernels()
    pgs = init_process_groups(ParallelConfig())
    checks = {}
    try:
        ckpt = open_checkpoint(elastic, pgs)
        vocab = ckpt.model_config.vocab_size
        tokens = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))
        for budget in ckpt.budgets():
            ckpt.set_budget(budget)
            spec = ckpt.spec(budget)
            hf = AutoModelForCausalLM.from_pretrained(export / budget, dtype=torch.float32).eval()
            with torch.no_grad():
                ours = ckpt.model(tokens, position_ids_like(tokens), None)
                diff = (hf(tokens).logits - ours).abs().max() / ours.abs().max()
            moe = [c for c in spec.layers if c.kind == "moe"]
            checks[budget] = {
                "rel_diff": diff.item(),
                "spec_experts": sorted({dict(c.sizes)["moe_experts"] for c in moe}),
                "hf_experts": hf.config.n_routed_experts,
                "hf_params": sum(p.numel() for p in hf.parameters()),
                "params": ckpt.params(budget),
            }
    finally:
        destroy_process_groups()
    return checks


def _weights(checkpoint: Path, scratch: Path) -> dict:
    """A checkpoint's tensors by megatron name (its dist_checkpointing shards, read as one)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "weights", scratch)
    return torch.load(scratch, weights_only=False)


def test_reduced_tiny_moe_pipeline(tmp_path) -> None:
    out = tmp_path / "tiny_moe"
    done = subprocess.run(
        [sys.executable, __file__, str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(json.loads((out / "steps.json").read_text()))
    import torch

    # Importance ranked every MoE layer's experts (REAP; routing frequency reported) and moved
    # each expert's router row and bias entry with it: the ranked parent's gate is the pretrained
    # gate with its experts in the ranked order (and its columns in the hidden ranking's).
    ranking = json.loads((out / "ranked" / "importance.json").read_text())
    moe_layers = [j for j, s in enumerate("MEM*EME") if s == "E"]
    assert sorted(map(int, ranking["moe_experts"])) == moe_layers
    pretrained = _weights(_latest(out / "pretrain"), tmp_path / "pretrain.pt")
    ranked = _weights(out / "ranked", tmp_path / "ranked.pt")
    hidden = torch.tensor(ranking["hidden"])
    for j in moe_layers:
        order = ranking["moe_experts"][str(j)]
        assert sorted(order) == list(range(16)) and order != list(range(16)), j
        assert len(ranking["scores"]["moe_experts"][str(j)]["frequency"]) == 16
        gate, bias = (f"decoder.layers.{j}.mlp.router.{n}" for n in ("weight", "expert_bias"))
        assert torch.equal(ranked[gate], pretrained[gate][order][:, hidden]), j
        assert torch.equal(ranked[bias], pretrained[bias][order]), j

    # Both stages trained from their init and logged every budget; stage 2 resumed stage 1's
    # router (the anneal continues) and its checkpoint loads for evaluation below.
    temperatures = {}
    for stage in ("stage1", "stage2"):
        records = [json.loads(x) for x in (out / stage / "metrics.jsonl").read_text().splitlines()]
        temperatures[stage] = [r["router/temperature"] for r in records if "router/temp" in str(r)]
        losses = [r for r in records if any(k.startswith("loss/") for k in r)]
        assert losses and losses[-1]["step"] == 3, stage
        logged = {k.split("/", 1)[1] for r in losses for k in r if k.startswith("loss/")}
        assert logged & set(BUDGETS), (stage, logged)
        assert all(math.isfinite(v) for r in losses for k, v in r.items() if "loss/" in k)

    # The Gumbel temperature anneals on from where stage 1 left it (stage 2 loaded its router).
    assert temperatures["stage2"][0] < temperatures["stage1"][-1] < temperatures["stage1"][0]

    # Every budget evaluates from the stage-2 checkpoint: sizes ordered, losses finite.
    rows = {
        r["budget"]: r for r in json.loads((out / "eval" / "elastic.json").read_text())["results"]
    }
    assert set(rows) == set(BUDGETS)
    assert rows["full"]["params"] > rows["75%"]["params"] > rows["50%"]["params"]
    for budget, row in rows.items():
        assert math.isfinite(row["val_loss"]) and row["total"] == 4, budget

    # Each exported budget is the elastic model at that budget, computed by stock transformers.
    checks = json.loads((out / "hf_logits.json").read_text())
    assert set(checks) == set(BUDGETS)
    for budget, check in checks.items():
        assert check["rel_diff"] <= HF_REL_TOL, (budget, check)
        assert check["spec_experts"] == [check["hf_experts"]], (budget, check)
        assert check["hf_params"] == check["params"] == rows[budget]["params"], (budget, check)
    assert checks["50%"]["hf_experts"] < 16  # the expert axis carries the smallest budget
    hf = json.loads((out / "eval" / "hf_50%.json").read_text())["results"][0]
    assert hf["params"] == rows["50%"]["params"]
    assert math.isclose(hf["val_loss"], rows["50%"]["val_loss"], rel_tol=1e-4)
    assert hf["accuracy"] == rows["50%"]["accuracy"]


if __name__ == "__main__":
    run_pipeline(Path(sys.argv[1]))
