#!/usr/bin/env python
"""Elastic forward+backward step against dense megatron models of the same dims, one process, CPU.

The parent is the tiny recipe scaled up so that matmuls dominate Python overhead (hidden 512,
FFN 2048, 8 attention heads x 64 in 2 query groups, 16 Mamba heads x 64 in 2 groups; the tiny
recipe's layer pattern, vocabulary and state size). FFN neurons nest in ``--ffn-nesting-blocks``
blocks (default: the tiny recipe's ``examples/tiny/elastic.yaml``, 2; the 12B recipe uses 8), so
a budget's neurons are a prefix of every block, not of the layer. For the budgets 100% / 75% / 50%
the benchmark picks one homogeneous sub-network each and times, side by side in the same loop:

* ``slice``: the elastic parent running the sub-network on cut weights, against a plain megatron
  ``HybridModel`` built with exactly the sub-network's dims (target: ratio <= 1.15 at every
  budget). Without router weights this is how a trained budget is evaluated and exported; at 100%
  ``set_subnet`` then dispatches to megatron's own forward (the rows' noise floor).
* ``+ router hard`` / ``+ router soft``: the training configuration. An :class:`ElasticRouter`
  over the benchmark's candidates (the tiny recipe's depth choices) decides every step with the
  trainer's call (``decide(budget, step, generator)``), its output biases set so that the sample
  is the row's sub-network; the model runs with the decision's :class:`SubnetWeights`: ``hard``
  (the recipes' sampling) a straight-through scalar per layer, on the hidden width and as every
  layer's depth gate; ``soft`` one weight per hidden channel, attention head, Mamba channel and
  FFN neuron, and a depth gate per layer. The router's forward and ``set_subnet`` run before the
  timer (their median is printed); the backward into the router is timed.
* ``mask``: the elastic parent computing at full width with 0/1 masks, against the plain megatron
  parent (target at full budget: ratio <= 1.10). At 75% / 50% the mask rows are informational:
  mask mode does full-width compute by design, so the parent is the right reference.

Each row warms up, then times ``--iters`` interleaved (elastic, dense) pairs, alternating which
goes first (``--clock cpu``: CPU time of the process instead of elapsed time); the ms columns
are medians, the ratio is the median of the per-pair ratios and ``range`` their min-max. The last
printed line is ``worst slice/dense ratio: <float>`` (the largest median over every slice row,
router rows included).
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
from megatron_elastic.elastic import (
    ElasticConfig,
    SubnetSpec,
    build_elastic_model,
    load_elastic_recipe,
)
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.model.param_count import count_parameters
from megatron_elastic.parallel import destroy_process_groups, init_process_groups
from megatron_elastic.router import ElasticRouter, RouterConfig

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


def elastic_config(ffn_nesting_blocks: int) -> ElasticConfig:
    """The benchmark's budgets, with every budget's dims as a candidate (so a router can pick
    them), the tiny recipe's depth choices and the given FFN nesting."""
    _, tiny = load_elastic_recipe(ROOT / "examples" / "tiny" / "elastic.yaml")
    dims = list(zip(*BUDGET_DIMS.values(), strict=True))
    return ElasticConfig(
        budgets={name: float(name.rstrip("%")) / 100 for name in BUDGET_DIMS},
        hidden_choices=dims[0],
        attention_head_choices=dims[1],
        mamba_head_choices=dims[2],
        mamba_head_dim_choices=dims[3],
        ffn_choices=dims[4],
        depth_choices=tiny.depth_choices,
        heterogeneous=tiny.heterogeneous,
        ffn_nesting_blocks=ffn_nesting_blocks,
    )


class ForcedRouter:
    """An :class:`ElasticRouter` whose decisions are a given sub-network: the output biases put
    a logit of ``margin`` on its candidates (the output weights start at zero, so the logits are
    the biases; Gumbel noise beats a margin of 30 with probability ~e^-30). Every call of
    :meth:`decide` is the trainer's ``router.decide(budget, step, generator)``."""

    def __init__(self, parent: ModelConfig, elastic: ElasticConfig, sampling: str) -> None:
        self.router = ElasticRouter(
            parent, elastic, RouterConfig(anneal_steps=100, sampling=sampling)
        )
        self.step = 0

    def force(self, budget: str, spec: SubnetSpec, margin: float = 30.0) -> None:
        r, layer = self.router, {c.kind: c for c in spec.layers}
        size = {  # homogeneous: one decision per axis
            "hidden": spec.hidden,
            "attention_heads": layer["attention"].width,
            "mamba_heads": layer["mamba"].width,
            "mamba_head_dim": layer["mamba"].head_dim,
            "ffn": layer["mlp"].width,
            "depth": spec.depth,
        }
        with torch.no_grad():
            for axis in r.axes:
                bias = r.routers[axis][2].bias
                bias.zero_()
                bias[r.choices[axis].index(size[axis])] = margin
        self.budget, self.spec = budget, spec

    def decide(self):
        self.step += 1
        decision = self.router.decide(
            self.budget, self.step, torch.Generator().manual_seed(self.step)
        )
        if decision.spec != self.spec:
            raise RuntimeError(f"the router sampled another sub-network for {self.budget}")
        return decision.weights


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


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""``wall``: elapsed seconds; ``cpu``: CPU seconds of this process (all its threads), which time
spent descheduled by other processes does not add to (for a machine that is not quiet)."""


def make_step(
    model: torch.nn.Module, tokens, position_ids, labels, before=None, setup=None, clock="wall"
):
    """A timed forward+backward of ``model``; ``before()`` runs first, untimed (its seconds are
    appended to ``setup``)."""
    now = CLOCKS[clock]

    def step() -> float:
        model.zero_grad(set_to_none=True)
        gc.collect()
        if before is not None:
            start = now()
            before()
            setup.append(now() - start)
        start = now()
        loss = model(tokens, position_ids, None, labels=labels)
        loss.mean().backward()
        return now() - start

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
    _, tiny = load_elastic_recipe(ROOT / "examples" / "tiny" / "elastic.yaml")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--ffn-nesting-blocks",
        type=int,
        default=tiny.ffn_nesting_blocks,
        help="FFN nesting blocks (default: the tiny recipe's; the 12B recipe's is 8)",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time (the targets' measure); cpu: this process's CPU time, for a "
        "shared machine (with --threads 1 it excludes time spent waiting for the cores)",
    )
    parser.add_argument("--verbose", action="store_true", help="print every timed pair")
    args = parser.parse_args()
    if args.iters < 5:
        parser.error("--iters must be >= 5 (the ratio is a median)")

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    parent = parent_config()
    pgs = init_process_groups(ParallelConfig(), seed=1234)

    budgets = BUDGET_DIMS
    elastic_cfg = elastic_config(args.ffn_nesting_blocks)
    elastic = build_elastic_model(parent, elastic_cfg, pgs)
    routers = {s: ForcedRouter(parent, elastic_cfg, s) for s in ("hard", "soft")}
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

    # (budget, set_subnet mode, router sampling or None, dense reference, target)
    rows = [
        ("100%", "slice", None, "100%", SLICE_TARGET),
        ("75%", "slice", None, "75%", SLICE_TARGET),
        ("50%", "slice", None, "50%", SLICE_TARGET),
        *[(bud, "slice", "hard", bud, SLICE_TARGET) for bud in budgets],
        *[(bud, "slice", "soft", bud, SLICE_TARGET) for bud in budgets],
        ("100%", "mask", None, "100%", MASK_FULL_TARGET),
        ("100%", "mask", "hard", "100%", MASK_FULL_TARGET),
        ("100%", "mask", "soft", "100%", MASK_FULL_TARGET),
        ("75%", "mask", None, "100%", None),
        ("50%", "mask", None, "100%", None),
    ]

    # One step of every model first: megatron's torch.compile'd activation compiles here (its
    # compile workers would otherwise count as other load during the first row).
    for model in (elastic, *dense.values()):
        make_step(model, tokens, position_ids, labels)()
    cpu_start = _cpu_seconds()
    print(
        f"parent: {parent_params / 1e6:.2f}M params, pattern {parent.hybrid_pattern}, "
        f"ffn_nesting_blocks {elastic_cfg.ffn_nesting_blocks}, batch {b} x seq {s}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock, torch {torch.__version__}"
    )
    for name, dims in budgets.items():
        print(
            f"  {name:>4}: hidden {dims[0]}, attention heads {dims[1]}, mamba {dims[2]} heads x "
            f"{dims[3]}, ffn {dims[4]} -> {fraction[name]:.3f} of the parent's parameters"
        )
    header = (
        f"{'budget':>6} {'mode':<20} {'params':>6} {'elastic ms':>11} {'dense ms':>9} "
        f"{'ratio':>6} {'range':>11} {'target':>7} {'busy':>5}"
    )
    print(header)
    print("-" * len(header))
    worst_slice, worst_row, failures, setup = 0.0, "", [], {"hard": [], "soft": []}
    for budget, mode, sampling, ref, target in rows:
        spec = subnet_spec(parent, budgets[budget])
        label = mode if sampling is None else f"{mode} + router {sampling}"
        before = None
        if sampling is None:
            elastic.set_subnet(spec, mode=mode)
        else:
            router = routers[sampling]
            router.force(budget, spec)

            def before(router=router, spec=spec, mode=mode):
                router.router.zero_grad(set_to_none=True)
                elastic.set_subnet(spec, router.decide(), mode=mode)

        row_start = _cpu_seconds()
        t_el, t_de, ratios = time_pair(
            make_step(
                elastic, tokens, position_ids, labels, before, setup.get(sampling), args.clock
            ),
            make_step(dense[ref], tokens, position_ids, labels, clock=args.clock),
            args.warmup,
            args.iters,
        )
        busy = other_cores(row_start, _cpu_seconds())
        el_ms, de_ms = statistics.median(t_el) * 1e3, statistics.median(t_de) * 1e3
        ratio = statistics.median(ratios)
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        ref_note = "" if ref == budget else f" (vs dense {ref})"
        verdict = "" if target is None else ("ok" if ratio <= target else "MISS")
        tgt = "-" if target is None else f"<={target:.2f}"
        print(
            f"{budget:>6} {label:<20} {fraction[budget]:>6.3f} {el_ms:>11.1f} {de_ms:>9.1f} "
            f"{ratio:>6.3f} {spread:>11} {tgt:>7} {'-' if busy is None else f'{busy:.2f}':>5} "
            f"{verdict}{ref_note}",
            flush=True,
        )
        if args.verbose:
            pairs = zip(t_el, t_de, strict=True)
            print(
                "       elastic/dense ms: "
                + " ".join(f"{e * 1e3:.0f}/{d * 1e3:.0f}" for e, d in pairs)
            )
        if mode == "slice" and ratio > worst_slice:
            worst_slice, worst_row = ratio, f"{budget} {label}"
        if target is not None and ratio > target:
            failures.append(f"{budget} {label}: {ratio:.3f} > {target:.2f}")
    elastic.set_subnet(None)
    destroy_process_groups()
    others = other_cores(cpu_start, _cpu_seconds())
    for sampling, seconds in setup.items():
        print(
            f"router {sampling}: decide + set_subnet (untimed, before each elastic step) median "
            f"{statistics.median(seconds) * 1e3:.1f} ms"
        )
    if others is not None:
        note = ""
        if others > 0.25:
            note = (
                " (cpu clock: time spent waiting for a core is not counted)"
                if args.clock == "cpu"
                else " (the machine was not quiet: ratios are noisy)"
            )
        print(f"other processes used {others:.2f} of {os.cpu_count()} cores during the run{note}")
    print("targets met" if not failures else "targets missed: " + "; ".join(failures))
    print(f"worst slice/dense ratio: {worst_slice:.3f} ({worst_row})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
