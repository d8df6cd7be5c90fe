#!/usr/bin/env python
"""Resident memory of serving a whole family: one elastic checkpoint (all budgets from one copy
of the weights) vs each exported budget loaded as its own model. Measured, not computed.

Each arm runs in a fresh Python process (``--worker``): imports and process groups first, then
the resident set size (``VmRSS``) is read as the baseline; the arm loads its weights and generates
``--new-tokens`` cached tokens at every budget (the elastic arm switching budgets in one
:class:`~megatron_elastic.serving.ServingSession` holding one budget at a time; the exported arm
keeping every model loaded, as a server of the separate models would). Printed per arm: RSS after
serving minus the baseline, the peak (``VmHWM``) minus the baseline, and the weights' own size.
The exported budgets are written first by ``tools/export_budget.py --all --format megatron``
(or taken from ``--exported``). The last line is ``family memory: elastic X MiB vs exported
Y MiB``.

    python benchmarks/bench_family_memory.py --checkpoint runs/quickstart/stage2/step_0000040
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(arm: str, paths: list[str], new_tokens: int) -> dict:
    import torch

    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.eval import open_checkpoint
    from megatron_elastic.parallel import init_process_groups
    from megatron_elastic.serving import ServingSession, cached_generate

    torch.set_grad_enabled(False)
    pgs = init_process_groups(ParallelConfig())
    prompt = [[5, 17, 33, 2, 9, 41, 7, 3]]
    baseline = _status("VmRSS")
    weights = 0
    if arm == "elastic":
        ckpt = open_checkpoint(paths[0], pgs)
        weights = sum(p.numel() * p.element_size() for p in ckpt.model.parameters())
        session = ServingSession(ckpt, keep=1)
        for budget in ckpt.budgets():
            cached_generate(session.net(budget), prompt, max_new_tokens=new_tokens)
    else:
        models = [open_checkpoint(p, pgs) for p in paths]
        for ckpt in models:
            weights += sum(p.numel() * p.element_size() for p in ckpt.model.parameters())
            session = ServingSession(ckpt, keep=1)
            cached_generate(session.net(ckpt.budgets()[0]), prompt, max_new_tokens=new_tokens)
    return {
        "rss": _status("VmRSS") - baseline,
        "peak": _status("VmHWM") - baseline,
        "weights": weights,
    }


def _run(arm: str, paths: list[str], new_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", arm, "--new-tokens", str(new_tokens), *paths]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="elastic checkpoint")
    parser.add_argument("--exported", help="directory of exported budgets (default: export now)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.paths, args.new_tokens)))
        return
    if not args.checkpoint:
        parser.error("--checkpoint is required")
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(args.exported or tmp)
        if not args.exported:
            cmd = [sys.executable, str(ROOT / "tools" / "export_budget.py"), "--checkpoint"]
            cmd += [args.checkpoint, "--all", "--format", "megatron", "--output", str(exported)]
            subprocess.run(cmd, check=True, capture_output=True)
        budgets = sorted(p for p in exported.iterdir() if (p / "manifest.json").is_file())
        elastic = _run("elastic", [args.checkpoint], args.new_tokens)
        separate = _run("exported", [str(p) for p in budgets], args.new_tokens)
    names = ", ".join(p.name for p in budgets)
    print(f"family: {names}; {args.new_tokens} cached tokens generated at each budget")
    print("\n| arm | weights MiB | RSS after serving MiB | peak RSS MiB |")
    print("|---|---:|---:|---:|")
    for arm, r in (("one elastic checkpoint", elastic), ("separate exports", separate)):
        print(
            f"| {arm} | {r['weights'] / MIB:.1f} | {r['rss'] / MIB:.1f} | {r['peak'] / MIB:.1f} |"
        )
    print(
        f"family memory: elastic {elastic['rss'] / MIB:.1f} MiB vs exported "
        f"{separate['rss'] / MIB:.1f} MiB (RSS over each process's baseline)"
    )


if __name__ == "__main__":
    main()
