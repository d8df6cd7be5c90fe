#!/usr/bin/env python
"""The memory planner against measured peaks of real training steps.

Each configuration is one ``torchrun`` launch of ``bench_memory_worker.py``, which builds the
Trainer from a recipe (the tiny parent as the frozen teacher and the elastic student, router,
megatron DDP + optimizer; TP/PP/SP/CP and recompute as the configuration says) on a random-token
dataset and runs ``--steps`` full training steps (the first allocates Adam's state, so later
steps carry it). The planner (``megatron_elastic/planning/memory.py``) predicts, from the same
recipe, the peak of every pipeline stage's busiest rank; the worker measures each rank's peak
(CPU: the live bytes of torch's CPU allocator on all threads, gloo's included, as its counter
reads at each ``torch.profiler`` allocation event; CUDA: ``torch.cuda.max_memory_allocated``).
Prints predicted / measured per configuration and stage; the last line is
``worst predicted/measured: R`` (the ratio farthest from 1).

A configuration that needs what this checkout's model builder does not do yet (sequence or
context parallelism) is listed as pending, not run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "bench_memory_worker.py"
MODEL = ROOT / "examples" / "tiny" / "model.yaml"
MOE_MODEL = Path(__file__).resolve().parent / "bench_memory_moe.yaml"
"""The parent of the ``moe-*`` configurations (mixture-of-experts ``E`` layers)."""
MIB = 1024**2

# name, seq, micro-batch size, micro-batches, parallel, recompute (True: every layer; N: the
# first N layers of each stage, megatron's block method); data parallelism: DATA_PARALLEL
CONFIGS = [
    ("seq256", 256, 2, 2, {}, False),
    ("seq512", 512, 2, 2, {}, False),
    ("seq1024", 1024, 2, 2, {}, False),
    ("seq1024-recompute", 1024, 2, 2, {}, True),
    ("seq1024-recompute-block4", 1024, 2, 2, {}, 4),
    ("tp2-seq512", 512, 2, 2, {"tensor_parallel_size": 2}, False),
    ("pp2-seq512", 512, 2, 4, {"pipeline_parallel_size": 2}, False),
    ("pp2-seq512-recompute", 512, 2, 4, {"pipeline_parallel_size": 2}, True),
    ("tp2-sp-seq512", 512, 2, 2, {"tensor_parallel_size": 2, "sequence_parallel": True}, False),
    ("cp2-seq512", 512, 2, 2, {"context_parallel_size": 2}, False),
    ("moe-seq512", 512, 2, 2, {}, False),
    ("moe-seq1024", 1024, 2, 2, {}, False),
    ("moe-seq1024-recompute", 1024, 2, 2, {}, True),
    ("moe-dp2-seq512", 512, 2, 2, {}, False),
    ("moe-ep2-seq512", 512, 2, 2, {"expert_model_parallel_size": 2}, False),
]
DATA_PARALLEL = {"moe-dp2-seq512": 2, "moe-ep2-seq512": 2}
"""Data-parallel ranks of a configuration (1 if absent): expert parallelism is carved out of
them, so EP 2 runs on two data-parallel ranks, each holding half of every layer's experts
(``moe-dp2-seq512``, the same two ranks without EP, separates what DP 2 itself adds)."""


def model_of(name: str) -> Path:
    """The parent a configuration trains: ``moe-*`` the MoE one, the others examples/tiny's."""
    return MOE_MODEL if name.startswith("moe-") else MODEL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recompute_label(recompute: bool | int) -> str:
    if recompute is True:
        return "on"
    return f"b{recompute}" if recompute else "-"


def pending_reason(parallel: dict, model: Path = MODEL) -> str | None:
    """Why this checkout cannot run ``parallel`` on ``model`` yet (None: it can)."""
    from megatron_elastic.config import ParallelConfig, load_model_config
    from megatron_elastic.model.builder import transformer_config

    p = ParallelConfig(**parallel)
    config = transformer_config(load_model_config(model), p)
    if p.sequence_parallel_active and not config.sequence_parallel:
        return "sequence parallelism is not built into the model yet"
    if p.context_parallel_size > 1 and config.context_parallel_size != p.context_parallel_size:
        return "context parallelism is not built into the model yet"
    return None


def prepare(root: Path, model: Path) -> Path:
    """The work directory of ``model``'s configurations (tokenizer, data, parent checkpoint),
    written once: ``root`` for examples/tiny, ``root/<model name>`` for another parent."""
    workdir = root if model == MODEL else root / model.stem
    if not (workdir / "parent").exists():
        subprocess.run(
            [sys.executable, str(WORKER), "prepare", str(workdir), str(model)],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    return workdir


def predict(recipe_path: Path, world: int, profile: str) -> list[float]:
    from megatron_elastic.planning import plan_config_from_recipe, plan_memory
    from megatron_elastic.training.recipe import load_train_recipe

    cfg = plan_config_from_recipe(load_train_recipe(recipe_path), world_size=world, profile=profile)
    return [s.peak for s in plan_memory(cfg).stages]


def launch(workdir: Path, run: dict, nproc: int, timeout: int) -> list[dict]:
    config = workdir / f"{run['name']}.json"
    config.write_text(json.dumps(run))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={_free_port()}",
        str(WORKER),
        "run",
        str(workdir),
        str(config),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{run['name']} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return [
        json.loads((workdir / f"result_{run['name']}_{r}.json").read_text()) for r in range(nproc)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps per configuration")
    parser.add_argument("--only", nargs="*", help="run only these configurations (names)")
    parser.add_argument("--workdir", help="keep data, recipes and results here")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    parser.add_argument(
        "--gc-collect",
        action="store_true",
        help="diagnosis: run Python's garbage collector before every step (the trainer does not)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="also print the ops running at each peak (CPU)"
    )
    args = parser.parse_args(argv)

    from megatron_elastic import platform

    cuda = platform.cuda_available()
    profile = "gpu-bf16" if cuda else "cpu-fp32"
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_memory_"))
    import yaml
    from bench_memory_worker import recipe_dict

    print(
        f"tiny parent ({MODEL.relative_to(ROOT)}; moe-*: {MOE_MODEL.relative_to(ROOT)}), "
        "elastic student at the full budget + frozen "
        f"teacher + router, {args.steps} steps; profile {profile}; measured: "
        + ("torch.cuda.max_memory_allocated" if cuda else "CPU allocator peak, all threads")
    )
    header = (
        f"{'config':<25} {'seq':>5} {'TP':>3} {'PP':>3} {'SP':>3} {'CP':>3} {'EP':>3} {'DP':>3} "
        f"{'rc':>3} "
        f"{'stage':>5} {'predicted MiB':>14} {'measured MiB':>13} {'pred/meas':>10}"
        + ("" if cuda else f" {'RSS delta MiB':>14}")
    )
    print(header)
    ratios = []
    for name, seq, mbs, micro, parallel, recompute in CONFIGS:
        if args.only and name not in args.only:
            continue
        p = {"sequence_parallel": False, "context_parallel_size": 1, **parallel}
        tp, pp = p.get("tensor_parallel_size", 1), p.get("pipeline_parallel_size", 1)
        cp, sp = p["context_parallel_size"], p["sequence_parallel"]
        ep, dp = p.get("expert_model_parallel_size", 1), DATA_PARALLEL.get(name, 1)
        prefix = (
            f"{name:<25} {seq:>5} {tp:>3} {pp:>3} {'on' if sp else '-':>3} {cp:>3} {ep:>3} {dp:>3} "
            f"{_recompute_label(recompute):>3}"
        )
        reason = pending_reason(p, model_of(name))
        if reason:
            print(f"{prefix} {'':>5} pending: {reason}")
            continue
        workdir = prepare(root, model_of(name))
        run = {
            "name": name,
            "model_yaml": str(model_of(name)),
            "parallel": p,
            "seq_length": seq,
            "micro_batch_size": mbs,
            "num_micro_batches": micro,
            "recompute": recompute,
            "steps": args.steps,
            "gc_collect": args.gc_collect,
            "data_parallel_size": dp,
        }
        nproc = tp * pp * cp * dp
        t0 = time.time()
        results = launch(workdir, run, nproc, args.timeout)
        recipe = workdir / f"recipe_{name}.yaml"
        recipe.write_text(yaml.safe_dump(recipe_dict(workdir, run)))
        predicted = predict(recipe, nproc, profile)
        for stage, pred in enumerate(predicted):
            mine = [r for r in results if r["pp_rank"] == stage]
            measured = max(r["peak_bytes"] for r in mine)
            ratio = pred / measured
            ratios.append(ratio)
            rss = "" if cuda else f" {max(r['rss_delta_bytes'] for r in mine) / MIB:>14.1f}"
            print(
                f"{prefix} {stage:>5} {pred / MIB:>14.1f} {measured / MIB:>13.1f} "
                f"{ratio:>10.3f}{rss}",
                flush=True,
            )
            busiest = max(mine, key=lambda r: r["peak_bytes"])
            if args.verbose and busiest.get("peak_ops"):
                print(f"    peak at: {' > '.join(busiest['peak_ops'][-6:])}")
            if args.verbose and "replay_peak_bytes" in busiest:
                print(
                    f"    profiler byte-delta replay: peak {busiest['replay_peak_bytes'] / MIB:.1f}"
                    f" MiB, {busiest['untracked_free_bytes'] / MIB:.1f} MiB of frees it never saw"
                    " (made on gloo's threads)"
                )
        if args.verbose:
            print(f"    ({time.time() - t0:.0f} s)", flush=True)
    if not ratios:
        print("no configuration ran")
        return 1
    worst = max(ratios, key=lambda r: abs(math.log(r)))
    print(f"worst predicted/measured: {worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
