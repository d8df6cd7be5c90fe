#!/usr/bin/env python
"""Elastic forward+backward step against dense megatron models of the same dims, one process, CPU.

The parent is the tiny recipe scaled up so that matmuls dominate Python overhead (hidden 512,
FFN 2048, 8 attention heads x 64 in 2 query groups, 16 Mamba heads x 64 in 2 groups; the tiny
recipe's layer pattern, vocabulary and state size). For the budgets 100% / 75% / 50% the benchmark
picks one homogeneous sub-network each and times, side by side in the same loop:

* ``slice``: the elastic parent running the sub-network on cut weights, against a plain megatron
  ``HybridModel`` built with exactly the sub-network's dims (target: ratio <= 1.15 at every
  budget). At 100% without router weights ``set_subnet`` dispatches to megatron's own forward.
* ``mask``: the elastic parent computing at full width with 0/1 masks, against the plain megatron
  parent (target at full budget: ratio <= 1.10). At 75% / 50% the mask rows are informational:
  mask mode does full-width compute by design, so the parent is the right reference.
* ``+ router weights`` rows: full budget with a scalar hidden router weight, the training
  configuration (elastic code path, not megatron's forward).

Each row warms up, then times ``--iters`` interleaved (elastic, dense) pairs, alternating which
goes first; the ms columns are medians and the ratio is the median of the per-pair ratios. The last
printed line is ``worst slice/dense ratio: <float>`` (over every slice row).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from megatron_elastic.config import ModelConfig, ParallelConfig, load_model_config
from megatron_elastic.elastic import ElasticConfig, SubnetSpec, SubnetWeights, build_elastic_model
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.model.param_count import count_parameters
from megatron_elastic.parallel import destroy_process_groups, init_process_groups

ROOT = Path(__file__).resolve().parent.parent

SLICE_TARGET = 1.15
MASK_FULL_TARGET = 1.10

# Sub-network dims per budget: hidden, attention heads, Mamba heads, Mamba head dim, FFN neurons.
# 75% and 50% shrink every axis; heads drop within every group, so their rows are not contiguous.
BUDGET_DIMS = {
    "100%": (512, 8, 16, 64, 2048),
    "75%": (448, 6, 12, 64, 1792),
    "50%": (384, 6, 12, 48, 1152),
}


def parent_config() -> ModelConfig:
    tiny = load_model_config(ROOT / "examples" / "tiny" / "model.yaml")
    return dataclasses.replace(
        tiny,
        hidden_size=512,
        ffn_hidden_size=2048,
        head_dim=64,
        mamba_num_heads=16,
        mamba_head_dim=64,
    )


def dense_config(parent: ModelConfig, dims: tuple[int, int, int, int, int]) -> ModelConfig:
    hidden, heads, mamba_heads, mamba_head_dim, ffn = dims
    return dataclasses.replace(
        parent,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        mamba_num_heads=mamba_heads,
        mamba_head_dim=mamba_head_dim,
        hybrid_pattern=parent.hybrid_pattern,
    )


def subnet_spec(parent: ModelConfig, dims: tuple[int, int, int, int, int]) -> SubnetSpec:
    hidden, heads, mamba_heads, mamba_head_dim, ffn = dims
    return SubnetSpec.homogeneous(
        parent,
        hidden=hidden,
        attention_heads=heads,
        mamba_heads=mamba_heads,
        mamba_head_dim=mamba_head_dim,
        ffn=ffn,
    )


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(CPU seconds busy on the whole machine, CPU seconds of this process, wall seconds), to
    report how much other work competed for the cores; ``None`` without ``/proc/stat``."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return (sum(fields[:8]) - idle) / tick, own.user + own.system, time.perf_counter()


def make_step(model: torch.nn.Module, tokens, position_ids, labels):
    def step() -> float:
        model.zero_grad(set_to_none=True)
        gc.collect()
        start = time.perf_counter()
        loss = model(tokens, position_ids, None, labels=labels)
        loss.mean().backward()
        return time.perf_counter() - start

    return step


def time_pair(
    elastic_step, dense_step, warmup: int, iters: int
) -> tuple[list[float], list[float], list[float]]:
    """Per-pair elastic seconds, dense seconds and elastic/dense ratios."""
    for _ in range(warmup):
        elastic_step()
        dense_step()
    t_el, t_de, ratios = [], [], []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(iters):
            if i % 2 == 0:
                e, d = elastic_step(), dense_step()
            else:
                d, e = dense_step(), elastic_step()
            t_el.append(e)
            t_de.append(d)
            ratios.append(e / d)
    finally:
        if gc_was_enabled:
            gc.enable()
    return t_el, t_de, ratios


def other_cores(start, end) -> float | None:
    """Cores that other processes kept busy between two :func:`_cpu_seconds` readings."""
    if start is None or end is None:
        return None
    return max(0.0, (end[0] - start[0]) - (end[1] - start[1])) / (end[2] - start[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--verbose", action="store_true", help="print every timed pair")
    args = parser.parse_args()
    if args.iters < 5:
        parser.error("--iters must be >= 5 (the ratio is a median)")

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    parent = parent_config()
    pgs = init_process_groups(ParallelConfig(), seed=1234)

    budgets = BUDGET_DIMS
    elastic_cfg = ElasticConfig(
        budgets={"100%": 1.0, "75%": 0.75, "50%": 0.5}, ffn_nesting_blocks=1
    )
    elastic = build_elastic_model(parent, elastic_cfg, pgs)
    dense = {
        name: build_hybrid_model(dense_config(parent, dims), pgs) for name, dims in budgets.items()
    }
    parent_params = count_parameters(parent)
    fraction = {
        name: count_parameters(dense_config(parent, dims)) / parent_params
        for name, dims in budgets.items()
    }
    for model in (elastic, *dense.values()):
        model.train()

    torch.manual_seed(0)
    b, s = args.batch, args.seq
    tokens = torch.randint(0, parent.vocab_size, (b, s))
    labels = torch.randint(0, parent.vocab_size, (b, s))
    position_ids = torch.arange(s)[None].expand(b, -1)

    def router() -> SubnetWeights:
        return SubnetWeights(hidden=torch.ones((), requires_grad=True))

    # (budget, mode label, set_subnet mode, router weights?, dense reference, target)
    rows = [
        ("100%", "slice", "slice", False, "100%", SLICE_TARGET),
        ("75%", "slice", "slice", False, "75%", SLICE_TARGET),
        ("50%", "slice", "slice", False, "50%", SLICE_TARGET),
        ("100%", "slice + router weights", "slice", True, "100%", SLICE_TARGET),
        ("100%", "mask", "mask", False, "100%", MASK_FULL_TARGET),
        ("100%", "mask + router weights", "mask", True, "100%", MASK_FULL_TARGET),
        ("75%", "mask", "mask", False, "100%", None),
        ("50%", "mask", "mask", False, "100%", None),
    ]

    # One step of every model first: megatron's torch.compile'd activation compiles here (its
    # compile workers would otherwise count as other load during the first row).
    for model in (elastic, *dense.values()):
        make_step(model, tokens, position_ids, labels)()
    cpu_start = _cpu_seconds()
    print(
        f"parent: {parent_params / 1e6:.2f}M params, pattern {parent.hybrid_pattern}, "
        f"batch {b} x seq {s}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    for name, dims in budgets.items():
        print(
            f"  {name:>4}: hidden {dims[0]}, attention heads {dims[1]}, mamba {dims[2]} heads x "
            f"{dims[3]}, ffn {dims[4]} -> {fraction[name]:.3f} of the parent's parameters"
        )
    header = (
        f"{'budget':>6} {'mode':<24} {'params':>6} {'elastic ms':>11} {'dense ms':>9} "
        f"{'ratio':>6} {'target':>7} {'busy':>5}"
    )
    print(header)
    print("-" * len(header))
    worst_slice, failures = 0.0, []
    for budget, label, mode, with_router, ref, target in rows:
        elastic.set_subnet(
            subnet_spec(parent, budgets[budget]), router() if with_router else None, mode=mode
        )
        row_start = _cpu_seconds()
        t_el, t_de, ratios = time_pair(
            make_step(elastic, tokens, position_ids, labels),
            make_step(dense[ref], tokens, position_ids, labels),
            args.warmup,
            args.iters,
        )
        busy = other_cores(row_start, _cpu_seconds())
        el_ms, de_ms = statistics.median(t_el) * 1e3, statistics.median(t_de) * 1e3
        ratio = statistics.median(ratios)
        ref_note = "" if ref == budget else f" (vs dense {ref})"
        verdict = "" if target is None else ("ok" if ratio <= target else "MISS")
        tgt = "-" if target is None else f"<={target:.2f}"
        print(
            f"{budget:>6} {label:<24} {fraction[budget]:>6.3f} {el_ms:>11.1f} {de_ms:>9.1f} "
            f"{ratio:>6.3f} {tgt:>7} {'-' if busy is None else f'{busy:.2f}':>5} "
            f"{verdict}{ref_note}",
            flush=True,
        )
        if args.verbose:
            pairs = zip(t_el, t_de, strict=True)
            print(
                "       elastic/dense ms: "
                + " ".join(f"{e * 1e3:.0f}/{d * 1e3:.0f}" for e, d in pairs)
            )
        if mode == "slice":
            worst_slice = max(worst_slice, ratio)
        if target is not None and ratio > target:
            failures.append(f"{budget} {label}: {ratio:.3f} > {target:.2f}")
    elastic.set_subnet(None)
    destroy_process_groups()
    others = other_cores(cpu_start, _cpu_seconds())
    if others is not None:
        print(
            f"other processes used {others:.2f} of {os.cpu_count()} cores during the run"
            + (" (the machine was not quiet: ratios are noisy)" if others > 0.25 else "")
        )
    print("targets met" if not failures else "targets missed: " + "; ".join(failures))
    print(f"worst slice/dense ratio: {worst_slice:.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
