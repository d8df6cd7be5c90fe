#!/usr/bin/env python
"""What ``tools/prepare_data.py --workers N`` buys: ``prepare_dataset`` of one generated corpus
with 1 worker and with N, alternating, in one process (the tokenizer trained once first); the
outputs are checked byte-identical. Reports the median and range of each and their ratio.

    python benchmarks/bench_prepare_data.py                      # 60,000 problems, 1 vs 2
    python benchmarks/bench_prepare_data.py --documents 200000 --workers 4

The last line is ``prepare_data --workers N: X.XXx the speed of one worker``.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from megatron_elastic import cli


def _digest(prefix: Path) -> str:
    sha = hashlib.sha256()
    for ext in (".bin", ".idx"):
        sha.update(prefix.with_suffix(ext).read_bytes())
    return sha.hexdigest()


def _bench(work: Path, documents: int, workers: int, repeats: int) -> float:
    from megatron_elastic.data.prepare import prepare_dataset
    from megatron_elastic.data.reasoning import generate_records

    corpus = work / "train.jsonl"  # the quickstart's problems, as make_tiny_corpus writes them
    with corpus.open("w", encoding="utf-8") as f:
        for record in generate_records(documents, seed=0):
            f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
    quiet = lambda message: None
    prepare_dataset(corpus, work / "tok" / "data", train_tokenizer=512, log=quiet)
    tokenizer = work / "tok" / "tokenizer.json"
    times: dict[int, list[float]] = {1: [], workers: []}
    digests = set()
    for _ in range(repeats):
        for n in times:
            out = work / f"w{n}" / "data"
            start = time.perf_counter()
            prepare_dataset(corpus, out, tokenizer=tokenizer, append_eod=True, workers=n, log=quiet)
            times[n].append(time.perf_counter() - start)
            digests.add(_digest(out))
    if len(digests) != 1:
        raise SystemExit(f"outputs differ between 1 and {workers} workers: {sorted(digests)}")
    size = corpus.stat().st_size / 1e6
    print(f"corpus: {documents:,} documents, {size:.1f} MB; {repeats} alternating runs each")
    for n, ts in times.items():
        print(
            f"workers {n}: median {statistics.median(ts):.2f} s (range {min(ts):.2f}-{max(ts):.2f})"
        )
    ratio = statistics.median(times[1]) / statistics.median(times[workers])
    print(f"prepare_data --workers {workers}: {ratio:.2f}x the speed of one worker")
    return ratio


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=60_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        _bench(Path(tmp), args.documents, args.workers, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
