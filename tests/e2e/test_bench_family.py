"""``benchmarks/bench_family.py --reduced`` end to end: every arm trains, is measured, and appears
in the report (tables, JSON, plots), and the protocol's properties hold on what it wrote: the
search continues its lowest-loss candidate from that candidate's run, every token is counted,
the budget-sampling options drew what they promise, and each bootstrap interval holds its
point estimate."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
BUDGETS = {"full", "75%", "50%"}
SECTIONS = (
    "### Cost",
    "#### Minitron search",
    "#### Equal tokens",
    "### Curriculum",
    "### Training options",
    "### Sampling in stage 2",
    "### Router",
    "### Untrained budgets",
    "### Depth",
)
ABLATIONS = ("uniform", "fixed", "heterogeneous", "depth_floor", "depth_no_floor", "baseline")


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, str, dict]:
    out = tmp_path_factory.mktemp("family") / "family"
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_family.py", "--reduced", "--output", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout, json.loads((out / "report.json").read_text())


def test_reduced_family_benchmark_reports_every_arm(family) -> None:
    out, stdout, data = family
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("tokens to reach equal validation loss, family over elastic"), last
    assert "architecture given" in last and "with search" in last and "FLOPs" in last
    report = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in report, section
    for figure in ("family_cost.png", "family_arms.png"):
        assert (out / figure).stat().st_size > 10_000, figure
        assert f"![]({figure})" in report
    res = data["results"]
    elastic = [f"{arm}_s{s}" for arm in ("elastic",) for s in res["seeds"]]
    elastic += [f"{arm}_s{s}" for arm in ("fixes", "sandwich") for s in res["fix_seeds"]]
    assert res["seeds"] and res["fix_seeds"]
    keys = [f"{k}/{st}" for k in elastic for st in ("stage1", "stage2")] + list(ABLATIONS)
    sequences = None
    for arm in keys:
        assert set(res[arm]) == BUDGETS, arm
        for budget, row in res[arm].items():
            for key in ("loss_short", "loss_long", "recall"):
                assert math.isfinite(row[key]), (arm, budget, key)
            assert row["params"] > 0 and len(row["pattern"]) == 10
            # Per-sequence losses: the mean is their token-weighted mean, same sequences.
            n = row["seq_tokens"]
            assert row["loss_short"] == pytest.approx(sum(row["seq_loss_sum"]) / sum(n))
            assert sequences in (None, n) and len(n) >= 8
            sequences = n
    # The per-sequence sums give the project's validation loss (measured once, both ways).
    check = res["cross_check"]
    assert check["per_sequence"] == pytest.approx(check["validation_loss"], rel=1e-9)
    for kind in ("untrained/router", "untrained/fixed"):
        assert set(res[kind]) == {"0.6", "0.85"}
    for budget in ("75%", "50%"):
        assert "." not in res["fixed"][budget]["pattern"]
        assert res["baseline"][budget]["params"] == res["elastic_s0/stage2"][budget]["params"]
    assert sorted(res["scratch"]) == ["50%", "75%"]
    assert all(res["depth_floor"][b]["pattern"].count("*") >= 1 for b in res["depth_floor"])


def test_search_continues_its_lowest_loss_candidate_and_counts_every_token(family) -> None:
    out, _, data = family
    res, runs, sizes = data["results"], data["runs"], data["runs"]["sizes"]
    per_step = 12 * sizes["seq_stage1"]  # stage 1's batch at its context
    assert sorted(res["minitron"]) == sorted(
        f"s{s}/{b}" for s in res["seeds"] for b in ("75%", "50%")
    )
    elastic_tokens = runs["tokens"]["elastic"]

    def steps_of(fractions: list[float]) -> list[int]:
        return sorted({max(1, round(h * elastic_tokens / per_step)) for h in fractions})

    horizon_steps, continued_steps = steps_of(runs["horizons"]), steps_of(runs["continued"])
    for key, row in res["minitron"].items():
        record = runs["minitron"][key]
        trained = {k: c for k, c in row["candidates"].items() if "save" in c}
        assert len(row["candidates"]) == 4 and len(trained) >= 2, key
        for c in row["candidates"].values():
            assert "save" in c or c["same_as"] in trained
        # The winner is the lowest selection loss, and every continuation started from it.
        assert row["winner"] == min(trained, key=lambda k: trained[k]["select_loss"]), key
        winner = Path(trained[row["winner"]]["save"])
        assert len(record["continued"]) == len(continued_steps), key
        for save in record["continued"].values():
            log = out / "logs" / f"minitron_{Path(save).parent.name}_{Path(save).name}.log"
            started = [line for line in log.read_text().splitlines() if "initialised from" in line]
            assert len(started) == 1 and str(winner) in started[0], (key, started)
        # Tokens: each short run and horizon run trained exactly its steps' tokens; the search
        # curve charges every trained candidate.
        for c in trained.values():
            assert c["tokens"] == sizes["search_steps"] * per_step
        given = sorted(p["tokens"] for p in row["given"].values())
        assert given == [n * per_step for n in horizon_steps], key
        continued = sorted(p["tokens"] for p in row["continued"].values())
        assert continued == [n * per_step for n in continued_steps], key
    # The elastic runs' draws add up to their steps' micro-batches (3 per step).
    for key, flops in res["flops"].items():
        steps = sizes["stage1_steps" if key.endswith("stage1") else "stage2_steps"]
        drawn = flops["micro_batches"]
        assert sum(drawn.values()) == 3 * steps, key
        assert flops["flops"] > 0
        if key.startswith("sandwich"):  # both extremes every step
            assert drawn["full"] >= steps and drawn["50%"] >= steps, key
        if key.startswith("fixes") and key.endswith("stage1"):  # stratified 1/3 each: exact
            assert drawn == {b: steps for b in BUDGETS}, key


def test_ratios_and_intervals_follow_from_the_measurements(family) -> None:
    _, _, data = family
    res, runs, summary = data["results"], data["runs"], data["summary"]
    candidate_tokens = runs["tokens"]["search_candidate"]
    for level in ("stage1", "stage2"):
        per_seed = summary["levels"][level]
        assert set(per_seed) == {str(s) for s in res["seeds"]}
        for seed, r in per_seed.items():
            for arm in ("given", "search"):
                sizes = r[arm]["sizes"]
                # The ratio is the sizes' tokens over the elastic run's up to that level.
                total = sum(size["tokens"] for size in sizes.values())
                assert r[arm]["tokens"] * r["elastic_tokens"] == pytest.approx(total)
                assert r[arm]["flops"] > 0
                for budget, size in sizes.items():
                    assert size["tokens"] >= size["first"]
                    if arm == "search":  # every trained candidate's tokens charged first
                        row = res["minitron"][f"s{seed}/{budget}"]
                        trained = [c for c in row["candidates"].values() if "save" in c]
                        assert size["first"] == len(trained) * candidate_tokens, (seed, budget)
    assert set(summary["paired"]) == {f"s{s}/{b}" for s in res["seeds"] for b in ("75%", "50%")}
    for key, d in summary["paired"].items():
        low, high = d["ci"]
        assert low <= d["diff"] <= high and low < high, key
