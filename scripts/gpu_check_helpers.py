#!/usr/bin/env python
"""Helpers of ``scripts/gpu_check.sh`` (standard library + torch only; each runs without CUDA).

gpu_check_helpers.py env OUT.json         the environment: driver, CUDA, GPU, versions
gpu_check_helpers.py nccl OUT.json        NCCL all-reduce over every local GPU (torchrun)
gpu_check_helpers.py record SUMMARY NAME RC SECONDS TIMEOUT LOG [RESULT.json]
                                          add one section's outcome to the summary JSON
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["environment", "nccl_check", "record_section"]

PACKAGES = (
    "torch",
    "triton",
    "transformer-engine",
    "transformer_engine_torch",
    "mamba-ssm",
    "causal-conv1d",
    "megatron-core",
    "nvidia-modelopt",
    "transformers",
    "numpy",
)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_smi() -> dict:
    query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip()[:300]}
    keys = query.split(",")
    return {
        "gpus": [
            dict(zip(keys, line.split(", "), strict=False)) for line in done.stdout.splitlines()
        ]
    }


def environment() -> dict:
    """What the checks ran on: host, Python, driver, CUDA, GPUs, package versions."""
    import torch

    cuda = torch.cuda.is_available()
    env: dict = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "nvidia_smi": _nvidia_smi(),
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": cuda,
        "packages": {name: _version(name) for name in PACKAGES},
        "importable": {
            mod: importlib.util.find_spec(mod) is not None
            for mod in ("transformer_engine", "mamba_ssm", "causal_conv1d", "modelopt", "megatron")
        },
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "count": torch.cuda.device_count(),
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
        }
        env["cudnn"] = torch.backends.cudnn.version()
        nccl = torch.cuda.nccl.version()
        env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    return env


def nccl_check(out: Path) -> int:
    """Under torchrun: NCCL init, a correctness all-reduce and bus bandwidth at a few sizes."""
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        print("nccl check: needs CUDA", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    world = dist.get_world_size()
    x = torch.full((1024,), float(rank + 1), device="cuda")
    dist.all_reduce(x)
    correct = bool((x == world * (world + 1) / 2).all().item())
    rows = []
    for mib in (1, 64, 1024):
        t = torch.empty(mib * 2**20 // 2, dtype=torch.bfloat16, device="cuda")
        for _ in range(3):
            dist.all_reduce(t)
        torch.cuda.synchronize()
        iters = 10
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        torch.cuda.synchronize()
        sec = (time.perf_counter() - start) / iters
        bus = 2 * (world - 1) / world * t.numel() * 2 / sec / 1e9 if world > 1 else None
        rows.append({"mib": mib, "ms": round(sec * 1e3, 3), "bus_gb_s": bus and round(bus, 1)})
    if rank == 0:
        result = {
            "world_size": world,
            "backend": "nccl",
            "all_reduce_correct": correct,
            "sizes": rows,
            "note": (
                "one GPU: world size 1, so NCCL init and the collective path ran without any "
                "inter-GPU traffic (no bandwidth to report; TP=1 only)"
                if world == 1
                else f"{world} GPUs of one machine"
            ),
        }
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result))
    dist.destroy_process_group()
    return 0 if correct else 1


def _tail(path: Path, lines: int = 40) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def record_section(
    summary: Path,
    name: str,
    rc: int,
    seconds: float,
    timeout: int,
    log: Path,
    result: Path | None = None,
) -> None:
    """Add (or replace) one section in the summary: rc 0 ok, 2 unavailable (the tool said it
    cannot run here), 3 skipped, 124/137 timed out, anything else failed."""
    data = json.loads(summary.read_text()) if summary.exists() else {"sections": {}}
    status = {0: "ok", 2: "unavailable", 3: "skipped", 124: "timeout", 137: "timeout"}.get(
        rc, "failed"
    )
    entry: dict = {
        "status": status,
        "rc": rc,
        "seconds": round(seconds, 1),
        "timeout_s": timeout,
        "log_tail": _tail(log),
    }
    if result is not None and result.exists():
        try:
            entry["result"] = json.loads(result.read_text())
        except ValueError:
            entry["result"] = {"unparsed": result.read_text()[:2000]}
    data["sections"][name] = entry
    data["failed"] = sorted(k for k, v in data["sections"].items() if v["status"] != "ok")
    summary.write_text(json.dumps(data, indent=1) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "env":
        text = json.dumps(environment(), indent=1)
        Path(argv[1]).write_text(text + "\n")
        print(text)
        return 0
    if len(argv) >= 2 and argv[0] == "nccl":
        return nccl_check(Path(argv[1]))
    if len(argv) in (7, 8) and argv[0] == "record":
        summary, name, rc, seconds, timeout, log = argv[1:7]
        result = Path(argv[7]) if len(argv) == 8 else None
        record_section(
            Path(summary), name, int(rc), float(seconds), int(timeout), Path(log), result
        )
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
