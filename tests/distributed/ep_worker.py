"""torchrun worker for the expert-parallel equivalence test (test_expert_parallel.py).

One launch runs every case on one layout of tests/fixtures/hybrid_moe_small.yaml (pattern ME*E,
8 routed experts, top-2, a shared expert, expert bias): the parent, the full budget and a
sub-budget with fewer experts (4 of 8, narrower experts and shared expert, a narrower hidden
width), in slice and mask mode, each sub-network carrying router-like weights (leaf tensors: one
per kept routed-expert neuron and shared neuron of every E layer, and on the hidden channels),
with ``ElasticConfig.moe_expert_nesting_blocks`` 2 (kept experts 0, 1 on EP rank 0 and 4, 5 on
EP rank 1) and ``ffn_nesting_blocks`` 4 (each TP rank holds 2 blocks of every expert's and of the
shared expert's neurons and keeps a prefix of each: not one contiguous run). Every case is one
forward/backward through megatron's schedule on the model wrapped in megatron's DDP, then
``finalize_model_grads`` (dense gradients averaged over data parallelism, expert gradients over
expert-data parallelism with megatron's expert scaling, sequence-parallel gradients summed over
TP) and the router's gradient reduction, as the trainer does.

EP ranks are data-parallel replicas for the dense layers: replica ``r`` of ``DP`` takes
micro-batches ``r, r + DP, ...``, so one process that runs them all is the reference (as in
sp_cp_worker.py). The loss is the replicas' token-weighted mean.

One launch runs each ``--layouts`` entry in turn (``EPxTP``: process groups re-initialised,
the model rebuilt), so a world size costs one torchrun start. Under tensor parallelism sequence
parallelism is on (megatron's MoE layer trains only so), and expert TP is megatron's default, TP.

Every rank saves its results (``EPxTP/rank{N}.pt``): the loss, the gradients of the parameters it
holds under the parent's names, TP-gathered (its own experts only: ``local_experts.{i}`` of EP
rank ``r`` is the parent's expert ``r x 8/EP + i``), the router weights' gradients and its
coordinates. With ``--init`` (one process) it first builds the model, draws decisive weights and
saves them with the micro-batches; every layout loads them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from torch import nn
from worker_data import random_batches, replica_mean_loss

from megatron_elastic.config import ModelConfig, ParallelConfig, config_from_dict
from megatron_elastic.elastic import ElasticConfig, SubnetSpec, SubnetWeights, build_elastic_model
from megatron_elastic.model.sharding import gather_full_tensors, load_full_state_dict
from megatron_elastic.parallel import destroy_process_groups, init_process_groups
from megatron_elastic.router import finalize_router_grads
from megatron_elastic.training import forward_backward
from megatron_elastic.training.optim import OptimConfig, build_optimizer, wrap_ddp

MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ = 4, 2, 24
ELASTIC = ElasticConfig(
    budgets={"full": 1.0, "small": 0.5}, moe_expert_nesting_blocks=2, ffn_nesting_blocks=4
)
MOE = ("moe_experts", "moe_expert_ffn", "moe_shared_ffn")


def specs(cfg: ModelConfig) -> dict[str, SubnetSpec]:
    """The full budget and a sub-budget with 4 of 8 experts (2 per EP rank), narrower experts,
    shared expert and hidden width."""
    return {
        "full": SubnetSpec.homogeneous(cfg),
        "fewer_experts": SubnetSpec.homogeneous(
            cfg, hidden=24, moe_experts=4, moe_expert_ffn=12, moe_shared_ffn=16
        ),
    }


class RouterWeights(nn.Module):
    """Leaf weights standing in for a router's outputs (values near 1), seeded per case: the
    hidden channels', and every E layer's per routed-expert neuron then per shared neuron."""

    def __init__(self, spec: SubnetSpec, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def leaf(n: int) -> nn.Parameter:
            return nn.Parameter(1 + 0.1 * torch.randn(n, generator=g))

        self.hidden = leaf(spec.hidden)
        self.layers = nn.ParameterDict()
        for j, c in enumerate(spec.layers):
            if c.kind == "moe":
                e, f, s = (c.size(a) for a in MOE)
                self.layers[str(j)] = leaf(e * f + s)
        self.count = len(spec.layers)

    def weights(self) -> SubnetWeights:
        """Non-leaf views of the leaves, as a router's outputs are."""
        layers = tuple(
            self.layers[str(j)] * 1 if str(j) in self.layers else None for j in range(self.count)
        )
        return SubnetWeights(hidden=self.hidden * 1, layers=layers)


def randomise(model: nn.Module) -> None:
    """Decisive routing and experts that matter (megatron's init leaves the MoE output small)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router.weight" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "experts" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def optimizer_step(model, ddp, batches, pgs) -> dict:
    """One step of the trainer's optimizer (megatron's Adam, a dense and an expert parameter
    group, gradient clipping at a norm the gradients exceed) on the sub-budget's gradients: the
    gradient norm it reports (summed over the EP ranks' experts) and the updated weights."""
    spec = specs(model.model_config)["fewer_experts"]
    optim = OptimConfig(lr=1e-2, warmup_steps=0, clip_grad=0.05)
    optimizer, scheduler = build_optimizer(ddp, optim)
    scheduler.step(1)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward(
        ddp,
        batches,
        pgs,
        num_micro_batches=len(batches),
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH_SIZE,
        micro_batch_hook=lambda i: model.set_subnet(spec, mode="slice"),
    )
    finalize_model_grads([ddp], pg_collection=pgs)
    ok, norm, _ = optimizer.step()
    assert ok
    model.set_subnet(None)
    local = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"grad_norm": torch.tensor(norm), "weights": gather_full_tensors(model, local, pgs)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--layouts", nargs="+", default=["1x1"], help="EPxTP, run in turn")
    parser.add_argument("--init", action="store_true")
    args = parser.parse_args()
    cfg = config_from_dict(ModelConfig, yaml.safe_load(Path(args.model).read_text()))
    for layout in args.layouts:
        ep, tp = (int(n) for n in layout.split("x"))
        run_layout(cfg, Path(args.workdir), ep, tp, args.init)
    destroy_process_groups()


def run_layout(cfg: ModelConfig, work: Path, ep: int, tp: int, init_weights: bool) -> None:
    """Every case on one layout (EP x TP, the rest data parallel)."""
    parallel = ParallelConfig(
        tensor_parallel_size=tp, expert_model_parallel_size=ep, sequence_parallel=tp > 1
    )
    pgs = init_process_groups(parallel, seed=7)
    dp = pgs.dp.size()
    model = build_elastic_model(cfg, ELASTIC, pgs, parallel)
    if init_weights:
        randomise(model)
        batches = random_batches(
            cfg.vocab_size, seed=11, count=MICRO_BATCHES, micro_batch_size=MICRO_BATCH_SIZE, seq=SEQ
        )
        full = {k: v.detach().clone() for k, v in model.state_dict().items() if v is not None}
        torch.save({"weights": full, "batches": batches}, work / "init.pt")
    init = torch.load(work / "init.pt")
    batches = init["batches"][pgs.dp.rank() :: dp]  # this replica's micro-batches
    tokens = sum(b["loss_mask"].sum() for b in batches)
    load_full_state_dict(model, init["weights"], pgs)
    for name, buf in model.named_buffers():  # the routers' expert bias (replicated)
        if name.endswith("expert_bias"):
            buf.copy_(init["weights"][name])
    ddp = wrap_ddp(model, pgs, OptimConfig())
    results = {}
    cases = {"parent": None, **specs(cfg)}
    for seed, (name, spec) in enumerate(cases.items()):
        for mode in ("slice", "mask") if spec is not None else ("parent",):
            router = None if spec is None else RouterWeights(spec, seed)
            ddp.zero_grad_buffer()

            def hook(i: int, spec=spec, router=router, mode=mode) -> None:
                if spec is not None:  # like the trainer: fresh router outputs per micro-batch
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
            if dp > 1:  # the replicas' token-weighted mean, as logged
                loss = replica_mean_loss(loss, tokens, pgs.dp)
            router_grads = None
            if router is not None:
                finalize_router_grads(router, pgs)
                router_grads = {n: p.grad.clone() for n, p in router.named_parameters()}
            local = {n: p.main_grad.clone() for n, p in model.named_parameters()}
            results[(name, mode)] = {
                "loss": loss,
                "grads": gather_full_tensors(model, local, pgs),
                "router_grads": router_grads,
            }
            model.set_subnet(None)
    results["step"] = optimizer_step(model, ddp, batches, pgs)
    results["coords"] = {
        "ep": pgs.ep.size(),
        "ep_rank": pgs.ep.rank(),
        "tp": pgs.tp.size(),
        "tp_rank": pgs.tp.rank(),
        "dp": dp,
        "sequence_parallel": model.config.sequence_parallel,
    }
    results["dispatcher"] = type(model.decoder.layers[1].mlp.token_dispatcher).__name__
    out = work / f"{ep}x{tp}"
    out.mkdir(exist_ok=True)
    torch.save(results, out / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main()
