#!/usr/bin/env python
"""The OpenAI-compatible server (``tools/serve.py``) measured from outside, as a client sees it:
time from launch to the first answered request, resident memory with one, two and three budgets
in use (and the MiB of weights each budget copies), decode tokens/s of one request at a time
against concurrent requests (one budget, and two budgets interleaved), and how long ``/health``
takes while a batch decodes.

    python benchmarks/bench_serve.py --checkpoint runs/quickstart/stage2/step_0000040 \\
        --tokenizer runs/quickstart/data/tokenizer.json --threads 1

Greedy completions of ``--max-tokens`` tokens; tokens/s counts the completion tokens the server
reports (``usage``) over the wall time of all requests, median of ``--repeats`` runs. Startup is
reported as wall time and as the server's CPU time (user + system) until it answered: on a
shared machine the first depends on the load, the second much less.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).parents[1]
PROMPTS = ["Question: What is 3 + 4?\nAnswer:", "The sum of 12 and 30 is", "x = 12; y ="]


def _post(base: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{base}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.load(r)


def _run(base: str, bodies: list[dict], concurrent: bool) -> tuple[int, float]:
    """(completion tokens, seconds) of the requests, one after another or all at once."""
    tokens = [0] * len(bodies)

    def ask(i: int) -> None:
        tokens[i] = _post(base, bodies[i])["usage"]["completion_tokens"]

    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(bodies)):
            ask(i)
    return sum(tokens), time.perf_counter() - start


def weight_copies(checkpoint: str, tokenizer: str | None) -> dict[str, float]:
    """In this process: MiB of weights each budget's serving network holds outside the loaded
    parent's storage (copies of non-contiguous slices), and the parent's own."""
    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups
    from megatron_elastic.serving.api_models import load_models

    models = load_models(checkpoint, init_process_groups(ParallelConfig()), tokenizer=tokenizer)
    params = list(models.checkpoint.model.parameters())
    storages = {p.untyped_storage().data_ptr() for p in params}
    out = {"parent": sum(p.numel() * p.element_size() for p in params) / 2**20}
    for name, budget in models.budgets.items():
        net = models.session.net(budget)
        tensors = [net.embedding, net.final_norm, net.output]
        tensors += [t for layer in net.layers for t in layer.weights.values()]
        out[f"{name} copied"] = (
            sum(
                t.numel() * t.element_size()
                for t in tensors
                if t.untyped_storage().data_ptr() not in storages
            )
            / 2**20
        )
    destroy_process_groups()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--tokenizer")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode (median)")
    args = parser.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(ROOT / "tools" / "serve.py"), "--checkpoint", args.checkpoint]
    cmd += ["--port", str(port)] + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.05)
        ready = time.perf_counter() - start
        cpu = psutil.Process(proc.pid).cpu_times()
        with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as r:
            names = [m["id"] for m in json.load(r)["data"]]
        rss = psutil.Process(proc.pid)
        mib = lambda: rss.memory_info().rss / 2**20
        results = {
            "ready_s": round(ready, 2),
            "ready_cpu_s": round(cpu.user + cpu.system, 2),
            "models": names,
            "rss_mib": {"loaded": mib()},
        }
        for used, name in enumerate(names[:3], start=1):
            _post(base, {"model": name, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
            results["rss_mib"][f"{used} budget(s) used"] = mib()

        def bodies(models: list[str]) -> list[dict]:
            return [
                {
                    "model": models[i % len(models)],
                    "prompt": PROMPTS[i % len(PROMPTS)],
                    "max_tokens": args.max_tokens,
                    "temperature": 0,
                }
                for i in range(args.requests)
            ]

        for label, models, concurrent in [
            ("sequential, one budget", names[:1], False),
            ("concurrent, one budget", names[:1], True),
            ("sequential, two budgets interleaved", names[:2], False),
            ("concurrent, two budgets interleaved", names[:2], True),
        ]:
            rates = []
            for _ in range(args.repeats):
                tokens, seconds = _run(base, bodies(models), concurrent)
                rates.append(tokens / seconds)
            rates.sort()
            results[label] = {
                "tokens": tokens,
                "tok/s median": round(rates[len(rates) // 2], 1),
                "tok/s range": [round(rates[0], 1), round(rates[-1], 1)],
            }
        # the event loop while the model thread decodes
        worker = threading.Thread(target=_run, args=(base, bodies(names[:1]), True))
        worker.start()
        time.sleep(0.5)
        latencies = []
        while worker.is_alive():
            t0 = time.perf_counter()
            with urllib.request.urlopen(f"{base}/health", timeout=60):
                latencies.append(time.perf_counter() - t0)
            time.sleep(0.1)
        worker.join()
        results["health_during_decode_ms"] = {
            "n": len(latencies),
            "max": 1000 * max(latencies, default=0.0),
            "median": 1000 * sorted(latencies)[len(latencies) // 2] if latencies else None,
        }
        proc.terminate()
        results["exit_code_on_sigterm"] = proc.wait(timeout=60)
        results["weights_mib"] = weight_copies(args.checkpoint, args.tokenizer)
        print(json.dumps(results, indent=1))
    finally:
        if proc.poll() is None:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
