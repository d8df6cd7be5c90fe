#!/usr/bin/env python
"""The paper's claims in miniature: one command trains an elastic family on the tiny recipe and
every comparison arm, then measures them side by side (``benchmarks/family_measure.py``) and
writes the report (``benchmarks/family_report.py``).

    python benchmarks/bench_family.py             # ~1 hour on 2 CPU cores
    python benchmarks/bench_family.py --reduced   # a few minutes: every arm, tiny sizes (CI)

Arms (every training run is the project's own trainer, ``python -m megatron_elastic.train``):

* ``elastic`` (seeds 0 and 1): stage 1 (short context, uniform budgets) + stage 2 (long context,
  0.5/0.3/0.2), distilled from the ranked parent, routers trained with the budget loss: T tokens.
* ``minitron`` (seeds 0 and 1): Minitron-style compression per smaller size: the same ranked
  parent pruned to that size's architecture (the elastic run's router choice), distilled from the
  same teacher alone (``router.fixed``), checkpointed along the way: validation loss at equal
  total tokens (T / number of sizes each) and the tokens each needs to match the elastic child.
* ``scratch``: each smaller size's architecture pretrained from random weights with cross entropy
  (the parent's pretraining recipe and tokens), checkpointed along the way.
* ``uniform``: stage 2 with uniform budget sampling instead of 0.5/0.3/0.2 (from seed 0's
  stage 1). Stage 1 alone (the curriculum arm) is each seed's stage-1 checkpoint.
* ``fixed``: stage 1 + 2 with fixed homogeneous architectures of the same parameter cost (full
  depth, widths only: what one would pick by hand), no router.
* ``heterogeneous``: stage 1 + 2 with per-layer routers.
* ``depth_floor`` / ``depth_no_floor``: stage 1 + 2 with deeper depth choices (6-10 of 10 layers),
  with the project's default ``min_attention_layers: 1`` and with 0 (ranking and training).

Results: ``<output>/report.md`` (tables, printed at the end), ``report.json`` and
``family_cost.png`` / ``family_arms.png``. Logs of every step in ``<output>/logs``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from megatron_elastic import cli  # first: quiets the console before torch is imported

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
TINY = REPO / "examples" / "tiny"

# (default, reduced) sizes.
SIZES = {
    "num_train": (12000, 600),
    "num_valid": (400, 80),
    "pretrain_steps": (400, 6),
    "stage1_steps": (100, 4),
    "stage2_steps": (40, 4),
    "calibration_samples": (32, 8),
    "seq_stage1": (256, 64),
    "seq_stage2": (512, 128),
    "seq_long": (1024, 256),
    "curve_points": (10, 2),
}
SEEDS = (0, 1)
DEPTH_MIN = 6
"""The depth arm's shallowest choice (the tiny parent has 10 layers, 2 of them attention)."""
STAGE1_BATCH, STAGE2_BATCH, PRETRAIN_BATCH = 12, 6, 8  # examples/tiny global batch sizes


@dataclasses.dataclass
class Plan:
    """Sizes of this run and where everything goes."""

    out: Path
    size: dict[str, int]

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def tokenizer(self) -> Path:
        return self.data / "tokenizer.json"

    def tokens(self) -> dict[str, int]:
        s = self.size
        stage1 = s["stage1_steps"] * STAGE1_BATCH * s["seq_stage1"]
        stage2 = s["stage2_steps"] * STAGE2_BATCH * s["seq_stage2"]
        return {
            "pretrain": s["pretrain_steps"] * PRETRAIN_BATCH * s["seq_stage1"],
            "stage1": stage1,
            "stage2": stage2,
            "elastic": stage1 + stage2,
        }


class Steps:
    """Runs each step as its own process (what a user would type), output to a log file."""

    def __init__(self, plan: Plan, resume: bool) -> None:
        self.plan, self.t0, self.count, self.resume = plan, time.time(), 0, resume
        (plan.out / "logs").mkdir(parents=True, exist_ok=True)

    def _start(self, title: str) -> float:
        self.count += 1
        started = time.time()
        print(
            f"[bench_family] ({self.count}) {title}  [{started - self.t0:,.0f}s elapsed]",
            flush=True,
        )
        return started

    def run(self, title: str, log: str, *args: str, done_if: Path | None = None) -> None:
        """``done_if``: with ``--resume``, skip the step when this file exists."""
        if self.resume and done_if is not None and done_if.exists():
            self.count += 1
            print(f"[bench_family] ({self.count}) {title}: done already", flush=True)
            return
        started = self._start(title)
        path = self.plan.out / "logs" / f"{log}.log"
        cmd = [sys.executable, *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with path.open("w") as f:
            done = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            tail = "".join(path.read_text().splitlines(keepends=True)[-30:])
            raise SystemExit(
                f"{tail}\n[bench_family] step failed (exit {done.returncode}, log {path}); "
                "rerun it with:\n  " + " ".join(cmd)
            )
        print(f"[bench_family]     done in {time.time() - started:,.0f}s", flush=True)

    def train(self, title: str, log: str, recipe: str, *overrides: str) -> Path:
        """One training stage, ``python -m megatron_elastic.train`` run in this process (the
        import costs about 10 s a process; there are ~20 stages); returns its save directory."""
        from megatron_elastic.train import main as train_main

        p = self.plan
        started = self._start(title)
        argv = [
            *("--config", str(TINY / recipe)),
            *(f"data.tokenizer={p.tokenizer}", f"data.blend={p.data / 'train'}"),
            *overrides,
        ]
        path = p.out / "logs" / f"{log}.log"
        with path.open("w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            status = train_main(argv)
        if status != 0:
            tail = "".join(path.read_text().splitlines(keepends=True)[-30:])
            raise SystemExit(
                f"{tail}\n[bench_family] training failed (exit {status}, log {path}); rerun "
                "it with:\n  python -m megatron_elastic.train " + " ".join(argv)
            )
        save = Path(_override(overrides, "checkpoint.save"))
        reached = json.loads((save / "latest.json").read_text())["step"]
        if reached != int(_override(overrides, "train.steps")):
            # SIGTERM/SIGUSR1 (preemption) saved the stage and ended it early.
            raise SystemExit(
                f"[bench_family] {title}: stopped at step {reached} (a preemption signal); "
                f"continue with: python benchmarks/bench_family.py --output {p.out} --resume"
            )
        print(f"[bench_family]     done in {time.time() - started:,.0f}s", flush=True)
        return save


def _override(overrides: tuple[str, ...], key: str) -> str:
    return [o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")][-1]


def latest(save: Path) -> Path:
    return save / json.loads((save / "latest.json").read_text())["checkpoint"]


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def elastic_yaml(plan: Plan, name: str, **changes: Any) -> Path:
    """The tiny elastic recipe with ``changes``, its model an absolute path."""
    data = yaml.safe_load((TINY / "elastic.yaml").read_text())
    data["model"] = str(TINY / "model.yaml")
    data["elastic"].update(changes)
    return write_yaml(plan.out / "recipes" / f"{name}.yaml", data)


def prepare(steps: Steps) -> None:
    from megatron_elastic.data.reasoning import QUICKSTART_TASKS

    p, s = steps.plan, steps.plan.size
    tasks = ["--tasks", *QUICKSTART_TASKS]
    steps.run(
        "reasoning corpus (the quickstart's tasks, short problems)",
        "corpus",
        "tools/make_tiny_corpus.py",
        *("--output", str(p.out / "corpus"), "--num-train", str(s["num_train"])),
        *("--num-valid", str(s["num_valid"]), *tasks, "--problem-size", "short"),
        done_if=p.out / "corpus" / "valid.jsonl",
    )
    steps.run(
        "tokenizer + indexed training data",
        "data_train",
        "tools/prepare_data.py",
        *("--input", str(p.out / "corpus" / "train.jsonl"), "--train-tokenizer", "4096"),
        *("--split-digits", "--output", str(p.data / "train"), "--append-eod"),
        done_if=p.data / "train.idx",
    )
    steps.run(
        "indexed validation data (held-out problems)",
        "data_valid",
        "tools/prepare_data.py",
        *("--input", str(p.out / "corpus" / "valid.jsonl"), "--tokenizer", str(p.tokenizer)),
        *("--output", str(p.data / "valid"), "--append-eod"),
        done_if=p.data / "valid.idx",
    )


def pretrain(steps: Steps, name: str, model_yaml: Path, *, curve: bool) -> Path:
    """Plain cross-entropy pretraining (the parent's recipe); ``curve``: keep checkpoints along
    the way."""
    p, s = steps.plan, steps.plan.size
    n = s["pretrain_steps"]
    keep = [f"checkpoint.save_interval={max(1, n // s['curve_points'])}", "checkpoint.keep_last=64"]
    return steps.train(
        f"pretrain {name} from random weights ({n} steps)",
        name.replace("/", "_"),
        "pretrain.yaml",
        f"model={model_yaml}",
        f"checkpoint.save={p.out / name}",
        f"train.steps={n}",
        f"optim.warmup_steps={min(20, n // 3)}",
        *(keep if curve else []),
    )


def rank(steps: Steps, name: str, recipe: Path, parent: Path) -> Path:
    p, s = steps.plan, steps.plan.size
    steps.run(
        f"importance ranking ({name})",
        name,
        "tools/estimate_importance.py",
        *("--elastic-config", str(recipe), "--checkpoint", str(latest(parent))),
        *("--data", str(p.data / "train"), "--output", str(p.out / name)),
        *("--num-samples", str(s["calibration_samples"]), "--seq-length", str(s["seq_stage1"])),
        done_if=p.out / name / "manifest.json",
    )
    return p.out / name


def stage(
    steps: Steps,
    name: str,
    which: int,
    recipe: Path,
    init: Path,
    teacher: Path,
    *,
    seed: int = 0,
    extra: tuple[str, ...] = (),
) -> Path:
    """Stage 1 or 2 of the tiny curriculum (examples/tiny/stage{1,2}.yaml) at this run's sizes."""
    p, s = steps.plan, steps.plan.size
    n = s[f"stage{which}_steps"]
    anneal = s["stage1_steps"] + s["stage2_steps"]
    warm = min(10 if which == 1 else 5, n // 3)
    return steps.train(
        f"{name}: stage {which} ({n} steps)",
        f"{name.replace('/', '_')}_stage{which}",
        f"stage{which}.yaml",
        f"elastic={recipe}",
        f"distill.teacher_checkpoint={teacher}",
        f"checkpoint.init={init}",
        f"checkpoint.save={p.out / name / f'stage{which}'}",
        f"train.steps={n}",
        f"train.seq_length={s[f'seq_stage{which}']}",
        f"train.seed={1234 + seed if which == 1 else 4321 + seed}",
        f"router.seed={seed}",
        f"optim.warmup_steps={warm}",
        f"router.warmup_steps={warm}",
        f"router.anneal_steps={anneal}",
        *extra,
    )


def curriculum(
    steps: Steps, name: str, recipe: Path, ranked: Path, *, seed: int = 0, extra=()
) -> Path:
    first = stage(steps, name, 1, recipe, ranked, ranked, seed=seed, extra=extra)
    return stage(steps, name, 2, recipe, first, ranked, seed=seed, extra=extra)


def minitron(steps: Steps, seed: int, budget: str, choices: dict, ranked: Path) -> Path:
    """One size: the ranked parent pruned to ``choices`` and distilled alone, at stage 1's
    context, for as many tokens as the whole elastic run (curve checkpoints along the way)."""
    p, s = steps.plan, steps.plan.size
    name = f"minitron_s{seed}_{budget.rstrip('%')}"
    recipe = elastic_yaml(p, name, budget_choices={budget: choices})
    n = max(1, round(p.tokens()["elastic"] / (STAGE1_BATCH * s["seq_stage1"])))
    return steps.train(
        f"minitron seed {seed}: prune to the {budget} architecture, distil alone ({n} steps)",
        name,
        "stage1.yaml",
        f"elastic={recipe}",
        "router.fixed=true",
        f"budget_sampling={{'{budget}': 1.0}}",
        f"distill.teacher_checkpoint={ranked}",
        f"checkpoint.init={ranked}",
        f"checkpoint.save={p.out / name}",
        f"checkpoint.save_interval={max(1, n // s['curve_points'])}",
        "checkpoint.keep_last=64",
        f"train.steps={n}",
        f"train.seq_length={s['seq_stage1']}",
        f"train.seed={1234 + seed}",
        f"optim.warmup_steps={min(10, n // 3)}",
        f"router.anneal_steps={n}",
    )


def router_specs(checkpoint: Path) -> dict[str, Any]:
    """Each trained budget's deployed architecture in an elastic checkpoint."""
    from megatron_elastic.checkpoint import load_extra, manifest_model, read_manifest
    from megatron_elastic.router import router_from_state

    model = manifest_model(read_manifest(checkpoint))
    router = router_from_state(model, load_extra(checkpoint))
    return {
        name: router.decide(name, 0, None, deterministic=True).spec
        for name in router.elastic_config.budgets
    }


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/bench_family", help="directory for everything")
    parser.add_argument("--reduced", action="store_true", help="tiny sizes (CI, a few minutes)")
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
    out = Path(args.output).resolve()
    if args.measure_only:
        return measure_only(out)
    if out.exists() and any(out.iterdir()) and not args.resume:
        shutil.rmtree(out)
        print(f"[bench_family] removed the earlier run in {out}", flush=True)
    plan = Plan(out, {k: v[1] if args.reduced else v[0] for k, v in SIZES.items()})
    steps = Steps(plan, args.resume)
    started = time.time()

    from megatron_elastic.checkpoint import read_manifest
    from megatron_elastic.config import load_model_config
    from megatron_elastic.elastic.architectures import choices_of, closest_homogeneous_spec
    from megatron_elastic.elastic.config import load_elastic_recipe
    from megatron_elastic.export.standalone import standalone_config

    prepare(steps)
    parent = pretrain(steps, "parent", TINY / "model.yaml", curve=False)
    base = elastic_yaml(plan, "elastic")
    ranked = rank(steps, "ranked", base, parent)
    # Depth choices follow the ranked parent's layer ranking (the trainer reads it from there).
    ranking = read_manifest(ranked)["metadata"]["layer_ranking"]
    runs: dict[str, Any] = {"ranked": str(ranked), "parent": str(latest(parent))}
    for seed in SEEDS:
        curriculum(steps, f"elastic_s{seed}", base, ranked, seed=seed)
        runs[f"elastic_s{seed}"] = {
            k: str(latest(out / f"elastic_s{seed}" / k)) for k in ("stage1", "stage2")
        }
    stage(
        steps,
        "uniform",
        2,
        base,
        Path(runs["elastic_s0"]["stage1"]),
        ranked,
        extra=("budget_sampling={'full': 1/3, '75%': 1/3, '50%': 1/3}",),
    )
    runs["uniform"] = str(latest(out / "uniform" / "stage2"))

    model, elastic = load_elastic_recipe(base)
    elastic = dataclasses.replace(elastic, layer_ranking=tuple(ranking))
    width_only = {
        name: choices_of(
            model,
            elastic,
            closest_homogeneous_spec(model, elastic, fraction, depth=model.num_layers),
        )
        for name, fraction in elastic.budgets.items()
        if fraction < 1
    }
    fixed = elastic_yaml(plan, "fixed", budget_choices=width_only)
    curriculum(steps, "fixed", fixed, ranked, extra=("router.fixed=true",))
    runs["fixed"] = str(latest(out / "fixed" / "stage2"))
    hetero = elastic_yaml(plan, "heterogeneous", heterogeneous=True)
    curriculum(steps, "heterogeneous", hetero, ranked)
    runs["heterogeneous"] = str(latest(out / "heterogeneous" / "stage2"))
    # Depth: the tiny recipe's depth choices (8-10 of 10 layers) drop at most two layers, and
    # both rankings drop the same two; deeper cuts show what the attention floor changes.
    depths = {"depth_choices": list(range(DEPTH_MIN, model.num_layers + 1))}
    floor = elastic_yaml(plan, "depth_floor", **depths)
    curriculum(steps, "depth_floor", floor, ranked)
    runs["depth_floor"] = str(latest(out / "depth_floor" / "stage2"))
    no_floor = elastic_yaml(plan, "depth_no_floor", min_attention_layers=0, **depths)
    ranked_nf = rank(steps, "ranked_no_attention_floor", no_floor, parent)
    curriculum(steps, "depth_no_floor", no_floor, ranked_nf)
    runs["depth_no_floor"] = str(latest(out / "depth_no_floor" / "stage2"))
    runs["rankings"] = {
        "min_attention_layers 1": ranking,
        "min_attention_layers 0": read_manifest(ranked_nf)["metadata"]["layer_ranking"],
    }

    smaller = [name for name, fraction in elastic.budgets.items() if fraction < 1]
    runs["minitron"], runs["scratch"] = {}, {}
    ranked_model = load_model_config(TINY / "model.yaml")
    for seed in SEEDS:
        specs = router_specs(Path(runs[f"elastic_s{seed}"]["stage2"]))
        for budget in smaller:
            save = minitron(steps, seed, budget, choices_of(model, elastic, specs[budget]), ranked)
            runs["minitron"][f"s{seed}/{budget}"] = str(save)
            if seed == SEEDS[0]:
                child = standalone_config(ranked_model, specs[budget])
                data = {k: v for k, v in dataclasses.asdict(child).items() if v is not None}
                child_yaml = write_yaml(out / "recipes" / f"scratch_{budget[:-1]}.yaml", data)
                save = pretrain(steps, f"scratch_{budget[:-1]}", child_yaml, curve=True)
                runs["scratch"][budget] = str(save)

    print(f"[bench_family] training done in {time.time() - started:,.0f}s; measuring", flush=True)
    runs["tokens"] = plan.tokens()
    runs["sizes"] = plan.size
    runs["seeds"] = list(SEEDS)
    runs["train_seconds"] = round(time.time() - started)
    (out / "runs.json").write_text(json.dumps(runs, indent=1))
    print(f"[bench_family] trained in {time.time() - started:,.0f}s", flush=True)
    return measure_only(out)


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
