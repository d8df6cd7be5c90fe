"""torchrun worker for the sequence/context-parallel equivalence tests
(test_sequence_context_parallel.py).

One launch runs every case on one parallel layout: the parent, a homogeneous budget with a
skipped layer and heterogeneous budgets, each in slice and mask mode (sub-networks carry
router-like weights: leaf tensors on the hidden channels, on every layer's heads/channels/neurons
and on the depth gates), with and without activation recomputation. Every case is one
forward/backward through megatron's schedule on the model wrapped in megatron's DDP, then
``finalize_model_grads`` (DP x CP averaging, SP norm-grad all-reduce) and the router's gradient
reduction, exactly as the trainer does.

Data-parallel replicas see different micro-batches: replica ``r`` of ``DP`` takes micro-batches
``r, r + DP, ...`` of the saved ones (as the trainer's ``micro_batches`` deals samples), so one
process that runs them all is the reference, and a gradient that is not averaged over the replicas
differs from it. The loss each replica returns is reduced over data parallelism as the trainer
logs it (token-weighted).

Every rank saves its own results (``rank{N}.pt`` with its TP/PP/CP/DP coordinates): the loss on
the last stage, its stage's TP-gathered model gradients keyed by global names and the router
weights' gradients, so the tests check every rank.

With ``--init`` (one process) it first builds the model from a seed and saves its full weights
and the micro-batches, which every layout then loads and shards.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from torch import nn
from tp_pp_worker import elastic_spec  # (torchrun puts this directory on sys.path)
from worker_data import random_batches, replica_mean_loss

from megatron_elastic.config import ModelConfig, ParallelConfig, config_from_dict
from megatron_elastic.elastic import ElasticConfig, SubnetSpec, build_elastic_model
from megatron_elastic.elastic.model import SubnetWeights
from megatron_elastic.model.attention import causal_attention, load_balanced_positions
from megatron_elastic.model.sharding import gather_full_tensors, load_full_state_dict
from megatron_elastic.parallel import destroy_process_groups, init_process_groups
from megatron_elastic.router import finalize_router_grads
from megatron_elastic.training import forward_backward
from megatron_elastic.training.optim import OptimConfig, wrap_ddp

# MICRO_BATCHES in all, dealt over the DP replicas (DP 2 at most: 2 each); SEQ: a multiple of
# 2 x CP x TP = 8
MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ = 4, 2, 48
ELASTIC = ElasticConfig(budgets={"full": 1.0, "small": 0.5}, ffn_nesting_blocks=2)


def specs(cfg: ModelConfig, cp: int) -> dict[str, SubnetSpec]:
    """The sub-networks of the tests (hybrid_small.yaml, pattern M-*M-*): tp_pp_worker's
    heterogeneous spec (every axis per layer, a skipped layer), the same with all 4 Mamba heads
    (its 2-head layer is 1 head per TP rank at TP 2, which CP 2 cannot split: that one runs
    without CP only), and a homogeneous budget with a skipped layer."""
    heads = elastic_spec(cfg)
    full_mamba_heads = SubnetSpec(
        heads.hidden,
        tuple(
            c.with_size("mamba_heads", cfg.mamba_num_heads) if c.kind == "mamba" else c
            for c in heads.layers
        ),
    )
    out = {
        "homogeneous": SubnetSpec.homogeneous(
            cfg, hidden=48, attention_heads=2, mamba_heads=4, mamba_head_dim=12, ffn=64, depth=5
        ),
        "heterogeneous": full_mamba_heads,
    }
    if cp == 1:
        out["heterogeneous_heads"] = heads
    return out


class RouterWeights(nn.Module):
    """Leaf weights standing in for a router's outputs (values near 1), seeded per case."""

    def __init__(self, spec: SubnetSpec, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def leaf(n: int | None) -> nn.Parameter:
            shape = () if n is None else (n,)
            return nn.Parameter(1 + 0.1 * torch.randn(shape, generator=g))

        self.hidden = leaf(spec.hidden)
        self.layers = nn.ParameterList()
        self.gates = nn.ParameterList()
        for c in spec.layers:
            self.layers.append(leaf(c.width * c.head_dim if c.kind == "mamba" else c.width))
            self.gates.append(leaf(None))
        self.active = [c.active for c in spec.layers]

    def weights(self) -> SubnetWeights:
        """Non-leaf views of the leaves, as a router's outputs are."""
        on = self.active
        return SubnetWeights(
            hidden=self.hidden * 1,
            layers=tuple(p * 1 if a else None for p, a in zip(self.layers, on, strict=True)),
            gates=tuple(p * 1 if a else None for p, a in zip(self.gates, on, strict=True)),
        )


def attention_check(cp_group) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The CPU context-parallel attention against full causal attention: outputs and q/k/v
    gradients of this rank's load-balanced tokens, each as (context-parallel, full)."""
    g = torch.Generator().manual_seed(5)
    length, b, heads, groups, d = 16 * cp_group.size(), 2, 4, 2, 8
    q = torch.randn(length, b, heads, d, generator=g, requires_grad=True)
    k = torch.randn(length, b, groups, d, generator=g, requires_grad=True)
    v = torch.randn(length, b, groups, d, generator=g, requires_grad=True)
    grad_out = torch.randn(length, b, heads * d, generator=g)
    full = causal_attention(q, k, v)
    full.backward(grad_out)
    cp = cp_group.size()
    pos = load_balanced_positions(length // cp, cp, cp_group.rank(), "cpu")
    local = [t.detach()[pos].clone().requires_grad_(True) for t in (q, k, v)]
    out = causal_attention(*local, cp_group)
    out.backward(grad_out[pos])
    pairs = {"out": (out.detach(), full.detach()[pos])}
    for name, t, ref in zip("qkv", local, (q, k, v), strict=True):
        pairs[f"grad_{name}"] = (t.grad, ref.grad[pos])
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--init", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir)
    cfg = config_from_dict(ModelConfig, yaml.safe_load(Path(args.model).read_text()))
    parallel = ParallelConfig(
        tensor_parallel_size=args.tp,
        pipeline_parallel_size=args.pp,
        context_parallel_size=args.cp,
        sequence_parallel=args.sp,
    )
    parallel.check_sequence_length(SEQ)
    pgs = init_process_groups(parallel, seed=7)
    dp = pgs.dp.size()
    tag = f"tp{args.tp}_pp{args.pp}_cp{args.cp}" + ("_sp" if args.sp else "")
    tag += f"_dp{dp}" if dp > 1 else ""
    results = {}
    for recompute in (False, True):
        model = build_elastic_model(cfg, ELASTIC, pgs, parallel, recompute=recompute)
        if args.init and not recompute:
            batches = random_batches(
                cfg.vocab_size,
                seed=11,
                count=MICRO_BATCHES,
                micro_batch_size=MICRO_BATCH_SIZE,
                seq=SEQ,
            )
            full = {k: v.detach().clone() for k, v in model.state_dict().items() if v is not None}
            torch.save({"weights": full, "batches": batches}, work / "init.pt")
        init = torch.load(work / "init.pt")
        batches = init["batches"][pgs.dp.rank() :: dp]  # this replica's micro-batches
        tokens = sum(b["loss_mask"].sum() for b in batches)
        load_full_state_dict(model, init["weights"], pgs)
        ddp = wrap_ddp(model, pgs, OptimConfig())
        cases = {"parent": None, **specs(cfg, args.cp)}
        for seed, (name, spec) in enumerate(cases.items()):
            for mode in ("slice", "mask") if spec is not None else ("parent",):
                router = None if spec is None else RouterWeights(spec, seed)
                ddp.zero_grad_buffer()

                def hook(i: int, model=model, spec=spec, router=router, mode=mode) -> None:
                    # like the trainer: the sub-network (and fresh router outputs) per micro-batch
                    if spec is not None:
                        model.set_subnet(spec, router.weights(), mode=mode)

                loss = forward_backward(
                    ddp,
                    batches,
                    pgs,
                    num_micro_batches=len(batches),
                    seq_length=SEQ,
                    micro_batch_size=MICRO_BATCH_SIZE,
                    micro_batch_hook=hook,
                )
                finalize_model_grads([ddp], pg_collection=pgs)
                if loss is not None and dp > 1:  # the replicas' token-weighted mean, as logged
                    loss = replica_mean_loss(loss, tokens, pgs.dp)
                router_grads = None
                if router is not None:
                    finalize_router_grads(router, pgs)
                    router_grads = {
                        n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                        for n, p in router.named_parameters()
                    }
                local = {n: p.main_grad.clone() for n, p in model.named_parameters()}
                results[(name, mode, recompute)] = {
                    "loss": loss,
                    "grads": gather_full_tensors(model, local, pgs),
                    "router_grads": router_grads,
                }
                model.set_subnet(None)
    if args.cp > 1:
        results["attention"] = attention_check(pgs.cp)
    results["coords"] = {g: getattr(pgs, g).rank() for g in ("tp", "pp", "cp", "dp")}
    out = work / tag
    out.mkdir(exist_ok=True)
    torch.save(results, out / f"rank{dist.get_rank()}.pt")
    destroy_process_groups()


if __name__ == "__main__":
    main()
