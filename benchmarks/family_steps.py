"""Training steps of ``bench_family.py``: the run's sizes and paths (``Plan``), each step run
as a user would type it (``Steps``), and the stages every arm is made of (pretraining, importance
ranking, the two-stage elastic curriculum)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")
TINY = REPO / "examples" / "tiny"
STAGE1_BATCH, STAGE2_BATCH, PRETRAIN_BATCH = 12, 6, 8  # examples/tiny global batch sizes
HORIZONS = ((1 / 8, 1 / 4, 1 / 2, 1.0), (1 / 2, 1.0))
"""(default, reduced): the Minitron horizon runs of the given architecture, as fractions of the
elastic run's tokens (1/2: the elastic run's tokens split over the two smaller sizes, the
equal-tokens point)."""
CONTINUED = ((1 / 8, 1 / 4, 1 / 2), (1 / 2,))
"""(default, reduced): the search winner's continuations (the search itself already costs about
0.3x the elastic run per size: the longest horizon is left out to keep the study in 3 hours)."""


@dataclasses.dataclass
class Plan:
    """Sizes of this run and where everything goes."""

    out: Path
    size: dict[str, int]
    reduced: bool = False

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def tokenizer(self) -> Path:
        return self.data / "tokenizer.json"

    @property
    def horizons(self) -> tuple[float, ...]:
        """The given-architecture runs' token budgets, fractions of the elastic run's tokens."""
        return HORIZONS[1] if self.reduced else HORIZONS[0]

    @property
    def continued(self) -> tuple[float, ...]:
        """The search winner's continuations, fractions of the elastic run's tokens."""
        return CONTINUED[1] if self.reduced else CONTINUED[0]

    def tokens(self) -> dict[str, int]:
        s = self.size
        stage1 = s["stage1_steps"] * STAGE1_BATCH * s["seq_stage1"]
        stage2 = s["stage2_steps"] * STAGE2_BATCH * s["seq_stage2"]
        return {
            "pretrain": s["pretrain_steps"] * PRETRAIN_BATCH * s["seq_stage1"],
            "stage1": stage1,
            "stage2": stage2,
            "elastic": stage1 + stage2,
            "search_candidate": s["search_steps"] * STAGE1_BATCH * s["seq_stage1"],
        }


class Steps:
    """Runs each step as a user would type it, output to a log file. Inside ``parallel``, up to
    ``jobs`` steps run at once, each training stage in its own process with its share of the
    CPU threads; elsewhere a stage runs in this process (the import costs about 10 s a process)."""

    def __init__(self, plan: Plan, resume: bool, jobs: int = 1) -> None:
        self.plan, self.t0, self.count, self.resume, self.jobs = plan, time.time(), 0, resume, jobs
        self._lock = threading.Lock()
        self._local = threading.local()  # ``in_pool``: this thread runs a step of ``parallel``
        (plan.out / "logs").mkdir(parents=True, exist_ok=True)

    def parallel(self, tasks: list[Callable[[], T]]) -> list[T]:
        """Each task's result, in order; up to ``jobs`` at once. The first failure cancels the
        tasks not yet started and is raised once the running ones have ended."""
        if self.jobs == 1 or len(tasks) < 2:
            return [task() for task in tasks]

        def run(task: Callable[[], T]) -> T:
            self._local.in_pool = True
            return task()

        with ThreadPoolExecutor(self.jobs) as pool:
            futures = [pool.submit(run, task) for task in tasks]
            for done in as_completed(futures):
                if done.exception() is not None:  # start nothing more; the running ones end
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise done.exception()
        return [f.result() for f in futures]

    def _say(self, text: str) -> None:
        with self._lock:
            print(f"[bench_family] {text}", flush=True)

    @property
    def _in_pool(self) -> bool:
        return getattr(self._local, "in_pool", False)

    def _next(self) -> int:
        with self._lock:
            self.count += 1
            return self.count

    def _start(self, title: str) -> tuple[int, float]:
        n, started = self._next(), time.time()
        self._say(f"({n}) {title}  [{started - self.t0:,.0f}s elapsed]")
        return n, started

    def _done(self, n: int, started: float) -> None:
        self._say(f"    ({n}) done in {time.time() - started:,.0f}s")

    def _process(self, cmd: list[str], path: Path, rerun: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self._in_pool:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.jobs))
        with path.open("w") as f:
            done = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            _fail(path, done.returncode, rerun)

    def run(self, title: str, log: str, *args: str, done_if: Path | None = None) -> None:
        """``done_if``: with ``--resume``, skip the step when this file exists."""
        if self.resume and done_if is not None and done_if.exists():
            self._say(f"({self._next()}) {title}: done already")
            return
        n, started = self._start(title)
        cmd = [sys.executable, *args]
        self._process(cmd, self.plan.out / "logs" / f"{log}.log", " ".join(cmd))
        self._done(n, started)

    def train(self, title: str, log: str, recipe: str, *overrides: str) -> Path:
        """One training stage, ``python -m megatron_elastic.train``; returns its save
        directory."""
        p = self.plan
        n, started = self._start(title)
        argv = [
            *("--config", str(TINY / recipe)),
            *(f"data.tokenizer={p.tokenizer}", f"data.blend={p.data / 'train'}"),
            *overrides,
        ]
        path = p.out / "logs" / f"{log}.log"
        rerun = "python -m megatron_elastic.train " + " ".join(argv)
        if self._in_pool:
            self._process([sys.executable, "-m", "megatron_elastic.train", *argv], path, rerun)
        else:
            from megatron_elastic.train import main as train_main

            with path.open("w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                status = train_main(argv)
            if status != 0:
                _fail(path, status, rerun)
        save = Path(_override(overrides, "checkpoint.save"))
        reached = json.loads((save / "latest.json").read_text())["step"]
        if reached != int(_override(overrides, "train.steps")):
            # SIGTERM/SIGUSR1 (preemption) saved the stage and ended it early.
            raise SystemExit(
                f"[bench_family] {title}: stopped at step {reached} (a preemption signal); "
                f"continue with: python benchmarks/bench_family.py --output {p.out} --resume"
            )
        self._done(n, started)
        return save


def _fail(log: Path, status: int, rerun: str) -> None:
    tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
    raise SystemExit(
        f"{tail}\n[bench_family] step failed (exit {status}, log {log}); rerun it with:\n  {rerun}"
    )


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
        "logging.log_interval=1",  # every step's draws in metrics.jsonl (family_stats.py)
        *extra,
    )


def curriculum(
    steps: Steps, name: str, recipe: Path, ranked: Path, *, seed: int = 0, extra=()
) -> Path:
    first = stage(steps, name, 1, recipe, ranked, ranked, seed=seed, extra=extra)
    return stage(steps, name, 2, recipe, first, ranked, seed=seed, extra=extra)


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
