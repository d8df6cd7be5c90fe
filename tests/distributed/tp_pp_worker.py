"""torchrun worker for the TP/PP equivalence test (see test_tp_pp_equivalence.py).

With ``--elastic MODE`` the model is the elastic parent running a heterogeneous sub-network
(:func:`elastic_spec`) in ``slice`` or ``mask`` mode. With ``--init`` (single process) it
builds the model from a seed, saves its full weights and a fixed set of micro-batches;
otherwise it loads and shards those weights. Every run does one
forward/backward through megatron's schedule, and every rank saves its own results
(``rank{N}.pt``, with its TP/PP coordinates): the loss (last stage), its stage's TP-gathered
gradients keyed by global parameter names, the importance ranking, the router's decisions and
gradients. (Every layout here is TP x PP = world size: no data parallelism; that is
sp_cp_worker.py's CP x DP layout.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from worker_data import random_batches

from megatron_elastic.config import ModelConfig, ParallelConfig, config_from_dict
from megatron_elastic.elastic import ElasticConfig, SubnetSpec, build_elastic_model
from megatron_elastic.importance.estimate import estimate_importance, rank_model
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.model.sharding import gather_full_tensors, load_full_state_dict
from megatron_elastic.parallel import destroy_process_groups, init_process_groups
from megatron_elastic.router import ElasticRouter, RouterConfig, finalize_router_grads
from megatron_elastic.training import forward_backward

MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ = 3, 2, 40
ELASTIC = ElasticConfig(budgets={"full": 1.0, "small": 0.5}, ffn_nesting_blocks=2)
ROUTED = ElasticConfig(
    budgets={"full": 1.0, "half": 0.5},
    hidden_choices=(40, 52),
    attention_head_choices=(2,),
    mamba_head_choices=(2,),
    mamba_head_dim_choices=(8, 12),
    ffn_choices=(32, 96),
    depth_choices=(5,),
    heterogeneous=True,
    ffn_nesting_blocks=2,
)


def elastic_spec(cfg: ModelConfig) -> SubnetSpec:
    """Per-layer widths differ, one MLP layer is skipped, hidden is cut: every axis is exercised
    (for tests/fixtures/hybrid_small.yaml, pattern M-*M-*)."""
    return SubnetSpec.heterogeneous(
        cfg,
        hidden=52,
        attention_heads=[4, 4, 2, 4, 4, 4],
        mamba_heads=[2, 4, 4, 4, 4, 4],
        mamba_head_dim=[16, 16, 16, 11, 16, 16],
        ffn=[128, 64, 128, 128, 96, 128],
        active=[True, True, True, True, False, True],
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--init", action="store_true")
    parser.add_argument("--elastic", choices=["slice", "mask"], default=None)
    parser.add_argument("--importance", action="store_true", help="rank the parent first")
    parser.add_argument("--router", action="store_true", help="a router picks each sub-network")
    parser.add_argument("--layout", type=int, nargs="+", help="layers per pipeline stage")
    args = parser.parse_args()
    work = Path(args.workdir)
    cfg = config_from_dict(ModelConfig, yaml.safe_load(Path(args.model).read_text()))
    parallel = ParallelConfig(
        tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, pipeline_layout=args.layout
    )
    pgs = init_process_groups(parallel, seed=7)
    if args.router:
        model = build_elastic_model(cfg, ROUTED, pgs, parallel)
    elif args.elastic or args.importance:
        model = build_elastic_model(cfg, ELASTIC, pgs, parallel)
    else:
        model = build_hybrid_model(cfg, pgs, parallel)

    if args.init:
        batches = random_batches(
            cfg.vocab_size, seed=11, count=MICRO_BATCHES, micro_batch_size=MICRO_BATCH_SIZE, seq=SEQ
        )
        full = {k: v.detach().clone() for k, v in model.state_dict().items() if v is not None}
        torch.save({"weights": full, "batches": batches}, work / "init.pt")
    init = torch.load(work / "init.pt")
    load_full_state_dict(model, init["weights"], pgs)
    ranking = None
    if args.importance:  # rank on the training batches, then train the ranked parent
        ranking = estimate_importance(model, init["batches"], pgs)
        rank_model(model, ranking, pgs)
    if args.elastic:
        model.set_subnet(elastic_spec(cfg), mode=args.elastic)

    router, decisions, hook = None, [], None
    if args.router:  # a budget per micro-batch; the router decides on every rank identically
        rcfg = RouterConfig(anneal_steps=100, seed=3)
        router = ElasticRouter(cfg, ROUTED, rcfg)
        budgets = ["full", "half", 0.75]

        def hook(i: int) -> torch.Tensor:
            d = router.decide(budgets[i], 10, rcfg.generator(10, i))
            model.set_subnet(d.spec, d.weights)
            decisions.append(d.indices)
            return router.budget_loss(d)

    loss = forward_backward(
        model,
        init["batches"],
        pgs,
        num_micro_batches=MICRO_BATCHES,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH_SIZE,
        micro_batch_hook=hook,
    )
    router_grads = None
    if router is not None:
        finalize_router_grads(router, pgs)
        router_grads = {n: p.grad.clone() for n, p in router.named_parameters()}
    local = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads = gather_full_tensors(model, local, pgs)
    tag = f"_{args.elastic}" if args.elastic else ("_router" if args.router else "")
    if args.layout:
        tag += "_layout" + "-".join(map(str, args.layout))
    out = work / (f"tp{args.tp}_pp{args.pp}" + tag + ("_ranked" if args.importance else ""))
    out.mkdir(exist_ok=True)
    torch.save(
        {
            "coords": {"tp": pgs.tp.rank(), "pp": pgs.pp.rank()},
            "loss": loss,
            "grads": grads,
            "ranking": ranking and ranking.to_json(),
            "router_grads": router_grads,
            "decisions": decisions,
        },
        out / f"rank{dist.get_rank()}.pt",
    )
    destroy_process_groups()


if __name__ == "__main__":
    main()
