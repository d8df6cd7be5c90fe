"""``benchmarks/bench_family.py --reduced`` end to end: every arm trains, is measured, and appears
in the report (tables, JSON, plots); the fixed-architecture arms really ran fixed architectures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
ELASTIC_ARMS = (
    "elastic_s0/stage1",
    "elastic_s0/stage2",
    "elastic_s1/stage1",
    "elastic_s1/stage2",
    "uniform",
    "fixed",
    "heterogeneous",
    "depth_floor",
    "depth_no_floor",
    "baseline",
)
SECTIONS = (
    "### Cost",
    "### Curriculum",
    "### Sampling in stage 2",
    "### Router",
    "### Untrained budgets",
    "### Depth",
)


def test_reduced_family_benchmark_reports_every_arm(tmp_path) -> None:
    out = tmp_path / "family"
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_family.py", "--reduced", "--output", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("tokens to reach equal validation loss, family over elastic: "), last
    assert "(paper: 7x vs Minitron-SSM, 360x vs pretraining)" in last
    report = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in report, section
    for figure in ("family_cost.png", "family_arms.png"):
        assert (out / figure).stat().st_size > 10_000, figure
        assert f"![]({figure})" in report

    data = json.loads((out / "report.json").read_text())
    res, runs = data["results"], data["runs"]
    for arm in ELASTIC_ARMS:
        assert set(res[arm]) == {"full", "75%", "50%"}, arm
        for budget, row in res[arm].items():
            for key in ("loss_short", "loss_long", "recall"):
                assert math.isfinite(row[key]), (arm, budget, key)
            assert row["params"] > 0 and len(row["pattern"]) == 10
    # Untrained fractions: router interpolation and the fixed architecture, both measured.
    for kind in ("untrained/router", "untrained/fixed"):
        assert set(res[kind]) == {"0.6", "0.85"}
    # The fixed arm trained full-depth architectures; the baseline ran seed 0's architectures.
    for budget in ("75%", "50%"):
        assert "." not in res["fixed"][budget]["pattern"]
        assert res["baseline"][budget]["params"] == res["elastic_s0/stage2"][budget]["params"]
    # Minitron runs (two seeds x two sizes) and scratch runs (two sizes): loss curves whose
    # tokens grow, and the child sizes of the elastic run they compress or pretrain.
    assert sorted(res["minitron"]) == ["s0/50%", "s0/75%", "s1/50%", "s1/75%"]
    assert sorted(res["scratch"]) == ["50%", "75%"]
    for curves in (res["minitron"], res["scratch"]):
        for key, points in curves.items():
            tokens = [p["tokens"] for p in points]
            assert len(points) >= 2 and tokens == sorted(tokens), key
            assert all(math.isfinite(p["loss_short"]) for p in points), key
    for budget in ("75%", "50%"):
        seed0 = res["elastic_s0/stage2"][budget]["params"]
        assert res["minitron"][f"s0/{budget}"][-1]["params"] == seed0
        assert res["scratch"][budget][-1]["params"] == seed0
    assert runs["tokens"]["elastic"] == runs["tokens"]["stage1"] + runs["tokens"]["stage2"]
    assert set(data["summary"]["minitron_ratio"]) == {"0", "1"}
    # Depth arm: the floor keeps an attention layer in every budget.
    assert all(res["depth_floor"][b]["pattern"].count("*") >= 1 for b in res["depth_floor"])
