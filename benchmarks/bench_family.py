#!/usr/bin/env python
"""The paper's claims in miniature (issue 27's protocol): one command trains an elastic family on
the tiny recipe and every comparison arm, then measures them side by side
(``benchmarks/family_measure.py``) and writes the report (``benchmarks/family_report.py``).

    python benchmarks/bench_family.py             # the study (estimate below)
    python benchmarks/bench_family.py --ablations # + the ablation arms
    python benchmarks/bench_family.py --reduced   # every arm (ablations too), tiny sizes (CI)

Every training run is the project's own trainer (``python -m megatron_elastic.train``), steps in
``family_steps.py``, the Minitron arms in ``family_minitron.py``. The parent is pretrained for
1600 steps (3.3M tokens, 4x the 819k of the study before issue 27), so the children do not
saturate a weak parent.

Arms (seeds 0, 1, 2 for the headline rows; 0 and 1 for ``fixes`` and ``sandwich``):

* ``elastic`` (the paper's sampling, ``router.full_budget: router``, budgets drawn independently
  per micro-batch): stage 1 (short context, uniform budgets) + stage 2 (long context,
  0.5/0.3/0.2), distilled from the ranked parent, routers trained with the budget loss: T tokens.
* ``fixes``: the same with issue 27's fixes (``router.full_budget: parent``,
  ``train.budget_sampling_mode: stratified``); ``sandwich``: with
  ``train.budget_sampling_mode: sandwich`` (every step the largest and the smallest budget).
* ``minitron given``: per smaller size, the seed's router architecture pruned from the ranked
  parent and distilled alone from the same teacher, in separate runs at 1/8, 1/4, 1/2 and 1 x T
  tokens, each a finished cosine schedule (``family_minitron.py`` says why not WSD branches).
* ``minitron search``: per smaller size, 4 candidate architectures at the size's cost (router,
  width-only, depth-pruned, mixed), each distilled for ``search_steps``; the best by validation
  loss continued from its short run at 1/8, 1/4 and 1/2 x T; all candidates' tokens charged.

With ``--ablations`` (always with ``--reduced``): ``uniform`` (stage 2 with uniform sampling),
``fixed`` (fixed full-depth width-only architectures, no router), ``heterogeneous`` (per-layer
routers), ``depth_floor`` / ``depth_no_floor`` (depth 6-10 with ``min_attention_layers`` 1 and
0) and ``scratch`` (each size pretrained from random weights, its curve read mid-schedule).
They are behind the flag because the default study's time goes to seeds and finished schedules.

Time (``--resume`` continues an interrupted run), estimated, not yet run in full: at most about
3.0 hours on 2 idle cores, likelier about 2.1. Single-thread CPU seconds per training step,
timed on 2026-12-07 as the difference of a 2-step and a 6-step run of each kind at the default
sizes (a shared machine, so upper bounds): pretraining 0.93, stage 1 1.78, stage 2 2.32,
Minitron 2.28 (75%) and 2.55 (50%). The study trains 1,600 pretraining steps, 7 x (100 + 40)
elastic steps and 6 x 426 Minitron steps (9,600 s), plus ~6 s of set-up per stage (82 stages),
ranking and data (~100 s) and measurement (~500 s; the old study's 361 s scaled by its rows):
~10,700 s. The same figures over-predict the old study's logged training time (3,900 s against
~2,800 s) by ~39%; scaled alike, ~2.1 hours. ``--ablations`` adds about 0.9 hours by the same
figures (two scratch pretrainings of 1,600 steps are most of it). ``--reduced``: one seed, 3
steps a stage, every arm (``tests/e2e/test_bench_family.py``).

``--jobs N`` (default 2): where arms are independent (the elastic arms; the Minitron arms of each
seed and size; the ablations) N training stages run at once, each in its own process with
``cpus // N`` threads. The tiny model gains little from a second thread, so on 2 cores two
one-thread stages do more work than one two-thread stage; each process pays its ~10 s import.
``--jobs 1`` runs every stage in this process, one at a time.

Results: ``<output>/report.md`` (tables, printed at the end), ``report.json`` and
``family_cost.png`` / ``family_arms.png``. Logs of every step in ``<output>/logs``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from megatron_elastic import cli  # first: quiets the console before torch is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))
from family_minitron import DEPTH_MIN, candidates, given_arm, search_arm
from family_steps import (
    TINY,
    Plan,
    Steps,
    curriculum,
    elastic_yaml,
    latest,
    prepare,
    pretrain,
    rank,
    router_specs,
    stage,
    write_yaml,
)

# (default, reduced) sizes.
SIZES = {
    "num_train": (12000, 600),
    "num_valid": (400, 80),
    "pretrain_steps": (1600, 6),
    "stage1_steps": (100, 3),
    "stage2_steps": (40, 3),
    "search_steps": (10, 2),
    "calibration_samples": (32, 8),
    "seq_stage1": (256, 64),
    "seq_stage2": (512, 128),
    "seq_long": (1024, 256),
    "curve_points": (10, 2),
    "seeds": (3, 1),
    "fix_seeds": (2, 1),
}
"""``seeds``: the paper's elastic arm and both Minitron arms; ``fix_seeds``: the ``fixes`` and
``sandwich`` arms (paired with the paper's arm seed by seed)."""
FIXES = ("router.full_budget=parent", "train.budget_sampling_mode=stratified")
SANDWICH = ("train.budget_sampling_mode=sandwich",)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/bench_family", help="directory for everything")
    parser.add_argument("--reduced", action="store_true", help="tiny sizes, every arm (CI)")
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="also the ablation arms (uniform, fixed, heterogeneous, depth, scratch)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="training stages run at once where the arms are independent (each in its own "
        "process with its share of the CPU threads; 1: one at a time, in this process)",
    )
    parser.add_argument(
        "--measure-only",
        action="store_true",
        help="measure and report the runs already in --output again, without training",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output (same sizes): finished steps are skipped, a stopped "
        "training stage resumes from its last checkpoint",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give 1 or more")
    out = Path(args.output).resolve()
    if args.measure_only:
        return measure_only(out)
    if out.exists() and any(out.iterdir()) and not args.resume:
        shutil.rmtree(out)
        print(f"[bench_family] removed the earlier run in {out}", flush=True)
    size = {k: v[1] if args.reduced else v[0] for k, v in SIZES.items()}
    plan = Plan(out, size, reduced=args.reduced)
    steps = Steps(plan, args.resume, args.jobs)
    started = time.time()

    from megatron_elastic.checkpoint import read_manifest
    from megatron_elastic.elastic.config import load_elastic_recipe

    prepare(steps)
    parent = pretrain(steps, "parent", TINY / "model.yaml", curve=False)
    base = elastic_yaml(plan, "elastic")
    ranked = rank(steps, "ranked", base, parent)
    # Depth choices follow the ranked parent's layer ranking (the trainer reads it from there).
    ranking = read_manifest(ranked)["metadata"]["layer_ranking"]
    seeds, fix_seeds = list(range(size["seeds"])), list(range(size["fix_seeds"]))
    runs: dict[str, Any] = {"ranked": str(ranked), "parent": str(latest(parent)), "elastic": {}}
    arms = [("elastic", seeds, ()), ("fixes", fix_seeds, FIXES), ("sandwich", fix_seeds, SANDWICH)]
    keys = [(f"{arm}_s{seed}", seed, extra) for arm, arm_seeds, extra in arms for seed in arm_seeds]
    steps.parallel(
        [partial(curriculum, steps, k, base, ranked, seed=seed, extra=x) for k, seed, x in keys]
    )
    for key, _, _ in keys:
        runs["elastic"][key] = {st: str(latest(out / key / st)) for st in ("stage1", "stage2")}

    model, elastic = load_elastic_recipe(base)
    elastic = dataclasses.replace(elastic, layer_ranking=tuple(ranking))
    smaller = {name: f for name, f in elastic.budgets.items() if f < 1}
    tokens = plan.tokens()["elastic"]
    tasks = {}
    for seed in seeds:
        specs = router_specs(latest(out / f"elastic_s{seed}" / "stage2"))
        for budget, fraction in smaller.items():
            cands = candidates(model, elastic, fraction, specs[budget])
            tasks[f"s{seed}/{budget}"] = partial(
                minitron, steps, seed, budget, cands, ranked, tokens
            )
    runs["minitron"] = dict(zip(tasks, steps.parallel(list(tasks.values())), strict=True))
    if args.ablations or args.reduced:
        runs.update(ablations(steps, base, ranked, parent, model, elastic, smaller))

    runs["tokens"] = plan.tokens()
    runs["sizes"] = plan.size
    runs["seeds"], runs["fix_seeds"] = seeds, fix_seeds
    runs["horizons"], runs["continued"] = list(plan.horizons), list(plan.continued)
    runs["rankings"] = {"min_attention_layers 1": ranking, **runs.get("rankings", {})}
    runs["train_seconds"] = round(time.time() - started)
    (out / "runs.json").write_text(json.dumps(runs, indent=1))
    print(f"[bench_family] trained in {time.time() - started:,.0f}s; measuring", flush=True)
    return measure_only(out)


def minitron(steps: Steps, seed: int, budget: str, cands, ranked: Path, tokens: int) -> dict:
    """Both Minitron arms of one size and seed: the search, then the router's architecture."""
    record = search_arm(steps, seed, budget, cands, ranked, tokens)
    router_choices = cands["router"]["choices"]
    record["given"] = given_arm(steps, seed, budget, router_choices, ranked, tokens)
    return record


def ablations(steps: Steps, base: Path, ranked: Path, parent: Path, model, elastic, smaller):
    """The ablation arms (seed 0): their save directories for ``runs.json``."""
    from megatron_elastic.checkpoint import read_manifest
    from megatron_elastic.elastic.architectures import choices_of, closest_homogeneous_spec
    from megatron_elastic.export.standalone import standalone_config

    out, runs = steps.plan.out, {}
    s0 = out / "elastic_s0"
    width_only = {
        name: choices_of(
            model,
            elastic,
            closest_homogeneous_spec(model, elastic, fraction, depth=model.num_layers),
        )
        for name, fraction in smaller.items()
    }
    fixed = elastic_yaml(steps.plan, "fixed", budget_choices=width_only)
    hetero = elastic_yaml(steps.plan, "heterogeneous", heterogeneous=True)
    # Depth: the tiny recipe's depth choices (8-10 of 10 layers) drop at most two layers, and
    # both rankings drop the same two; deeper cuts show what the attention floor changes.
    depths = {"depth_choices": list(range(DEPTH_MIN, model.num_layers + 1))}
    floor = elastic_yaml(steps.plan, "depth_floor", **depths)
    no_floor = elastic_yaml(steps.plan, "depth_no_floor", min_attention_layers=0, **depths)
    specs = router_specs(latest(s0 / "stage2"))
    scratch = {}
    for budget in smaller:
        child = standalone_config(model, specs[budget])
        data = {k: v for k, v in dataclasses.asdict(child).items() if v is not None}
        scratch[budget] = write_yaml(out / "recipes" / f"scratch_{budget[:-1]}.yaml", data)

    def depth_no_floor() -> Path:
        ranked_nf = rank(steps, "ranked_no_attention_floor", no_floor, parent)
        runs["rankings"] = {
            "min_attention_layers 0": read_manifest(ranked_nf)["metadata"]["layer_ranking"]
        }
        return curriculum(steps, "depth_no_floor", no_floor, ranked_nf)

    uniform = ("budget_sampling={'full': 1/3, '75%': 1/3, '50%': 1/3}",)
    arms = {  # each returns its save directory (the stage-2 one for the elastic arms)
        "uniform": partial(
            stage, steps, "uniform", 2, base, latest(s0 / "stage1"), ranked, extra=uniform
        ),
        "fixed": partial(curriculum, steps, "fixed", fixed, ranked, extra=("router.fixed=true",)),
        "heterogeneous": partial(curriculum, steps, "heterogeneous", hetero, ranked),
        "depth_floor": partial(curriculum, steps, "depth_floor", floor, ranked),
        "depth_no_floor": depth_no_floor,
    }
    scratch_runs = {
        b: partial(pretrain, steps, f"scratch_{b[:-1]}", y, curve=True) for b, y in scratch.items()
    }
    tasks = {**arms, **scratch_runs}
    saves = dict(zip(tasks, steps.parallel(list(tasks.values())), strict=True))
    runs.update({arm: str(latest(saves[arm])) for arm in arms})
    runs["scratch"] = {b: str(saves[b]) for b in scratch_runs}
    return runs


def measure_only(out: Path) -> int:
    """Measure the trained runs listed in ``out/runs.json`` and write the report."""
    from family_report import measure_and_report

    path = out / "runs.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: run bench_family.py --output {out} first")
    runs = json.loads(path.read_text())
    started = time.time()
    report, headline = measure_and_report(
        runs, out, out / "data" / "valid", out / "data" / "tokenizer.json"
    )
    print(report, flush=True)
    print(f"[bench_family] measured in {time.time() - started:,.0f}s: {out / 'report.md'}")
    print(headline, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
