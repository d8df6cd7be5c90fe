#!/usr/bin/env python
"""Elastic training step vs a plain megatron training step of the parent, one process, CPU.

Both steps run the same micro-batches through megatron's schedule, DDP and optimizer:

* plain: the parent, cross entropy, forward + backward + optimizer step;
* elastic: per micro-batch a budget drawn with the stage's probabilities, the router's sub-network
  (hard Gumbel sample), the frozen teacher's forward, the student's forward/backward in slice mode,
  KD loss + budget loss, router gradient reduction and both optimizer steps.

The parent is the benchmark parent of ``bench_elastic_step.py`` (the tiny recipe scaled so that
matmuls dominate); the routers are first trained on the budget loss alone so each budget runs its
own architecture, as after the first steps of a real stage. Steps are timed in interleaved
(plain, elastic) pairs after a warm-up; the ratio is the median of per-pair ratios. The last
printed line is ``stage2 elastic/plain step ratio: <float>`` (target <= 1.3).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_elastic_step import parent_config

from megatron_elastic.config import ParallelConfig
from megatron_elastic.distill.pair import DistillationPair
from megatron_elastic.elastic import ElasticConfig, build_elastic_model
from megatron_elastic.elastic.budget import subnet_param_count
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.parallel import destroy_process_groups, init_process_groups
from megatron_elastic.router import (
    ElasticRouter,
    RouterConfig,
    build_router_optimizer,
    finalize_router_grads,
    fit_to_budgets,
)
from megatron_elastic.training import BudgetSampler, forward_backward
from megatron_elastic.training.lm_step import distill_forward
from megatron_elastic.training.optim import OptimConfig, build_optimizer, wrap_ddp

TARGET = 1.3
BUDGETS = {"full": 1.0, "75%": 0.75, "50%": 0.5}
MIXES = {
    "stage1": {"full": 1 / 3, "75%": 1 / 3, "50%": 1 / 3},
    "stage2": {"full": 0.5, "75%": 0.3, "50%": 0.2},
}


def elastic_config() -> ElasticConfig:
    return ElasticConfig(
        budgets=BUDGETS,
        hidden_choices=(384, 448, 512),
        attention_head_choices=(4, 6, 8),
        mamba_head_choices=(8, 12, 16),
        mamba_head_dim_choices=(32, 48, 64),
        ffn_choices=(1024, 1536, 2048),
        depth_choices=(8, 9, 10),
        ffn_nesting_blocks=2,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=8, help="timed step pairs per mix")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=256)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    cfg, elastic = parent_config(), elastic_config()
    pgs = init_process_groups(ParallelConfig(), seed=0)
    optim = OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=0, total_steps=10_000)
    plain = build_hybrid_model(cfg, pgs)
    plain_ddp = wrap_ddp(plain, pgs, optim)
    plain_opt, _ = build_optimizer(plain_ddp, optim)
    student = build_elastic_model(cfg, elastic, pgs)
    student.load_state_dict(plain.state_dict())
    teacher = build_hybrid_model(cfg, pgs)
    teacher.load_state_dict(plain.state_dict())
    student_ddp = wrap_ddp(student, pgs, optim)
    student_opt, _ = build_optimizer(student_ddp, optim)
    pair = DistillationPair(student_ddp, teacher, temperature=1.0, ce_weight=0.0, tp_group=pgs.tp)
    rcfg = RouterConfig(anneal_steps=400, lr=1e-3)
    router = ElasticRouter(cfg, elastic, rcfg)
    fit_to_budgets(router, 400)
    router_opt, _ = build_router_optimizer(router, rcfg)

    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.micro_batches):
        tokens = torch.randint(
            0, cfg.vocab_size, (args.micro_batch_size, args.seq_length + 1), generator=g
        )
        batches.append(
            {
                "tokens": tokens[:, :-1],
                "labels": tokens[:, 1:],
                "loss_mask": torch.ones(args.micro_batch_size, args.seq_length),
            }
        )
    common = dict(
        num_micro_batches=args.micro_batches,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
    )

    def plain_step() -> None:
        plain_ddp.zero_grad_buffer()
        plain_opt.zero_grad()
        forward_backward(plain_ddp, batches, pgs, **common)
        plain_opt.step()

    def elastic_step(sampler: BudgetSampler, step: int) -> None:
        student_ddp.zero_grad_buffer()
        student_opt.zero_grad()
        router_opt.zero_grad()

        def hook(i: int) -> torch.Tensor:
            d = router.decide(sampler.sample(step, i), 400, rcfg.generator(400 + step, i))
            pair.set_student(d.spec, d.weights)
            return router.budget_loss(d)

        forward_backward(
            pair,
            batches,
            pgs,
            micro_batch_hook=hook,
            model_forward=distill_forward,
            p2p_batch_factor=2,
            **common,
        )
        finalize_router_grads(router, pgs)
        student_opt.step()
        router_opt.step()

    print(
        f"parent {sum(p.numel() for p in plain.parameters()):,} params; step = "
        f"{args.micro_batches} micro-batches x {args.micro_batch_size} x {args.seq_length} tokens"
    )
    for name in BUDGETS:
        spec = router.decide(name, 0, None, deterministic=True).spec
        active, params = sum(c.active for c in spec.layers), subnet_param_count(cfg, spec)
        print(
            f"  router at {name}: hidden {spec.hidden}, {active} layers, {params:,} params "
            f"({router.target_ratio(name):.3f} of its target)"
        )
    print(f"{'mix':>8} {'plain ms':>10} {'elastic ms':>11} {'elastic/plain':>14}")
    ratios = {}
    for mix, probs in MIXES.items():
        sampler = BudgetSampler(probs, BUDGETS, seed=3)
        for i in range(args.warmup):
            plain_step()
            elastic_step(sampler, i)
        plain_ms, elastic_ms, pair_ratios = [], [], []
        for i in range(args.iters):
            order = (0, 1) if i % 2 == 0 else (1, 0)
            times = [0.0, 0.0]
            for which in order:
                t0 = time.perf_counter()
                plain_step() if which == 0 else elastic_step(sampler, 100 + i)
                times[which] = time.perf_counter() - t0
            plain_ms.append(times[0] * 1e3)
            elastic_ms.append(times[1] * 1e3)
            pair_ratios.append(times[1] / times[0])
        ratios[mix] = statistics.median(pair_ratios)
        print(
            f"{mix:>8} {statistics.median(plain_ms):>10.1f} {statistics.median(elastic_ms):>11.1f}"
            f" {ratios[mix]:>14.3f}"
        )
    destroy_process_groups()
    verdict = "meets" if ratios["stage2"] <= TARGET else "MISSES"
    print(f"stage2 target <= {TARGET}: {verdict}")
    print(f"stage2 elastic/plain step ratio: {ratios['stage2']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
