"""torchrun worker for the TP/PP equivalence test (see test_tp_pp_equivalence.py).

With ``--init`` (single process) it builds the model from a seed, saves its full weights and a
fixed set of micro-batches; otherwise it loads and shards those weights. Every run does one
forward/backward through megatron's schedule and saves the loss and the TP-gathered gradients,
keyed by global parameter names, one file per pipeline stage.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from megatron_elastic.config import ModelConfig, ParallelConfig, config_from_dict
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.model.sharding import gather_full_tensors, load_full_state_dict
from megatron_elastic.parallel import destroy_process_groups, init_process_groups
from megatron_elastic.training import forward_backward

MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ = 3, 2, 40


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--init", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir)
    cfg = config_from_dict(ModelConfig, yaml.safe_load(Path(args.model).read_text()))
    parallel = ParallelConfig(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp)
    pgs = init_process_groups(parallel, seed=7)
    model = build_hybrid_model(cfg, pgs, parallel)

    if args.init:
        g = torch.Generator().manual_seed(11)
        batches = []
        for _ in range(MICRO_BATCHES):
            tokens = torch.randint(0, cfg.vocab_size, (MICRO_BATCH_SIZE, SEQ + 1), generator=g)
            mask = (torch.rand(MICRO_BATCH_SIZE, SEQ, generator=g) > 0.2).float()
            batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask})
        full = {k: v.detach().clone() for k, v in model.state_dict().items() if v is not None}
        torch.save({"weights": full, "batches": batches}, work / "init.pt")
    init = torch.load(work / "init.pt")
    load_full_state_dict(model, init["weights"], pgs)

    loss = forward_backward(
        model,
        init["batches"],
        pgs,
        num_micro_batches=MICRO_BATCHES,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH_SIZE,
    )
    grads = gather_full_tensors(model, {n: p.grad for n, p in model.named_parameters()}, pgs)
    if pgs.tp.rank() == 0:
        out = work / f"tp{args.tp}_pp{args.pp}"
        out.mkdir(exist_ok=True)
        torch.save({"loss": loss, "grads": grads}, out / f"stage{pgs.pp.rank()}.pt")
    destroy_process_groups()


if __name__ == "__main__":
    main()
