"""The main job (``make quickstart``, ``tools/quickstart.py``): the whole Nemotron Elastic
pipeline on the tiny recipe.

    reasoning corpus + BPE tokenizer -> pretrain the parent -> importance ranking -> stage 1
    (short context, uniform budgets) -> stage 2 (longer context, weighted to the largest) -> export
    every budget to Hugging Face -> evaluate the elastic checkpoint, every exported model and the
    baseline

The baseline is what you get without the method: the ranked parent (before any elastic training)
pruned to the same architecture the elastic model runs at each budget (its router's choice),
evaluated by the same code (``evaluate.py --architectures-from``).

Each step is one of the project's CLIs run as its own process (what a user would type), so a
failure names the command to rerun. Results: ``<output>/results.json`` (per budget: params,
validation loss and reasoning accuracy of the elastic model, of the exported HF model and of the
baseline), ``results.md`` (the table) and ``results.png`` (the plot). ``reduced`` shrinks every
step for the end-to-end test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from megatron_elastic.data.reasoning import QUICKSTART_TASKS

__all__ = ["SIZES", "TINY", "run_quickstart"]

TINY = Path("examples") / "tiny"
"""The recipe the quickstart trains, relative to the repository."""

# (full, reduced) sizes of each step.
SIZES = {
    "num_train": (12000, 600),
    "num_valid": (200, 40),
    "pretrain_steps": (400, 6),
    "stage1_steps": (100, 4),
    "stage2_steps": (40, 4),
    "calibration_samples": (32, 8),
    "num_problems": (100, 4),
    "max_new_tokens": (72, 16),  # the longest short solution is 70 tokens, then EOD
    "seq_stage1": (256, 64),
    "seq_stage2": (512, 128),
}


class Pipeline:
    """The steps' runner: each step one process in ``repo``, numbered and timed."""

    def __init__(self, output: Path, reduced: bool, python: str, repo: Path) -> None:
        self.out, self.python, self.repo = output, python, repo
        self.size = {k: v[1] if reduced else v[0] for k, v in SIZES.items()}
        self.step, self.total, self.t0 = 0, 10, time.time()

    def run(self, title: str, *args: str) -> None:
        self.step += 1
        started = time.time()
        print(
            f"[quickstart] ({self.step}/{self.total}) {title}  "
            f"[{time.time() - self.t0:,.0f}s elapsed]",
            flush=True,
        )
        cmd = [self.python, *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        done = subprocess.run(cmd, cwd=self.repo, env=env)
        if done.returncode != 0:
            raise SystemExit(
                f"[quickstart] step failed (exit {done.returncode}); rerun it with:\n  "
                + " ".join(cmd)
            )
        print(f"[quickstart]     done in {time.time() - started:,.0f}s", flush=True)

    def train(self, title: str, recipe: str, *overrides: str) -> None:
        recipe_path = str(self.repo / TINY / recipe)
        self.run(title, "-m", "megatron_elastic.train", "--config", recipe_path, *overrides)


def _latest(save: Path) -> Path:
    return save / json.loads((save / "latest.json").read_text())["checkpoint"]


def run_quickstart(output: str | Path, *, reduced: bool, repo: Path) -> int:
    """Run the pipeline into ``output`` (an earlier run there moves to ``<output>.previous``)
    with the tools and recipes of the repository ``repo``; print the results table. Returns the
    exit status (0: results written)."""
    out = Path(output).resolve()
    if out.exists() and any(out.iterdir()):
        previous = out.with_name(out.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        out.rename(previous)
        print(f"[quickstart] moved the earlier run to {previous}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    p = Pipeline(out, reduced, sys.executable, repo)
    s = p.size
    data, tok = out / "data", out / "data" / "tokenizer.json"
    common = [f"data.tokenizer={tok}", f"data.blend={data / 'train'}"]

    tasks = ["--tasks", *QUICKSTART_TASKS]
    # One corpus for every stage: the evaluation drops its training questions (--exclude), so no
    # stage may train on problems drawn elsewhere (a second corpus could hold evaluation ones).
    p.run(
        "reasoning corpus (reasoning-gym, worked solutions, short problems)",
        "tools/make_tiny_corpus.py",
        *("--output", str(out / "corpus"), "--num-train", str(s["num_train"])),
        *("--num-valid", str(s["num_valid"]), *tasks, "--problem-size", "short"),
    )
    p.run(
        "tokenizer (byte-level BPE, 4096, one token per digit) + megatron indexed datasets",
        "tools/prepare_data.py",
        *("--input", str(out / "corpus" / "train.jsonl"), "--train-tokenizer", "4096"),
        *("--split-digits", "--output", str(data / "train"), "--append-eod"),
    )
    subprocess.run(
        [
            sys.executable,
            "tools/prepare_data.py",
            *("--input", str(out / "corpus" / "valid.jsonl"), "--tokenizer", str(tok)),
            *("--output", str(data / "valid"), "--append-eod"),
        ],
        cwd=repo,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    steps = s["pretrain_steps"]
    p.train(
        "pretrain the tiny parent (plain megatron training)",
        "pretrain.yaml",
        *common,
        f"checkpoint.save={out / 'pretrain'}",
        f"train.steps={steps}",
        f"optim.warmup_steps={min(20, steps // 3)}",
    )
    p.run(
        "importance: rank channels, heads, neurons, layers; permute the parent",
        "tools/estimate_importance.py",
        *("--elastic-config", str(repo / TINY / "elastic.yaml")),
        *("--checkpoint", str(_latest(out / "pretrain")), "--data", str(data / "train")),
        *("--output", str(out / "ranked"), "--num-samples", str(s["calibration_samples"])),
        *("--seq-length", str(s["seq_stage1"])),
    )
    ranked = [f"distill.teacher_checkpoint={out / 'ranked'}"]
    steps = s["stage1_steps"]
    p.train(
        "stage 1: short context, uniform budgets, KD from the ranked parent, routers",
        "stage1.yaml",
        *common,
        *ranked,
        f"checkpoint.init={out / 'ranked'}",
        f"checkpoint.save={out / 'stage1'}",
        f"train.steps={steps}",
        f"train.seq_length={s['seq_stage1']}",
        f"optim.warmup_steps={min(10, steps // 3)}",
        f"router.warmup_steps={min(10, steps // 3)}",
        f"router.anneal_steps={s['stage1_steps'] + s['stage2_steps']}",
    )
    steps = s["stage2_steps"]
    p.train(
        "stage 2: longer context (512), budgets weighted to the largest (0.5/0.3/0.2)",
        "stage2.yaml",
        *common,
        *ranked,
        f"checkpoint.init={out / 'stage1'}",
        f"checkpoint.save={out / 'stage2'}",
        f"train.steps={steps}",
        f"train.seq_length={s['seq_stage2']}",
        f"optim.warmup_steps={min(5, steps // 3)}",
        f"router.warmup_steps={min(5, steps // 3)}",
        f"router.anneal_steps={s['stage1_steps'] + s['stage2_steps']}",
    )
    elastic = _latest(out / "stage2")
    p.run(
        "export every budget to Hugging Face NemotronH (zero-shot slicing)",
        "tools/export_budget.py",
        *("--checkpoint", str(elastic), "--all", "--format", "hf", "--force"),
        *("--output", str(out / "export"), "--tokenizer", str(tok)),
    )
    evaluation = [
        *("--budgets", "all", "--data", str(data / "valid"), "--split", "0,1,0"),
        *("--seq-length", str(s["seq_stage1"]), "--num-problems", str(s["num_problems"])),
        *("--max-new-tokens", str(s["max_new_tokens"]), "--tokenizer", str(tok)),
        *("--exclude", str(out / "corpus" / "train.jsonl"), *tasks, "--problem-size", "short"),
        *("--batch-size", "50"),
    ]
    p.run(
        "evaluate the elastic checkpoint at every budget (one copy of the weights)",
        "tools/evaluate.py",
        *("--checkpoint", str(elastic), "--output", str(out / "eval" / "elastic.json")),
        *evaluation,
    )
    p.run(
        "baseline: the ranked parent pruned to the same architectures, no elastic training",
        "tools/evaluate.py",
        *("--checkpoint", str(out / "ranked"), "--architectures-from", str(elastic)),
        *("--output", str(out / "eval" / "baseline.json")),
        *evaluation,
    )
    exported = sorted(d for d in (out / "export").iterdir() if (d / "config.json").is_file())
    p.total += len(exported) - 1
    for directory in exported:
        p.run(
            f"evaluate the exported HF model {directory.name}",
            "tools/evaluate.py",
            *("--checkpoint", str(directory), "--budgets", "all"),
            *("--output", str(out / "eval" / f"hf_{directory.name}.json")),
            *evaluation[2:],
        )
    results = _collect(out, exported)
    print((out / "results.md").read_text(), flush=True)
    print(
        f"[quickstart] finished in {time.time() - p.t0:,.0f}s: {out / 'results.json'}, "
        f"{out / 'results.md'}, {out / 'results.png'}",
        flush=True,
    )
    return 0 if results else 1


def _collect(out: Path, exported: list[Path]) -> dict:
    """results.json / results.md / results.png from the evaluation files."""

    def rows(name: str) -> dict[str, dict]:
        return {r["budget"]: r for r in json.loads((out / "eval" / name).read_text())["results"]}

    elastic, baseline = rows("elastic.json"), rows("baseline.json")
    for b, row in baseline.items():  # evaluate.py ran the ranked weights at the elastic specs
        assert (row["spec"], row["params"]) == (elastic[b]["spec"], elastic[b]["params"]), b
    hf = {}
    for directory in exported:
        rows = json.loads((out / "eval" / f"hf_{directory.name}.json").read_text())["results"]
        hf[directory.name] = rows[0]
    budgets = sorted(elastic, key=lambda b: -elastic[b]["params"])
    results = {
        "budgets": {
            b: {
                "params": elastic[b]["params"],
                "elastic": _scores(elastic[b]),
                "baseline": {"params": baseline[b]["params"], **_scores(baseline[b])},
                "exported_hf": {"params": hf.get(b, {}).get("params"), **_scores(hf.get(b, {}))},
            }
            for b in budgets
        },
        "environment": _environment(),
        "pretrain": _metrics_tail(out / "pretrain"),
        "stage1": _metrics_tail(out / "stage1"),
        "stage2": _metrics_tail(out / "stage2"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "| budget | model | params | val loss | accuracy | val loss (HF export) "
        "| accuracy (HF export) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for b, r in results["budgets"].items():
        e, h, base = r["elastic"], r["exported_hf"], r["baseline"]
        lines += [
            f"| {b} | elastic | {r['params']:,} | {_fmt(e['val_loss'])} | {_acc(e)} | "
            f"{_fmt(h['val_loss'])} | {_acc(h)} |",
            f"| {b} | baseline | {base['params']:,} | {_fmt(base['val_loss'])} | {_acc(base)} "
            "| - | - |",
        ]
    env = results["environment"]
    problems = json.loads((out / "eval" / "elastic.json").read_text())["num_problems"]
    lines += [
        "",
        "elastic: the trained elastic checkpoint at the budget's router-chosen sub-network. "
        "baseline: the ranked parent (before elastic training) pruned to the same sub-network. "
        f"accuracy: exact final answers on {problems} held-out problems.",
        "",
        f"(measured on {env['cpu']}, {env['cpu_capability']} kernels, {env['threads']} threads, "
        f"torch {env['torch']}; other CPUs or thread counts round differently: README, "
        '"Reproducibility")',
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(out / "results.png", results)
    return results


def _environment() -> dict:
    """What the figures depend on besides the code: on a CPU, the kernels torch picks for the
    instruction set and the thread count change float rounding (README, "Reproducibility")."""
    import platform

    import torch

    cpu = platform.processor()
    for line in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    ):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _scores(row: dict) -> dict:
    keys = ("val_loss", "accuracy", "correct", "total")
    return {k: row.get(k) for k in keys}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _acc(scores: dict) -> str:
    """``0.3400 (68/200)``: the fraction and the counts it comes from."""
    if scores.get("accuracy") is None:
        return "-"
    return f"{scores['accuracy']:.4f} ({scores['correct']}/{scores['total']})"


def _metrics_tail(save: Path) -> dict:
    """First and last logged losses of a stage."""
    records = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if any(k.startswith("loss/") for k in r)]
    valid = [r for r in records if any(k.startswith("valid/") for k in r)]
    return {"first": losses[0], "last": losses[-1], "valid": valid[-1] if valid else None}


def _plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(results["budgets"])
    params = [results["budgets"][b]["params"] / 1e6 for b in budgets]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, label in (
        ("val_loss", axes[0], "validation loss"),
        ("accuracy", axes[1], "accuracy"),
    ):
        for source, marker in (("elastic", "o-"), ("exported_hf", "x--"), ("baseline", "s:")):
            values = [results["budgets"][b][source][key] for b in budgets]
            if all(v is not None for v in values):
                ax.plot(params, values, marker, label=source.replace("_", " "))
        for x, b in zip(params, budgets, strict=True):
            ax.annotate(b, (x, ax.get_ylim()[0]), fontsize=8)
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(
        "tiny elastic family: every budget from one checkpoint "
        "(baseline: ranked parent pruned alike, no elastic training)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
