"""The mixture-of-experts parent (issue 26 step 1): ``E`` layers are megatron-core's ``MoELayer``
and compute what a reference written here from the raw weights computes; parameter counts (total
and active); config validation; the elastic side refuses what MoE parents cannot run yet.

The reference (:func:`reference_moe_layer`) reads only the layer's tensors (norm weight, router
gate, expert bias, each expert's fc1/fc2, the shared expert) and the config, in float64.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_elastic.config import ModelConfig, load_model_config
from megatron_elastic.elastic import ElasticConfig
from megatron_elastic.elastic.axes import layer_kind
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.model.param_count import count_active_parameters, count_parameters
from megatron_elastic.training.lm_step import position_ids_like

MOE_YAML = Path(__file__).parents[2] / "tests" / "fixtures" / "hybrid_moe_small.yaml"
REL_TOL = 1.5e-6
"""On the layer's MoE output (its output minus the residual), relative to its max: a float32
layer against a float64 reference. Measured worst 5.6e-7 over 6 weight draws x 4 routers."""
GPU_REL_TOL = 1e-4
"""The same on CUDA (cuBLAS / TE grouped GEMM, TF32 off). Not measured (no GPU run yet)."""


@pytest.fixture(scope="module")
def moe_config() -> ModelConfig:
    return load_model_config(MOE_YAML)


def _sq_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) ** 2


def reference_moe_layer(layer: torch.nn.Module, cfg: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """``h + routed(x) + shared(x)``, ``x = RMSNorm(h)``, from the layer's raw tensors."""
    d = lambda t: t.detach().double()
    moe = layer.mlp
    h = d(h).reshape(-1, cfg.hidden_size)  # tokens x hidden
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cfg.layernorm_epsilon)
    x = x * d(layer.pre_mlp_layernorm.weight)
    logits = x @ d(moe.router.weight).T  # tokens x experts
    k, n = cfg.moe_router_topk, cfg.num_moe_experts
    if cfg.moe_router_score_function == "sigmoid":
        scores = torch.sigmoid(logits)
        bias = d(moe.router.expert_bias) if cfg.moe_router_enable_expert_bias else 0.0
        choice = scores + bias  # the bias picks the experts; the weights are the plain scores
    elif cfg.moe_router_pre_softmax:
        scores = choice = torch.softmax(logits, -1)
    else:
        scores = choice = logits
    if cfg.moe_router_num_groups:  # group score: sum of its top k // group_topk choice scores
        g = cfg.moe_router_num_groups
        group = choice.view(len(x), g, n // g).topk(k // cfg.moe_router_group_topk, -1)[0].sum(-1)
        keep = torch.zeros_like(group).scatter(1, group.topk(cfg.moe_router_group_topk, -1)[1], 1)
        choice = choice.masked_fill(~keep.repeat_interleave(n // g, 1).bool(), float("-inf"))
    idx = choice.topk(k, -1)[1]
    weights = scores.gather(1, idx)
    if cfg.moe_router_score_function == "sigmoid":
        weights = weights / weights.sum(-1, keepdim=True) if k > 1 else weights
    elif not cfg.moe_router_pre_softmax:
        weights = torch.softmax(weights, -1)
    weights = weights * (cfg.moe_router_topk_scaling_factor or 1.0)
    out = h.clone()
    for t in range(len(x)):
        for j in range(k):
            fc1, fc2 = _expert_weights(moe.experts, int(idx[t, j]))
            out[t] += weights[t, j] * (d(fc2) @ _sq_relu(d(fc1) @ x[t]))
    if cfg.moe_shared_expert_intermediate_size:
        shared = moe.shared_experts
        out += _sq_relu(x @ d(shared.linear_fc1.weight).T) @ d(shared.linear_fc2.weight).T
    return out


def _expert_weights(experts: torch.nn.Module, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``i``'s fc1 and fc2: ``SequentialMLP`` (local spec) or ``TEGroupedMLP`` (TE)."""
    if hasattr(experts, "local_experts"):
        e = experts.local_experts[i]
        return e.linear_fc1.weight, e.linear_fc2.weight
    return getattr(experts.linear_fc1, f"weight{i}"), getattr(experts.linear_fc2, f"weight{i}")


def _build(cfg: ModelConfig, pgs, seed: int = 0):
    torch.manual_seed(seed)
    model = build_hybrid_model(cfg, pgs)
    with torch.no_grad():  # decisive routing, a bias that changes the choice, random norms
        for name, p in model.named_parameters():
            if "router.weight" in name:
                p.normal_(0, 0.5)
            elif "experts" in name:  # an MoE output of the residual's order, not 1e-3 of it
                p.normal_(0, 0.3)
            elif "layernorm" in name:
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.normal_(0, 0.3)
    return model


def _check_layers(model, cfg: ModelConfig, train: bool, rel_tol: float = REL_TOL) -> int:
    """Run the whole model; compare every E layer's output with the reference on its input."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for j, kind in enumerate(cfg.layer_kinds()):
        if kind == "moe":

            def hook(module, args, kwargs, out, j=j):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                seen[j] = (hidden.detach().clone(), (out[0] if isinstance(out, tuple) else out))

            hooks.append(model.decoder.layers[j].register_forward_hook(hook, with_kwargs=True))
    model.train(train)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(next(model.parameters()).device)
    try:
        model(tokens, position_ids_like(tokens), None)
    finally:
        for h in hooks:
            h.remove()
    for j, (hidden, out) in seen.items():
        want = reference_moe_layer(model.decoder.layers[j], cfg, hidden)
        h = hidden.double().reshape(want.shape)
        delta, want_delta = out.double().reshape(want.shape) - h, want - h
        assert want_delta.abs().max() > 0.2 * h.abs().max(), "the MoE output must matter"
        rel = (delta - want_delta).abs().max() / want_delta.abs().max()
        assert rel < rel_tol, (j, rel.item())
    return len(seen)


ROUTERS = {
    # Nemotron 3's: sigmoid + expert bias, renormalised and scaled top-k, shared expert.
    "sigmoid_bias_shared": {},
    "softmax_topk_no_shared": {
        "moe_router_score_function": "softmax",
        "moe_router_enable_expert_bias": False,
        "moe_router_topk_scaling_factor": None,
        "moe_shared_expert_intermediate_size": None,
        "moe_router_topk": 3,
    },
    "softmax_pre_top1": {
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": True,
        "moe_router_enable_expert_bias": False,
        "moe_router_topk": 1,
    },
    "sigmoid_group_limited": {"moe_router_num_groups": 4, "moe_router_group_topk": 2},
}


@pytest.mark.parametrize("router", list(ROUTERS))
def test_invariant_moe_layer_matches_reference(pgs, moe_config, router) -> None:
    cfg = dataclasses.replace(moe_config, **ROUTERS[router])
    model = _build(cfg, pgs)
    assert _check_layers(model, cfg, train=router == "sigmoid_bias_shared") == 2  # "ME*E"


@pytest.mark.gpu
def test_invariant_moe_layer_matches_reference_on_cuda(pgs, moe_config) -> None:
    """The GPU path: megatron's TE spec (grouped-GEMM ``TEGroupedMLP`` experts) when
    transformer_engine imports, else the local spec on CUDA; TF32 off."""
    from megatron_elastic.model.builder import use_te

    torch.backends.cuda.matmul.allow_tf32 = False
    model = _build(moe_config, pgs)
    experts = type(model.decoder.layers[1].mlp.experts).__name__
    assert experts == ("TEGroupedMLP" if use_te() else "SequentialMLP"), experts
    assert _check_layers(model, moe_config, train=True, rel_tol=GPU_REL_TOL) == 2


def test_active_experts_and_parameter_counts(pgs, moe_config) -> None:
    cfg = moe_config
    model = _build(cfg, pgs)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    # One E layer by hand: norm 32 + gate 8*32 + 8 experts * 2*32*16 + shared 2*32*24.
    total_e = 32 + 8 * 32 + 8 * 2 * 32 * 16 + 2 * 32 * 24
    active_e = 32 + 8 * 32 + 2 * 2 * 32 * 16 + 2 * 32 * 24  # top-2 of the 8 experts
    assert layer_kind("moe").params(cfg, cfg.hidden_size, {}) == total_e == 10016
    assert count_active_parameters(cfg) == count_parameters(cfg) - 2 * (total_e - active_e)
    dense = dataclasses.replace(cfg, hybrid_pattern="M-*-", **_no_moe())
    assert count_active_parameters(dense) == count_parameters(dense)
    # One token touches exactly top-k routed experts per E layer (their weights get gradients).
    model.train()
    token = torch.tensor([[5]])
    model(token, position_ids_like(token), None, labels=token).sum().backward()
    for j in (1, 3):
        experts = model.decoder.layers[j].mlp.experts.local_experts
        hit = [e for e in experts if e.linear_fc1.weight.grad.abs().sum() > 0]
        assert len(hit) == cfg.moe_router_topk, j


def test_router_losses_pass_through_to_megatron(pgs, moe_config) -> None:
    """moe_aux_loss_coeff / moe_z_loss_coeff reach megatron's router: its recorded z-loss is
    ST-MoE's mean over tokens of logsumexp(logits)^2 (computed here from the gate), and the two
    losses change the gate's gradient (the loss is the same: they act in backward only)."""
    from megatron.core.transformer.moe.moe_utils import get_moe_metrics_tracker

    off = dataclasses.replace(
        moe_config,
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=None,
        moe_router_enable_expert_bias=False,
    )
    on = dataclasses.replace(off, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.1)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    grads, losses, inputs, weights = [], [], {}, {}
    for cfg in (off, on):
        model = _build(cfg, pgs, seed=4).train()
        weights = weights or model.state_dict()  # megatron's RNG streams moved on: same weights
        model.load_state_dict(weights)
        hook = model.decoder.layers[1].pre_mlp_layernorm.register_forward_hook(
            lambda m, a, out: inputs.update(x=out.detach())
        )
        tracker = get_moe_metrics_tracker()
        tracker.clear()
        loss = model(tokens, position_ids_like(tokens), None, labels=tokens).mean()
        loss.backward()
        hook.remove()
        losses.append(loss.item())
        grads.append(model.decoder.layers[1].mlp.router.weight.grad.clone())
        if cfg is on:
            logits = (
                inputs["x"].double().reshape(-1, 32)
                @ _d(model.decoder.layers[1].mlp.router.weight).T
            )
            z = torch.logsumexp(logits, -1).square().mean()
            recorded = tracker.metrics["z_loss"].values[1]  # layer_number 2 (1-based) -> index 1
            torch.testing.assert_close(recorded.double(), z, rtol=1e-5, atol=0)
            assert tracker.metrics["load_balancing_loss"].values[1] > 0
    assert losses[0] == losses[1]
    assert (grads[0] - grads[1]).abs().max() > 1e-3 * grads[0].abs().max()


def _d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


def _no_moe() -> dict:
    return {
        "num_moe_experts": None,
        "moe_ffn_hidden_size": None,
        "moe_shared_expert_intermediate_size": None,
        "moe_router_topk_scaling_factor": None,
        "moe_z_loss_coeff": None,
    }


BAD = [
    ({"num_moe_experts": None}, "num_moe_experts"),
    ({"moe_ffn_hidden_size": 0}, "moe_ffn_hidden_size"),
    ({"moe_router_topk": 9}, "moe_router_topk"),
    ({"moe_shared_expert_intermediate_size": -4}, "moe_shared_expert_intermediate_size"),
    ({"moe_router_score_function": "sqrtsoftplus"}, "moe_router_score_function"),
    ({"moe_router_pre_softmax": True}, "moe_router_pre_softmax"),  # with sigmoid
    (
        {
            "moe_router_score_function": "softmax",
            "moe_router_enable_expert_bias": False,
            "moe_router_topk": 1,
        },
        "moe_router_pre_softmax",
    ),
    ({"moe_router_score_function": "softmax"}, "moe_router_enable_expert_bias"),
    ({"moe_router_topk_scaling_factor": 0.0}, "moe_router_topk_scaling_factor"),
    ({"moe_router_load_balancing_type": "sinkhorn"}, "moe_router_load_balancing_type"),
    ({"moe_router_load_balancing_type": "none"}, "moe_aux_loss_coeff"),
    ({"moe_aux_loss_coeff": -1.0}, "moe_aux_loss_coeff"),
    ({"moe_z_loss_coeff": -0.1}, "moe_z_loss_coeff"),
    ({"moe_router_num_groups": 3, "moe_router_group_topk": 1}, "moe_router_num_groups"),
    ({"moe_router_num_groups": 4, "moe_router_group_topk": 5}, "moe_router_group_topk"),
    (
        {"moe_router_num_groups": 4, "moe_router_group_topk": 1, "moe_router_topk": 3},
        "moe_router_topk",
    ),
    ({"hybrid_pattern": "M-*-"}, "num_moe_experts"),  # MoE fields without E layers
    ({"layer_widths": (4, 8, 4, 8)}, "layer_widths"),
]


@pytest.mark.parametrize("change,field", BAD, ids=[f for _, f in BAD])
def test_moe_config_errors_name_the_field(moe_config, change, field) -> None:
    with pytest.raises(ValueError, match=f"ModelConfig.{field}") as err:
        dataclasses.replace(moe_config, **change)
    assert "\n" not in str(err.value)


def test_elastic_side_refuses_what_moe_parents_cannot_run_yet(pgs, moe_config) -> None:
    """MoE parents are elastic (issue 26 step 2, tests/unit/test_moe_elastic.py) at TP > 1 with
    sequence parallelism only, as megatron trains them
    (tests/distributed/test_expert_parallel.py)."""
    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.elastic import build_elastic_model

    elastic = ElasticConfig(budgets={"half": 0.5})
    elastic.validate_for(moe_config)
    tp2 = ParallelConfig(tensor_parallel_size=2)
    for refuse in (
        lambda: elastic.validate_for(moe_config, tp2),
        lambda: build_elastic_model(moe_config, elastic, pgs, tp2),
    ):
        with pytest.raises(ValueError, match=r"set parallel.sequence_parallel: true"):
            refuse()


def test_every_format_accepts_a_homogeneous_moe_budget(moe_config) -> None:
    """Every export format writes MoE layers now (issue 26 step 6): none refuses the parent or a
    homogeneous MoE budget before writing (each format's own test loads them in its consumer:
    test_hf_convert.py, test_gguf_export.py, test_megatron_lm_export.py)."""
    from megatron_elastic.elastic.subnet import SubnetSpec
    from megatron_elastic.export.registry import EXPORTERS, ExportOptions

    small = SubnetSpec.homogeneous(moe_config, moe_experts=4, moe_expert_ffn=8, moe_shared_ffn=12)
    budgets = {"full": SubnetSpec.full(moe_config), "small": small}
    assert {"megatron", "megatron-lm", "hf", "gguf"} <= set(EXPORTERS)
    for exporter in EXPORTERS.values():
        exporter.check(moe_config, budgets, ExportOptions())


def test_expert_weights_come_from_each_expert_parallel_ranks_stream(pgs, moe_config) -> None:
    """Each EP rank draws its local experts from the expert stream seeded by its rank (as megatron
    does on GPU; on CPU platform.py builds expert linears inside that stream), so EP ranks do not
    start with equal experts, while every replicated weight is drawn from the default stream
    alone, equal on every rank. Checked in one process: building with ``ep_rank`` 0 and 1
    changes exactly the routed experts' weights."""
    from megatron_elastic.platform import seed_model_parallel_rng

    built = []
    try:
        for ep_rank in (0, 1):
            seed_model_parallel_rng(7, tp_rank=0, ep_rank=ep_rank)
            built.append(dict(build_hybrid_model(moe_config, pgs).named_parameters()))
    finally:
        seed_model_parallel_rng(1234, tp_rank=0)  # as init_process_groups seeded the session
    experts = [n for n in built[0] if ".experts." in n and "shared" not in n]
    assert experts
    for name, p in built[0].items():
        equal = torch.equal(p, built[1][name])
        assert equal != (name in experts), name
