"""torchrun worker for the distributed-optimizer test (test_distributed_optimizer.py).

On DP 2 (``--pp 2``: DP 2 x PP 2, 4 ranks) it trains the parent a few optimizer steps once per
optimizer variant, each from the same weights on the same micro-batches, with the trainer's
calls: megatron's DDP and optimizer from :mod:`megatron_elastic.training.optim`, megatron's
schedule (:func:`forward_backward`; under PP 1F1B, which runs the ``no_sync_func`` /
``grad_sync_func`` hooks :func:`wrap_ddp` sets), ``finalize_model_grads``, ``optimizer.step()``;
then :func:`sync_params`, as the trainer does before a checkpoint. The variants:

- ``plain``: megatron's plain optimizer, gradients all-reduced after the backward;
- ``distributed``: the distributed optimizer (gradients reduce-scattered, parameters all-gathered);
- ``overlap``: the distributed optimizer with ``overlap_grad_reduce`` and
  ``overlap_param_gather``, in small buckets so that several reductions and gathers overlap.

Every rank saves ``rank{N}.pt``: per variant, the loss (last stage) and gradient norm of every
step and its stage's parameters after the last one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from worker_data import random_batches

from megatron_elastic.config import ModelConfig, ParallelConfig, config_from_dict
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.parallel import destroy_process_groups, init_process_groups
from megatron_elastic.training import forward_backward
from megatron_elastic.training.optim import OptimConfig, build_optimizer, sync_params, wrap_ddp

STEPS, MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ = 3, 3, 2, 32
BUCKET = 10_000  # parameters per bucket: a stage of hybrid_small.yaml makes several
VARIANTS = {
    "plain": {},
    "distributed": {"use_distributed_optimizer": True},
    "overlap": {
        "use_distributed_optimizer": True,
        "overlap_grad_reduce": True,
        "overlap_param_gather": True,
        "ddp_bucket_size": BUCKET,
    },
}


def batches(cfg: ModelConfig, step: int, rank: int) -> list[dict[str, torch.Tensor]]:
    """This replica's micro-batches of ``step`` (distinct per replica)."""
    return random_batches(
        cfg.vocab_size,
        seed=1000 * step + rank,
        count=MICRO_BATCHES,
        micro_batch_size=MICRO_BATCH_SIZE,
        seq=SEQ,
    )


def train(cfg: ModelConfig, pgs, parallel: ParallelConfig, optim: OptimConfig, init) -> dict:
    model = build_hybrid_model(cfg, pgs, parallel)
    missing, unexpected = model.load_state_dict(init, strict=False)  # (None: TE extra state)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
    ddp = wrap_ddp(model, pgs, optim)
    optimizer, scheduler = build_optimizer(ddp, optim)
    losses, norms, launched, deferred = [], [], [], []
    for step in range(1, STEPS + 1):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = forward_backward(
            ddp,
            batches(cfg, step, pgs.dp.rank()),
            pgs,
            num_micro_batches=MICRO_BATCHES,
            seq_length=SEQ,
            micro_batch_size=MICRO_BATCH_SIZE,
        )
        # overlap_grad_reduce: every bucket's reduction was started in the backward (after the
        # first step, which records the buckets' gradient counts, as megatron does)
        launched.append(all(g.grad_reduce_handle is not None for g in ddp.bucket_groups))
        finalize_model_grads([ddp], pg_collection=pgs)
        ok, norm, _ = optimizer.step()
        assert ok
        # overlap_param_gather: the step left the all-gather to the next forward
        deferred.append(not any(g.param_gather_dispatched for g in ddp.bucket_groups))
        scheduler.step(increment=1)
        losses.append(torch.zeros(()) if loss is None else loss.detach().clone())
        norms.append(float(norm))
    sync_params(ddp)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {
        "losses": torch.stack(losses),
        "grad_norms": norms,
        "params": params,
        "buckets": len(ddp.bucket_groups),
        "launched_in_backward": launched,
        "gather_deferred": deferred,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()
    work = Path(args.workdir)
    cfg = config_from_dict(ModelConfig, yaml.safe_load(Path(args.model).read_text()))
    parallel = ParallelConfig(pipeline_parallel_size=args.pp)
    pgs = init_process_groups(parallel, seed=7)
    assert pgs.dp.size() == 2, f"run on {2 * args.pp} ranks"
    # The replicas of a stage draw the same weights from the same seeds (as in the trainer);
    # every variant starts from them.
    init = build_hybrid_model(cfg, pgs, parallel).state_dict()
    init = {k: v.clone() for k, v in init.items() if v is not None}
    results = {"coords": {"pp": pgs.pp.rank(), "dp": pgs.dp.rank()}}
    for name, fields in VARIANTS.items():
        optim = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0, total_steps=STEPS, **fields)
        results[name] = train(cfg, pgs, parallel, optim, init)
    torch.save(results, work / f"rank{dist.get_rank()}.pt")
    destroy_process_groups()


if __name__ == "__main__":
    main()
