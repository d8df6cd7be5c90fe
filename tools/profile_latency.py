#!/usr/bin/env python
"""Measure the per-layer latency table for ``router.budget_target: latency`` on this device.

    python tools/profile_latency.py --config examples/tiny/elastic.yaml --output lut.json

For every layer kind (Mamba, attention, MLP) at every candidate size of the elastic recipe
(hidden x heads x head dim, hidden x heads, hidden x neurons) and for the embedding/output
``base``, times the cached-generation code path: ``decode`` seconds per token with ``--context``
tokens cached, and ``prefill`` seconds per token of a ``--prefill-tokens`` prompt (fastest of
``--repeats``). The router interpolates between the measured sizes. Run it on the device (and
with the thread count) the budgets are meant for; then set ``router.budget_target: latency`` and
``router.latency_table: lut.json`` in the stage recipe. Bad input stops with exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_elastic import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    from megatron_elastic.serving.profile import profile_latency

    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="elastic recipe YAML (model + elastic)")
    parser.add_argument("--output", required=True, help="JSON file to write")
    parser.add_argument("--context", type=int, help="cached tokens for decode")
    parser.add_argument("--prefill-tokens", type=int)
    parser.add_argument("--repeats", type=int, help="timings per point (fastest)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--device", help="cpu or cuda")
    parser.take_defaults(profile_latency)
    args = parser.parse_args(argv)
    for name in ("context", "prefill_tokens", "repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    output = Path(args.output)
    if output.is_dir():
        raise ValueError(f"--output {str(output)!r} is a directory; give a file name (lut.json)")

    import torch

    from megatron_elastic.elastic import load_elastic_recipe

    model, elastic = load_elastic_recipe(args.config)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    table = profile_latency(
        model,
        elastic,
        context=args.context,
        prefill_tokens=args.prefill_tokens,
        repeats=args.repeats,
        device=args.device,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(table.to_json(), indent=1) + "\n")
    full = table.seconds["decode"]
    print(
        f"wrote {output}: {table.device}; decode s/token at full width: "
        f"base {full['base'][-1]:.2e}, mamba {full['mamba'][-1][-1][-1]:.2e}, "
        f"attention {full['attention'][-1][-1]:.2e}, mlp {full['mlp'][-1][-1]:.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
