#!/usr/bin/env python
"""What checkpoint checksums cost: ``save_checkpoint`` and ``load_checkpoint`` of a model with
its optimizer-free weights, each timed whole and with its hashing part timed alone in the same
run (the files are in the page cache both times, as right after a save); then the load with
``checkpoint.verify`` ``full`` and ``manifest`` side by side, alternating, median and range.

    python benchmarks/bench_checkpoint_integrity.py            # ~0.4 GB of fp32 weights
    python benchmarks/bench_checkpoint_integrity.py --hidden 512

The last lines are ``checksum overhead: save X%, load Y%`` and ``load verify=...: median s``.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from megatron_elastic import cli

ROOT = Path(__file__).resolve().parents[1]


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the tiny stack")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from megatron_elastic.checkpoint import (
        MANIFEST,
        load_checkpoint,
        read_manifest,
        save_checkpoint,
    )
    from megatron_elastic.config import ParallelConfig, load_model_config
    from megatron_elastic.integrity import ALGORITHM, digest_files, list_files, verify_files
    from megatron_elastic.model import build_hybrid_model
    from megatron_elastic.parallel import init_process_groups

    tiny = load_model_config(ROOT / "examples" / "tiny" / "model.yaml")
    cfg = dataclasses.replace(
        tiny, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden, vocab_size=32768
    )
    pgs = init_process_groups(ParallelConfig())
    model = build_hybrid_model(cfg, pgs)
    work = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        path = work / "ckpt"
        save = _best(lambda: save_checkpoint(path, model, cfg, kind="parent"), args.repeats)
        names = [n for n in list_files(path) if n != MANIFEST]
        size = sum((path / n).stat().st_size for n in names)
        hash_save = _best(lambda: digest_files(path, names), args.repeats)
        load = _best(lambda: load_checkpoint(path, model, cfg), args.repeats)
        recorded = read_manifest(path)["files"]
        hash_load = _best(
            lambda: verify_files(path, recorded, [], complete_under="weights"), args.repeats
        )
        by_mode: dict[str, list[float]] = {"full": [], "manifest": []}
        for _ in range(args.repeats):  # alternating: both see the same machine load
            for mode, times in by_mode.items():
                times.append(_best(lambda m=mode: load_checkpoint(path, model, cfg, verify=m), 1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gb = size / 1e9
    print(f"checkpoint: {gb:.2f} GB in {len(names)} files, {ALGORITHM}")
    print(f"save {save:.2f} s, of which hashing {hash_save:.2f} s ({gb / hash_save:.2f} GB/s)")
    print(f"load {load:.2f} s, of which verifying {hash_load:.2f} s ({gb / hash_load:.2f} GB/s)")
    print(
        f"checksum overhead: save {100 * hash_save / (save - hash_save):.0f}%, "
        f"load {100 * hash_load / (load - hash_load):.0f}%"
    )
    for mode, times in by_mode.items():
        print(
            f"load verify={mode}: median {statistics.median(times):.2f} s "
            f"(min {min(times):.2f}, max {max(times):.2f}, {len(times)} runs)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
