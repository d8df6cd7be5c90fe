#!/usr/bin/env python
"""bf16 training steps of the elastic pair on a 12B-shaped layer stack, one CUDA GPU.

The stack has Nemotron Nano V2 12B's widths (``examples/nemotron_nano_12b/model.yaml``: hidden
5120, FFN 20480, 40 query heads x 128 in 8 groups, 128 Mamba heads x 80 in 8 groups, state 128)
but only a few layers of each kind (``--pattern``, default ``M-M*-M*-``: 3 Mamba, 3 MLP, 2
attention). One step is what the trainer does per micro-batch: the frozen bf16 teacher's forward,
the elastic student's forward and backward (KD loss) through megatron's schedule and DDP, and the
optimizer step (megatron's Adam, fp32 main weights), with per-layer activation recomputation as
the 12B recipes set it. Cases, each timed after a warm-up (CUDA-synchronised wall clock, median):

* ``full/slice``: the full budget with a router weight on the activations (the elastic code path);
* ``6B/slice``: the 12B recipe's 6B width choices (hidden 3584, FFN 12800, 112 Mamba heads; the
  recipe's depth cut does not apply to a few-layer stack), weights cut to the prefix;
* ``6B/mask``: the same sub-network as 0/1 masks at full width (the paper's way);
* ``eval/full``: the trainer's evaluation step of the full budget (forward only, megatron's own
  modules), its peak above the resident training state against the evaluation plan
  (:func:`megatron_elastic.planning.evaluation.plan_evaluation`).

Per case: step ms, model TFLOP/s (teacher forward + 3x student forward, :func:`case_flops`;
recomputation not counted), hardware TFLOP/s (recomputation counted), MFU against the datasheet
bf16 dense peak and against an 8192^3 bf16 matmul measured in the same process, and peak memory
(``torch.cuda.max_memory_allocated``). Ratios: 6B/full (slice speedup) and mask/slice. An
out-of-memory case is recorded with the allocator's message and the run goes on.

Needs CUDA: without it, prints one line and exits 2. The FLOP count is
``megatron_elastic/planning/flops.py``'s (the trainer's MFU), from the layer shapes only
(unit-tested on CPU).

    python benchmarks/bench_gpu_step.py --seq 8192 --output runs/gpu_step_8k.json
    python benchmarks/bench_gpu_step.py --seq 49152 --vocab 16384 --output runs/gpu_step_49k.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_elastic.config import ModelConfig, load_model_config  # noqa: E402

if TYPE_CHECKING:
    from megatron_elastic.elastic.subnet import SubnetSpec

__all__ = ["H200_BF16_PEAK_TFLOPS", "case_flops", "stack_config"]

H200_BF16_PEAK_TFLOPS = 989.4
"""Dense bf16 tensor-core peak of an H100/H200 SXM (datasheet, no sparsity)."""

SIX_B_WIDTHS = {"hidden": 3584, "ffn": 12800, "mamba_heads": 112}
"""The 12B recipe's 6B ``budget_choices`` (examples/nemotron_nano_12b/elastic.yaml), widths only."""


def case_flops(
    cfg: ModelConfig, spec: SubnetSpec, *, mode: str, seq: int, recompute: bool
) -> dict[str, float]:
    """FLOPs of one case's distillation micro-batch (one sample of ``seq`` tokens), counted by
    :mod:`megatron_elastic.planning.flops`: ``model`` = teacher forward + student forward and
    backward (3x forward), the MFU convention; ``hardware`` adds the student layers' forward
    recomputed in backward when ``recompute``. ``mask`` mode computes at full width whatever
    ``spec`` is; ``slice`` mode at ``spec``'s widths."""
    from megatron_elastic.planning.flops import StepFlops

    flops = StepFlops(
        cfg,
        seq_length=seq,
        micro_batch_size=1,
        teacher=True,
        recompute=recompute,
        full_width=mode == "mask",
    )
    model, hardware = flops.step({spec: 1})
    return {"model": model, "hardware": hardware}


def stack_config(pattern: str, vocab: int | None = None) -> ModelConfig:
    """The 12B parent's widths with a short ``pattern`` (and optionally another vocabulary)."""
    cfg = load_model_config(ROOT / "examples" / "nemotron_nano_12b" / "model.yaml")
    return dataclasses.replace(cfg, hybrid_pattern=pattern, vocab_size=vocab or cfg.vocab_size)


def dense_equivalent(cfg: ModelConfig, widths: dict[str, int]) -> ModelConfig:
    """A plain config with the sub-network's widths (what slice mode computes)."""
    return dataclasses.replace(
        cfg,
        hidden_size=widths.get("hidden", cfg.hidden_size),
        ffn_hidden_size=widths.get("ffn", cfg.ffn_hidden_size),
        mamba_num_heads=widths.get("mamba_heads", cfg.mamba_num_heads),
    )


def matmul_tflops(n: int = 8192, iters: int = 10) -> float:
    """Measured bf16 matmul rate (TFLOP/s) of this GPU: the practical ceiling."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    rate = 2 * n**3 * iters / (time.perf_counter() - start) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return rate


def run(
    args: argparse.Namespace,
    *,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    cfg: ModelConfig | None = None,
) -> dict:
    """The benchmark (``device``/``dtype``/``cfg`` other than CUDA/bf16/12B-shaped: smoke tests)."""
    on_cuda = device == "cuda"
    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.distill.pair import DistillationPair
    from megatron_elastic.elastic import (
        ElasticConfig,
        SubnetSpec,
        SubnetWeights,
        build_elastic_model,
    )
    from megatron_elastic.model import build_hybrid_model
    from megatron_elastic.model.builder import use_te
    from megatron_elastic.model.param_count import count_parameters
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups
    from megatron_elastic.training import forward_backward
    from megatron_elastic.training.lm_step import distill_forward
    from megatron_elastic.training.optim import OptimConfig, build_optimizer, wrap_ddp

    cfg = cfg or stack_config(args.pattern, args.vocab)
    bf16 = dtype
    result: dict = {
        "device": torch.cuda.get_device_name() if on_cuda else device,
        "pattern": cfg.hybrid_pattern,
        "seq": args.seq,
        "micro_batch": 1,
        "vocab": cfg.vocab_size,
        "recompute": args.recompute,
        "transformer_engine_specs": use_te(),
        "params": count_parameters(cfg),
        "peak_tflops_datasheet": H200_BF16_PEAK_TFLOPS,
        "cases": {},
    }
    result["matmul_tflops_measured"] = round(matmul_tflops(), 1) if on_cuda else None
    pgs = init_process_groups(ParallelConfig(), seed=1234)
    elastic = ElasticConfig(budgets={"full": 1.0, "6B": 0.5}, ffn_nesting_blocks=8)
    student = build_elastic_model(cfg, elastic, pgs, params_dtype=bf16, recompute=args.recompute)
    teacher = build_hybrid_model(cfg, pgs, params_dtype=bf16)
    # The teacher's weights do not matter for timing: it keeps its own random init.
    optim = OptimConfig(lr=1e-5, min_lr=1e-6, warmup_steps=0, total_steps=1000)
    student_ddp = wrap_ddp(student, pgs, optim)
    optimizer, _ = build_optimizer(student_ddp, optim, params_dtype=bf16)
    pair = DistillationPair(student_ddp, teacher, temperature=1.0, ce_weight=0.0, tp_group=pgs.tp)
    result["memory_after_build_gib"] = (
        round(torch.cuda.memory_allocated() / 2**30, 2) if on_cuda else None
    )

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, args.seq + 1), generator=g).to(device)
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(1, args.seq, device=device),
    }

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize()

    def step() -> None:
        student_ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(
            pair,
            [batch],
            pgs,
            num_micro_batches=1,
            seq_length=args.seq,
            micro_batch_size=1,
            model_forward=distill_forward,
            p2p_batch_factor=2,
        )
        optimizer.step()

    specs = {
        "full": (SubnetSpec.homogeneous(cfg), cfg),
        "6B": (SubnetSpec.homogeneous(cfg, **SIX_B_WIDTHS), dense_equivalent(cfg, SIX_B_WIDTHS)),
    }
    result["params_6B_fraction"] = round(count_parameters(specs["6B"][1]) / result["params"], 4)
    for name in args.cases.split(","):
        if name == "eval/full":
            result["cases"][name] = case = eval_case(
                student_ddp, student, pgs, batch, cfg, args, device
            )
            print(f"{name}: {json.dumps(case)}", flush=True)
            continue
        budget, mode = name.split("/")
        spec, _ = specs[budget]
        flops = case_flops(cfg, spec, mode=mode, seq=args.seq, recompute=args.recompute)
        weights = SubnetWeights(hidden=torch.ones((), device=device, requires_grad=True))
        student.elastic_config = dataclasses.replace(elastic, mode=mode)
        pair.set_student(spec, weights)
        sync()
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        case: dict = {}
        try:
            for _ in range(args.warmup):
                step()
            times = []
            for _ in range(args.iters):
                sync()
                start = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - start)
            sec = statistics.median(times)
            case = {
                "step_ms": round(sec * 1e3, 1),
                "model_tflops": round(flops["model"] / sec / 1e12, 1),
                "hardware_tflops": round(flops["hardware"] / sec / 1e12, 1),
                "mfu_datasheet": round(flops["model"] / sec / 1e12 / H200_BF16_PEAK_TFLOPS, 4),
                "mfu_measured_matmul": (
                    round(flops["model"] / sec / 1e12 / result["matmul_tflops_measured"], 4)
                    if on_cuda
                    else None
                ),
                "model_flops": flops["model"],
                "times_ms": [round(t * 1e3, 1) for t in times],
            }
        except torch.cuda.OutOfMemoryError as exc:
            case = {"error": "out of memory", "message": str(exc).splitlines()[0][:400]}
        if on_cuda:
            case["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            case["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            torch.cuda.empty_cache()
        result["cases"][name] = case
        print(f"{name}: {json.dumps(case)}", flush=True)
    pair.inner.set_subnet(None)
    c = result["cases"]

    def ratio(a: str, b: str) -> float | None:
        if "step_ms" in c.get(a, {}) and "step_ms" in c.get(b, {}):
            return round(c[a]["step_ms"] / c[b]["step_ms"], 3)
        return None

    result["ratio_6B_slice_vs_full"] = ratio("6B/slice", "full/slice")
    result["ratio_6B_mask_vs_slice"] = ratio("6B/mask", "6B/slice")
    destroy_process_groups()
    return result


def eval_case(model, elastic, pgs, batch: dict, cfg: ModelConfig, args, device: str) -> dict:
    """``eval/full``: the trainer's evaluation step (megatron's schedule, ``forward_only``, no
    autograd) of the full budget with no router weights, i.e. megatron's own modules (the bypass
    of ``set_subnet``), beside the training state; its peak against :func:`plan_evaluation`."""
    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.planning import MemoryPlanConfig
    from megatron_elastic.planning.evaluation import plan_evaluation
    from megatron_elastic.training import forward_backward

    plan = plan_evaluation(
        MemoryPlanConfig(
            model=cfg,
            parallel=ParallelConfig(),
            seq_length=args.seq,
            micro_batch_size=1,
            num_micro_batches=1,
            recompute=args.recompute,
            profile="gpu-bf16" if device == "cuda" else "cpu-fp32",
        )
    )
    planned = max(plan.working_set.values())
    elastic.set_subnet(None)  # no spec: megatron's own forward
    case: dict = {
        "planned_working_set_bytes": int(planned),
        "planned_working_set_gib": round(planned / 2**30, 3),
    }
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    try:
        with torch.no_grad():
            loss = forward_backward(
                model,
                [batch],
                pgs,
                num_micro_batches=1,
                seq_length=args.seq,
                micro_batch_size=1,
                forward_only=True,
            )
        case["loss"] = round(float(loss), 4)
    except torch.cuda.OutOfMemoryError as exc:
        case.update(error="out of memory", message=str(exc).splitlines()[0][:400])
    if device == "cuda":
        measured = torch.cuda.max_memory_allocated() - resident
        case.update(
            resident_gib=round(resident / 2**30, 2),
            peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
            measured_working_set_gib=round(measured / 2**30, 3),
            measured_over_planned=round(measured / planned, 3),
        )
        torch.cuda.empty_cache()
    return case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", default="M-M*-M*-", help="layer pattern at 12B widths")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=None, help="default: the 12B's 131072")
    parser.add_argument("--cases", default="full/slice,6B/slice,6B/mask,eval/full")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument(
        "--no-recompute", dest="recompute", action="store_false", help="store all activations"
    )
    parser.add_argument("--output", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_gpu_step: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr
        )
        return 2
    result = run(args)
    text = json.dumps(result, indent=1)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
