"""The main job end to end at reduced size: corpus + tokenizer -> pretrain -> importance ->
stage 1 -> stage 2 -> HF export of every budget -> evaluation of the elastic model, the exports
and the baseline (the ranked parent pruned alike), as ``make quickstart`` runs it."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]


def test_reduced_quickstart_pipeline(tmp_path) -> None:
    out = tmp_path / "quickstart"
    done = subprocess.run(
        [sys.executable, "tools/quickstart.py", "--reduced", "--output", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in ("(1/", "stage 1:", "stage 2:", "export every budget", "baseline:", "finished in"):
        assert step in done.stdout, step
    # A quiet console: none of the expected third-party lines the console module filters.
    from megatron_elastic import console

    patterns = [m for m, _, _ in console._EXPECTED_WARNINGS]
    patterns += [m for _, m, _ in console._EXPECTED_LOG_RECORDS]
    patterns += [r"\[Gloo\] Rank", "Loading weights"]
    for line in (done.stdout + done.stderr).splitlines():
        assert not any(re.search(p, line) for p in patterns), line

    results = json.loads((out / "results.json").read_text())
    assert set(results["budgets"]) == {"full", "75%", "50%"}
    for budget, row in results["budgets"].items():
        elastic, hf = row["elastic"], row["exported_hf"]
        # The exported HF model is the elastic model at that budget: same size, same loss.
        assert hf["params"] == row["params"], budget
        assert math.isfinite(elastic["val_loss"])
        assert math.isclose(hf["val_loss"], elastic["val_loss"], rel_tol=1e-4), budget
        assert hf["accuracy"] == elastic["accuracy"], budget
        # The baseline runs the ranked parent's weights at the elastic child's architecture.
        base = row["baseline"]
        assert base["params"] == row["params"], budget
        assert math.isfinite(base["val_loss"]) and base["total"] == elastic["total"] == 4
    # Every stage logged from its first to its last step; pretraining lowered the loss.
    for stage in ("pretrain", "stage1", "stage2"):
        first, last = results[stage]["first"], results[stage]["last"]
        assert first["step"] < last["step"]
    pretrain = results["pretrain"]
    assert pretrain["last"]["loss/parent"] < pretrain["first"]["loss/parent"]
    # The elastic stages lowered the loss of every smaller budget: on the same held-out data and
    # at the same architecture, the elastic model beats the ranked parent pruned alike (where
    # stage 1 started from). Not asserted per logged window: a reduced stage's window is one
    # micro-batch per budget, whose data moves the loss more than 4 steps of training do (one
    # run: the 50% budget's KD loss went 0.0078 -> 0.0135 over stage 1 while its validation loss
    # fell below the baseline's). Not asserted for the full budget: it starts as the teacher
    # (the full quickstart ends it 0.5306 against the ranked parent's 0.5188).
    for budget in ("75%", "50%"):
        row = results["budgets"][budget]
        assert row["elastic"]["val_loss"] < row["baseline"]["val_loss"], (budget, row)
    assert (out / "results.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert "| budget | model | params |" in table
    for budget in ("full", "75%", "50%"):
        assert f"| {budget} | elastic |" in table and f"| {budget} | baseline |" in table
    evaluated = {
        name: {r["budget"]: r for r in json.loads((out / "eval" / name).read_text())["results"]}
        for name in ("elastic.json", "baseline.json")
    }
    for budget, row in evaluated["baseline.json"].items():
        assert row["spec"] == evaluated["elastic.json"][budget]["spec"], budget
    baseline_run = json.loads((out / "eval" / "baseline.json").read_text())
    assert baseline_run["kind"] == "ranked"
    assert baseline_run["checkpoint"] == str((out / "ranked").resolve())
    for budget in ("full", "75%", "50%"):
        assert (out / "export" / budget / "config.json").is_file()
