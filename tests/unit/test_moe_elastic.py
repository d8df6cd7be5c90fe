"""Elastic mixture-of-experts layers (issue 26 step 2): the ``moe_experts``, ``moe_expert_ffn`` and
``moe_shared_ffn`` axes.

Invariants: the full budget is the parent; slice == mask (outputs and router-weight gradients)
for fewer, narrower experts and a narrower shared expert, homogeneous and per layer; the sliced
model IS a model pruned to the kept experts (a fresh megatron ``MoELayer`` built with
``num_moe_experts=kept`` and loaded with the kept prefix computes the same logits: routing
renormalises over the kept experts exactly as the pruned model's); its parameter counts (total,
active) are the sliced tensors' and what one token touches.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from moe_fixture import MOE_YAML
from moe_fixture import ROUTERS as FIXTURE_ROUTERS

from megatron_elastic.config import ModelConfig, ParallelConfig, load_model_config
from megatron_elastic.elastic import ElasticConfig, SubnetSpec, SubnetWeights, build_elastic_model
from megatron_elastic.elastic.budget import (
    subnet_active_param_count,
    subnet_memory,
    subnet_param_count,
)
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.model.param_count import count_active_parameters, count_parameters
from megatron_elastic.router import ElasticRouter, RouterConfig, fit_to_budgets
from megatron_elastic.training.lm_step import position_ids_like

MOE_LAYERS = (1, 3)  # "ME*E"
TOL = 1e-6
"""Relative to the logits' scale: the same float32 products summed in another order (mask mode
adds exact zeros; the pruned model's dispatcher permutes tokens). Measured worst 4.9e-7."""

ROUTERS = {
    **FIXTURE_ROUTERS,  # Nemotron 3's, softmax top-3 without shared expert, group-limited (one of
    # two groups of 4: kept experts are a prefix of each group, 4 kept: 0, 1, 4, 5)
    "softmax_pre_top1": {
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": True,
        "moe_router_enable_expert_bias": False,
        "moe_router_topk": 1,
    },
}


@pytest.fixture(scope="module")
def moe_config() -> ModelConfig:
    return load_model_config(MOE_YAML)


def _elastic(budgets=None, ffn_nesting_blocks: int = 1, **choices) -> ElasticConfig:
    return ElasticConfig(
        budgets=budgets or {"full": 1.0}, choices=choices, ffn_nesting_blocks=ffn_nesting_blocks
    )


def _randomise(model) -> None:
    """Decisive routing, a bias that changes the choice, an MoE output that matters; every weight
    drawn here (megatron's init streams depend on what ran before)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router.weight" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "experts" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "layernorm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("A_log"):  # Mamba's A = -exp(A_log), A in [-16, -1]
                p.copy_(torch.empty(p.shape).uniform_(1, 16, generator=g).log())
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 - 3)
            elif p.std() > 0:  # (constants, e.g. norm weights and D, stay as megatron sets them)
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)


def _model(cfg: ModelConfig, pgs, elastic: ElasticConfig | None = None):
    torch.manual_seed(0)
    model = build_elastic_model(cfg, elastic or _elastic(), pgs)
    _randomise(model)
    return model.eval()


TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model, tokens=TOKENS) -> torch.Tensor:
    return model(tokens, position_ids_like(tokens), None)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _floor(grad: torch.Tensor) -> float:
    """Absolute floor of a gradient comparison: 1e-5 of its largest entry (float32 sums over
    tokens that partly cancel), at least 1e-8."""
    return max(1e-8, 1e-5 * grad.abs().max().item())


def _moe_weights(cfg: ModelConfig, spec: SubnetSpec, soft: bool) -> SubnetWeights:
    """Router weights on the MoE layers only: scalars (hard), or one per kept neuron (soft)."""
    g = torch.Generator().manual_seed(3)
    layers = []
    for c in spec.layers:
        if c.kind != "moe":
            layers.append(None)
            continue
        e, f, s = (c.size(a) for a in ("moe_experts", "moe_expert_ffn", "moe_shared_ffn"))
        n = e * f + s if soft else None
        w = torch.rand(n, generator=g) + 0.5 if soft else torch.tensor(1.0)
        layers.append(w.requires_grad_())
    return SubnetWeights(layers=tuple(layers))


# ---- full budget == parent ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["slice", "mask"])
def test_invariant_moe_full_budget_is_the_parent(pgs, moe_config, mode) -> None:
    model = _model(moe_config, pgs)
    full = SubnetSpec.full(moe_config)
    with torch.no_grad():
        model.set_subnet(None)
        parent = _logits(model)
        model.set_subnet(full, mode=mode)  # no weights: megatron's own forward, bit for bit
        assert torch.equal(_logits(model), parent)
        model.set_subnet(full, _moe_weights(moe_config, full, soft=False), mode=mode)
        assert model.subnet is not None  # the elastic layers ran
        assert _rel(_logits(model), parent) <= TOL


# ---- slice == mask -----------------------------------------------------------------------

SUBNETS = {
    "fewer_experts": dict(moe_experts=4),
    "narrower_experts": dict(moe_expert_ffn=8),
    "narrower_shared": dict(moe_shared_ffn=12),
    "all_and_hidden": dict(moe_experts=6, moe_expert_ffn=12, moe_shared_ffn=8, hidden=24),
}


def _spec(cfg: ModelConfig, name: str) -> SubnetSpec:
    if name == "per_layer":  # layer 1 and layer 3 differ on every MoE axis
        return SubnetSpec.heterogeneous(
            cfg,
            moe_experts=[8, 3, 8, 6],
            moe_expert_ffn=[16, 12, 16, 4],
            moe_shared_ffn=[24, 24, 24, 16],
        )
    return SubnetSpec.homogeneous(cfg, **SUBNETS[name])


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("name", [*SUBNETS, "per_layer"])
def test_invariant_moe_slice_equals_mask(pgs, moe_config, name, soft) -> None:
    model = _model(moe_config, pgs)
    spec = _spec(moe_config, name)
    with torch.no_grad():
        model.set_subnet(None)
        parent = _logits(model)
    out, grads = {}, {}
    for mode in ("slice", "mask"):
        weights = _moe_weights(moe_config, spec, soft)
        model.set_subnet(spec, weights, mode=mode)
        out[mode] = _logits(model)
        out[mode].square().mean().backward()
        grads[mode] = [weights.layers[j].grad for j in MOE_LAYERS]
    assert _rel(out["slice"], out["mask"]) <= TOL
    for a, b in zip(grads["slice"], grads["mask"], strict=True):
        # a router weight's gradient is a sum over tokens and channels that partly cancels
        # (a scalar's is ~5e-6 here): relative 1e-4 above a floor (measured worst 1.8e-5).
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=_floor(b))
    assert _rel(out["slice"], parent) > 1e-3  # the sub-network is not the parent


@pytest.mark.parametrize("router", list(ROUTERS)[1:])
def test_invariant_moe_slice_equals_mask_for_every_router(pgs, moe_config, router) -> None:
    """Dropped experts take no part in the choice nor in a softmax's normaliser, however the
    router scores (the default router is covered above)."""
    cfg = dataclasses.replace(moe_config, **ROUTERS[router])
    model = _model(cfg, pgs)
    spec = SubnetSpec.homogeneous(cfg, moe_experts=4)
    out = {}
    with torch.no_grad():
        for mode in ("slice", "mask"):
            model.set_subnet(spec, mode=mode)
            out[mode] = _logits(model)
    assert _rel(out["slice"], out["mask"]) <= TOL


# ---- the sliced model is the pruned model ------------------------------------------------


@pytest.mark.parametrize("router", list(ROUTERS))
def test_invariant_moe_sliced_equals_pruned_model(pgs, moe_config, router) -> None:
    """A model built with ``num_moe_experts=kept`` (and the kept widths), loaded with the sliced
    weights (gate rows and expert_bias of the kept prefix, experts renumbered), computes what
    slice mode computes: the routing renormalises over the kept experts as the pruned model's."""
    cfg = dataclasses.replace(moe_config, **ROUTERS[router])
    shared = 12 if cfg.moe_shared_expert_intermediate_size else None
    sizes = dict(moe_experts=4, moe_expert_ffn=8, moe_shared_ffn=shared or 0)
    elastic = _model(cfg, pgs)
    spec = SubnetSpec.homogeneous(cfg, **sizes)
    pruned_cfg = dataclasses.replace(
        cfg, num_moe_experts=4, moe_ffn_hidden_size=8, moe_shared_expert_intermediate_size=shared
    )
    pruned = build_hybrid_model(pruned_cfg, pgs).eval()
    sliced = elastic.sliced_state_dict(spec)
    missing, unexpected = pruned.load_state_dict(sliced, strict=False)
    assert not unexpected and all("_extra_state" in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        elastic.set_subnet(spec, mode="slice")
        got, want = _logits(elastic), _logits(pruned)
        elastic.set_subnet(None)
        parent = _logits(elastic)
    assert _rel(got, want) <= TOL, _rel(got, want)
    assert _rel(want, parent) > 1e-3
    # the counts are the pruned model's
    assert subnet_param_count(cfg, spec) == count_parameters(pruned_cfg)
    assert subnet_active_param_count(cfg, spec) == count_active_parameters(pruned_cfg)


def test_invariant_moe_sliced_losses_and_gate_gradients_are_the_pruned_models(
    pgs, moe_config
) -> None:
    """In training, the z-loss and the switch load-balancing loss run over the kept experts
    (megatron records the pruned model's values) and the kept gate rows get the pruned gate's
    gradient (task loss + both auxiliary losses)."""
    from megatron.core.transformer.moe.moe_utils import get_moe_metrics_tracker

    cfg = dataclasses.replace(moe_config, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.1)
    pruned_cfg = dataclasses.replace(cfg, num_moe_experts=4)
    spec = SubnetSpec.homogeneous(cfg, moe_experts=4)
    elastic = _model(cfg, pgs)
    pruned = build_hybrid_model(pruned_cfg, pgs)
    pruned.load_state_dict(elastic.sliced_state_dict(spec), strict=False)
    elastic.set_subnet(spec, mode="slice")
    recorded, grads = [], []
    tracker = get_moe_metrics_tracker()
    for model in (elastic, pruned):
        model.train()
        tracker.clear()
        model(TOKENS, position_ids_like(TOKENS), None, labels=TOKENS).mean().backward()
        recorded.append(
            [
                tracker.metrics[k].values[j].clone()
                for k in ("z_loss", "load_balancing_loss")
                for j in MOE_LAYERS
            ]
        )
        grads.append([model.decoder.layers[j].mlp.router.weight.grad[:4] for j in MOE_LAYERS])
    for a, b in zip(*recorded, strict=True):
        assert b > 0 and _rel(a, b) <= TOL
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=_floor(b))


# ---- refusals ----------------------------------------------------------------------------


def test_moe_sizes_the_parent_cannot_route_are_refused(moe_config, small_config) -> None:
    cfg = moe_config  # top-2 of 8 experts, shared expert 24
    cases = [
        (lambda: _elastic(moe_experts=(1, 4)).validate_for(cfg), "fewer than moe_router_topk=2"),
        (
            lambda: SubnetSpec.heterogeneous(cfg, moe_experts=[8, 1, 8, 8]).validate(cfg),
            "layer 1: 1 routed experts is fewer than moe_router_topk=2",
        ),
        (lambda: _elastic(moe_expert_ffn=(32,)).validate_for(cfg), "at most 16"),
        (
            lambda: _elastic(moe_shared_ffn=(8,)).validate_for(
                dataclasses.replace(cfg, moe_shared_expert_intermediate_size=None)
            ),
            "has no shared expert",
        ),
        (lambda: _elastic(moe_experts=(4,)).validate_for(small_config), "no 'E'"),
        (
            lambda: _elastic().validate_for(cfg, ParallelConfig(tensor_parallel_size=2)),
            "needs sequence parallelism .* set parallel.sequence_parallel: true",
        ),
        (  # expert and shared neurons nest in the FFN nesting blocks: whole blocks per TP rank
            lambda: _elastic(ffn_nesting_blocks=32).validate_for(cfg),
            "ffn_nesting_blocks=32 must divide moe_ffn_hidden_size=16 .*; use ffn_nesting_blocks=8",
        ),
        (
            lambda: _elastic(ffn_nesting_blocks=16).validate_for(cfg, _tp2),
            "must divide moe_shared_expert_intermediate_size=24 .*; use ffn_nesting_blocks=8",
        ),
        (
            lambda: _elastic(ffn_nesting_blocks=4, moe_expert_ffn=(10,)).validate_for(cfg, _tp2),
            r"moe_expert_ffn choices \[10\] .* kept per FFN nesting block \(4 of them\)",
        ),
        (
            lambda: _elastic(ffn_nesting_blocks=4, moe_shared_ffn=(6,)).validate_for(cfg, _tp2),
            r"moe_shared_ffn choices \[6\] .* kept per FFN nesting block \(4 of them\)",
        ),
        (
            lambda: _elastic().validate_for(
                dataclasses.replace(cfg, moe_router_load_balancing_type="seq_aux_loss")
            ),
            "aux_loss .and the z-loss. only",
        ),
    ]
    grouped = dataclasses.replace(cfg, moe_router_num_groups=4, moe_router_group_topk=1)
    cases += [  # one group of 4 keeps 1 expert per group: top-2 cannot be met within it
        (lambda: _elastic(moe_experts=(4,)).validate_for(grouped), "fewer than moe_router_topk"),
        (lambda: _elastic(moe_experts=(6,)).validate_for(grouped), "kept per expert block"),
    ]
    for refuse, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            refuse()
        assert "\n" not in str(err.value)
    _elastic(moe_experts=(2, 4), moe_expert_ffn=(8,), moe_shared_ffn=(12,)).validate_for(cfg)
    _elastic(moe_experts=(8,)).validate_for(grouped)
    _elastic(ffn_nesting_blocks=4, moe_expert_ffn=(12,), moe_shared_ffn=(16,)).validate_for(
        cfg, _tp2
    )


_tp2 = ParallelConfig(tensor_parallel_size=2, sequence_parallel=True)


# ---- counting ----------------------------------------------------------------------------


def test_moe_subnet_counts_are_the_sliced_tensors_and_what_a_token_touches(pgs, moe_config) -> None:
    cfg = moe_config
    model = _model(cfg, pgs)
    spec = _spec(cfg, "per_layer")
    sliced = model.sliced_state_dict(spec)
    params = sum(t.numel() for k, t in sliced.items() if not k.endswith("expert_bias"))
    assert subnet_param_count(cfg, spec) == params
    # One token touches its top-k kept experts' slices: the others get no gradient.
    model.set_subnet(spec, mode="slice")
    model.train()
    token = torch.tensor([[5]])
    model(token, position_ids_like(token), None, labels=token).sum().backward()
    untouched = 0
    for j in MOE_LAYERS:
        c = spec.layers[j]
        kept = model.decoder.layers[j].mlp.experts.local_experts[: c.size("moe_experts")]
        hit = [e for e in kept if e.linear_fc1.weight.grad.abs().sum() > 0]
        assert len(hit) == cfg.moe_router_topk, j
        untouched += (len(kept) - len(hit)) * 2 * cfg.hidden_size * c.size("moe_expert_ffn")
    assert subnet_active_param_count(cfg, spec) == params - untouched
    # deployment memory holds every kept expert; MoE layers add no inference state
    memory, full = (subnet_memory(cfg, s, seq_length=64) for s in (spec, SubnetSpec.full(cfg)))
    assert memory.weights == 2 * params
    assert (memory.kv_cache, memory.mamba_state) == (full.kv_cache, full.mamba_state)


# ---- routing -----------------------------------------------------------------------------


def test_the_router_draws_the_moe_axes_and_fits_a_budget(pgs, moe_config) -> None:
    cfg = moe_config
    target = SubnetSpec.homogeneous(cfg, moe_experts=4)
    fraction = subnet_param_count(cfg, target) / count_parameters(cfg)
    elastic = _elastic({"full": 1.0, "small": fraction}, moe_experts=(4, 6))
    router = ElasticRouter(cfg, elastic, RouterConfig(anneal_steps=20, seed=3))
    assert {"moe_experts", "moe_expert_ffn", "moe_shared_ffn"} <= set(router.axes)
    assert router.choices["moe_experts"] == (4, 6, 8)
    decision = router.decide("small", 0, torch.Generator().manual_seed(0))
    assert decision.spec.layers[1].size("moe_experts") in (4, 6, 8)
    router.budget_loss(decision).backward()
    assert router.routers["moe_experts"][2].weight.grad.abs().sum() > 0
    fit_to_budgets(router, 60)
    chosen = router.decide("small", 60, None, deterministic=True).spec
    assert chosen == target
    assert router.decide("full", 60, None, deterministic=True).spec == SubnetSpec.full(cfg)
    # soft sampling: per-neuron weights (routed experts, then the shared expert) drive the model
    soft = ElasticRouter(cfg, elastic, RouterConfig(anneal_steps=20, seed=3, sampling="soft"))
    decision = soft.decide("small", 0, torch.Generator().manual_seed(1))
    c = decision.spec.layers[1]
    e, f, s = (c.size(a) for a in ("moe_experts", "moe_expert_ffn", "moe_shared_ffn"))
    assert decision.weights.layers[1].shape == (e * f + s,)
    model = _model(cfg, pgs, elastic)
    model.set_subnet(decision.spec, decision.weights, mode="slice")
    _logits(model).square().mean().backward()
    assert soft.routers["moe_experts"][2].weight.grad.abs().sum() > 0


def test_an_active_params_budget_counts_what_a_token_touches(moe_config) -> None:
    """``budget_target: active_params``: the parent's cost is its active parameters, and a fit
    budget lands on the sub-network whose active share is the fraction (all experts at half
    width); a ``params`` router reads the same fraction as a share of all parameters and picks
    another sub-network."""
    from megatron_elastic.elastic.budget import subnet_active_param_count

    cfg = moe_config
    target = SubnetSpec.homogeneous(cfg, moe_expert_ffn=8)
    fraction = subnet_active_param_count(cfg, target) / count_active_parameters(cfg)
    elastic = _elastic({"full": 1.0, "small": fraction}, moe_experts=(4,), moe_expert_ffn=(8,))
    router = ElasticRouter(
        cfg, elastic, RouterConfig(anneal_steps=20, seed=3, budget_target="active_params")
    )
    assert router.parent_cost == count_active_parameters(cfg) < count_parameters(cfg)
    assert router.spec_cost(target) == subnet_active_param_count(cfg, target)
    fit_to_budgets(router, 60)
    assert router.decide("small", 60, None, deterministic=True).spec == target
    by_params = ElasticRouter(cfg, elastic, RouterConfig(anneal_steps=20, seed=3))
    assert by_params.spec_cost(target) == subnet_param_count(cfg, target)
    fit_to_budgets(by_params, 60)  # the same fraction of all parameters is another sub-network
    assert by_params.decide("small", 60, None, deterministic=True).spec != target


# ---- importance (step 3) -----------------------------------------------------------------


def _ranked(cfg: ModelConfig, pgs, plant=None, tokens: torch.Tensor = TOKENS):
    """(the parent's logits, its ranking, the parent ranked in place by ``rank_model``, what
    estimate_importance runs) from calibration on TOKENS."""
    from megatron_elastic.importance import collect_activation_stats, rank_from_stats
    from megatron_elastic.importance.estimate import rank_model

    model = _model(cfg, pgs)
    if plant is not None:
        with torch.no_grad():
            plant(model)
    stats = collect_activation_stats(model, [{"tokens": tokens}], pgs)
    ranking = rank_from_stats(cfg, stats)
    with torch.no_grad():
        before = _logits(model)
    rank_model(model, ranking, pgs)
    return before, ranking, model


@pytest.mark.parametrize("router", ["sigmoid_bias_shared", "sigmoid_group_limited"])
def test_invariant_moe_ranking_permutation_leaves_the_function_unchanged(
    pgs, moe_config, router
) -> None:
    """Experts move with their gate rows and expert_bias entries, each expert's neurons and the
    shared expert's with their fc1 rows / fc2 columns, hidden channels through every MoE
    weight: the permuted parent computes the same logits, and a ranked sub-network keeps the
    best experts (its logits differ from the unranked one's)."""
    cfg = dataclasses.replace(moe_config, **ROUTERS[router])
    parent, ranking, ranked = _ranked(cfg, pgs)
    identity = {
        "moe_experts": _identity_experts(cfg),
        "moe_expert_ffn": [list(range(16))] * 8,
        "moe_shared_ffn": list(range(24)),
    }
    for axis, unranked in identity.items():
        orders = ranking.orders[axis]
        assert set(orders) == set(MOE_LAYERS)
        assert any(orders[j] != unranked for j in MOE_LAYERS), axis  # the test permutes
    assert ranking.hidden != sorted(ranking.hidden)
    spec = SubnetSpec.homogeneous(cfg, moe_experts=4, moe_expert_ffn=8, moe_shared_ffn=12)
    unranked = _model(cfg, pgs)
    with torch.no_grad():
        assert _rel(_logits(ranked), parent) <= TOL
        unranked.set_subnet(spec)
        ranked.set_subnet(spec)
        assert _rel(_logits(ranked), _logits(unranked)) > 1e-3


def _identity_experts(cfg: ModelConfig):
    if cfg.moe_router_group_topk:
        per = cfg.num_moe_experts // cfg.moe_router_num_groups
        return [list(range(per))] * cfg.moe_router_num_groups
    return list(range(cfg.num_moe_experts))


def test_a_planted_dead_expert_and_dead_neurons_rank_last(pgs, moe_config) -> None:
    """Expert 2 of layer 1 is routed to but outputs nothing (fc2 zero): REAP ranks it last
    although its routing frequency is not the lowest; a neuron with a zero fc1 row ranks last in
    its expert (each expert has its own order, applied before the experts move), and in the
    shared expert; a never-routed expert ranks below a dead one."""

    def plant(model) -> None:
        moe = model.decoder.layers[1].mlp
        moe.router.weight.mul_(0.1)  # balanced routing: every expert gets tokens
        moe.router.expert_bias.zero_()
        moe.experts.local_experts[2].linear_fc2.weight.zero_()
        moe.experts.local_experts[7].linear_fc1.weight[5].zero_()
        moe.shared_experts.linear_fc1.weight[7].zero_()
        layer3 = model.decoder.layers[3].mlp
        layer3.experts.local_experts[6].linear_fc2.weight.zero_()
        layer3.router.weight.mul_(0.1)
        layer3.router.expert_bias.zero_()
        layer3.router.expert_bias[4] = -10.0  # never chosen

    tokens = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    _, ranking, ranked = _ranked(moe_config, pgs, plant, tokens)
    scores = ranking.scores["moe_experts"]["1"]
    frequency = scores["frequency"]
    assert ranking.orders["moe_experts"][1][-1] == 2 and scores["reap"][2] == 0
    assert min(frequency) > 0  # every expert is routed to (REAP 0 is the planted one's alone)
    assert frequency[2] > min(frequency)  # routing frequency alone would not find it
    assert sum(frequency) == pytest.approx(moe_config.moe_router_topk)
    assert ranking.orders["moe_expert_ffn"][1][7][-1] == 5
    assert len({tuple(o) for o in ranking.orders["moe_expert_ffn"][1]}) == 8  # own orders
    assert ranking.orders["moe_shared_ffn"][1][-1] == 7
    # layer 3: expert 4 is never routed to (bias -10), expert 6 is dead: both score 0, and the
    # one never routed to ranks last (dropping it changes nothing)
    layer3 = ranking.scores["moe_experts"]["3"]
    assert layer3["frequency"][4] == 0 < layer3["frequency"][6]
    assert ranking.orders["moe_experts"][3][-2:] == [6, 4]
    # the ranked weights: the dead expert last, expert 7's dead neuron last wherever it went
    moe = ranked.decoder.layers[1].mlp
    experts = moe.experts.local_experts
    assert experts[7].linear_fc2.weight.abs().max() == 0
    position = ranking.orders["moe_experts"][1].index(7)
    assert position != 7  # (expert 7 moved: its neurons must move with it)
    assert experts[position].linear_fc1.weight[-1].abs().max() == 0
    assert moe.shared_experts.linear_fc1.weight[-1].abs().max() == 0


# ---- expert parallelism (step 5): nesting blocks, the dealt ranking, refusals -------------


@pytest.mark.parametrize(
    "router,blocks,kept",
    [
        ("sigmoid_bias_shared", 2, (0, 1, 4, 5)),  # EP 2 holds 0-3 and 4-7: 2 kept on each
        ("sigmoid_bias_shared", 4, (0, 2, 4, 6)),
        ("sigmoid_group_limited", 4, (0, 2, 4, 6)),  # 2 groups x 2 blocks each
    ],
)
def test_invariant_moe_slice_equals_mask_with_expert_nesting_blocks(
    pgs, moe_config, router, blocks, kept
) -> None:
    """``moe_expert_nesting_blocks``: 4 kept experts are the first of every block (so every EP
    rank, holding whole blocks, keeps as many), and slice == mask on them."""
    cfg = dataclasses.replace(moe_config, **ROUTERS[router])
    elastic = ElasticConfig(
        budgets={"full": 1.0}, moe_expert_nesting_blocks=blocks, choices={"moe_experts": (4,)}
    )
    model = _model(cfg, pgs, elastic)
    spec = SubnetSpec.homogeneous(cfg, moe_experts=4, moe_expert_ffn=12)
    out = {}
    with torch.no_grad():
        for mode in ("slice", "mask"):
            model.set_subnet(spec, mode=mode)
            for j in MOE_LAYERS:
                assert model.decoder.layers[j].mlp.active.indices.experts == kept
            out[mode] = _logits(model)
    assert _rel(out["slice"], out["mask"]) <= TOL


def test_deal_over_blocks_puts_the_best_first_in_every_block() -> None:
    from megatron_elastic.elastic.moe_axes import deal_over_blocks

    ranked = [3, 7, 1, 0, 2, 5, 4, 6]  # best first
    assert deal_over_blocks(ranked, 1) == ranked
    assert deal_over_blocks(ranked, 2) == [3, 1, 2, 4, 7, 0, 5, 6]
    assert deal_over_blocks(ranked, 4) == [3, 2, 7, 5, 1, 4, 0, 6]


@pytest.mark.parametrize("router", ["sigmoid_bias_shared", "sigmoid_group_limited"])
def test_importance_with_nesting_blocks_keeps_the_best_experts_on_every_rank(
    pgs, moe_config, router
) -> None:
    """The ranking dealt over 2 nesting blocks: the 4 experts a size of 4 keeps (the first 2 of
    each block, one block per EP rank) are the 4 best by REAP (the 2 best of each routing group
    when group-limited: there every group is a block already)."""
    from megatron_elastic.elastic.moe_axes import expert_groups, moe_indices
    from megatron_elastic.importance import collect_activation_stats, rank_from_stats
    from megatron_elastic.importance.estimate import estimate_importance

    cfg = dataclasses.replace(moe_config, **ROUTERS[router])
    model = _model(cfg, pgs)
    tokens = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    stats = collect_activation_stats(model, [{"tokens": tokens}], pgs)
    plain = rank_from_stats(cfg, stats)
    dealt = rank_from_stats(cfg, stats, moe_expert_nesting_blocks=2)
    elastic = ElasticConfig(budgets={"full": 1.0}, moe_expert_nesting_blocks=2)
    with_blocks = _model(cfg, pgs, elastic)  # estimate_importance deals over the model's blocks
    estimated = estimate_importance(with_blocks, [{"tokens": tokens}], pgs, rank_layers=False)
    assert estimated.orders["moe_experts"] == dealt.orders["moe_experts"]
    positions = moe_indices(8, expert_groups(cfg, elastic), 4, (16, 16), (0, 0)).experts
    assert positions == (0, 1, 4, 5)  # 2 on each EP rank
    for j in MOE_LAYERS:
        reap = dealt.scores["moe_experts"][str(j)]["reap"]
        assert reap == plain.scores["moe_experts"][str(j)]["reap"]
        laid, best = _flat(cfg, dealt.orders["moe_experts"][j]), plain.orders["moe_experts"][j]
        groups = best if cfg.moe_router_group_topk else [best]
        per = len(groups[0])
        top = {g * per + e for g, order in enumerate(groups) for e in order[: 4 // len(groups)]}
        assert {laid[p] for p in positions} == top, (laid, best)
        for g in range(len(groups)):  # no tie at the cut decides it
            scores = sorted((reap[g * per + e] for e in range(per)), reverse=True)
            assert scores[4 // len(groups) - 1] > scores[4 // len(groups)]


def _flat(cfg: ModelConfig, order) -> list[int]:
    """An expert order (per routing group when group-limited) in the parent's numbering."""
    if not cfg.moe_router_group_topk:
        return order
    return [g * len(local) + e for g, local in enumerate(order) for e in local]


def test_expert_parallel_settings_that_cannot_split_are_refused(
    pgs, moe_config, small_config
) -> None:
    from megatron_elastic.config import check_parallel_fit
    from megatron_elastic.parallel import init_process_groups

    ep2 = ParallelConfig(expert_model_parallel_size=2)
    cases = [
        (lambda: check_parallel_fit(small_config, ep2), "expert_model_parallel_size=2: the "),
        (
            lambda: check_parallel_fit(
                dataclasses.replace(moe_config, num_moe_experts=6),
                ParallelConfig(expert_model_parallel_size=4),
            ),
            "num_moe_experts=6 is not divisible",
        ),
        (lambda: init_process_groups(ep2), "must divide the 1 data x context parallel ranks"),
        (
            lambda: _elastic().validate_for(moe_config, ep2),
            "moe_expert_nesting_blocks=1 must be a multiple of expert_model_parallel_size=2",
        ),
        (
            lambda: ElasticConfig(budgets={"f": 1.0}, moe_expert_nesting_blocks=3).validate_for(
                moe_config
            ),
            "do not split into 3 equal blocks",
        ),
        (
            lambda: ElasticConfig(
                budgets={"f": 1.0}, moe_expert_nesting_blocks=2, choices={"moe_experts": (3,)}
            ).validate_for(moe_config, ep2),
            r"choices \[3\] are not possible: routed experts are kept per expert block",
        ),
        (lambda: ElasticConfig(budgets={"f": 1.0}, moe_expert_nesting_blocks=0), "positive"),
    ]
    for refuse, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            refuse()
        assert "\n" not in str(err.value)
    assert pgs.ep.size() == 1 and pgs.tp.size() == 1  # the refused init left the groups alone
    check_parallel_fit(moe_config, ParallelConfig(expert_model_parallel_size=8))
    ElasticConfig(budgets={"f": 1.0}, moe_expert_nesting_blocks=4).validate_for(moe_config, ep2)


@pytest.mark.parametrize("mode", ["slice", "mask"])
def test_sub_networks_count_dropped_experts_as_balanced_for_the_bias_update(
    pgs, moe_config, mode
) -> None:
    """megatron updates ``expert_bias`` at each step's end by sign(mean - tokens routed) per
    expert. A sub-network's tokens count for its kept experts (their own counts: a pruned
    model's balance), and each dropped expert counts as the kept experts' mean: with a count of
    0 every dropped expert read as under-used and its bias rose every step it was dropped,
    skewing the parent's routing (seen in examples/tiny_moe: +0.03..0.09 on the experts small
    budgets drop). The bias update then moves the kept experts as it would in the pruned model
    and leaves a dropped one within rounding of unchanged."""
    from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

    cfg = moe_config
    assert cfg.moe_router_enable_expert_bias
    model = _model(cfg, pgs)
    spec = SubnetSpec.homogeneous(cfg, moe_experts=4, moe_expert_ffn=8, moe_shared_ffn=12)
    model.set_subnet(spec, mode=mode)
    kept = list(range(4))
    routers = [model.decoder.layers[j].mlp.router for j in MOE_LAYERS]
    for r in routers:
        r.local_tokens_per_expert.zero_()
    model(TOKENS, position_ids_like(TOKENS), None)  # grad enabled: a training forward
    for r in routers:
        counts = r.local_tokens_per_expert.clone()
        assert counts[kept].sum() == TOKENS.numel() * cfg.moe_router_topk
        mean = counts[kept].mean()
        assert torch.allclose(counts[4:], mean.expand(4), rtol=1e-6, atol=0)
        bias = r.expert_bias.clone()
        new = get_updated_expert_bias(counts, bias, 1e-3, pgs.tp_dp_cp)
        want = bias[kept] + torch.sign(mean - counts[kept]) * 1e-3  # the pruned model's update
        assert torch.equal(new[kept], want)
        assert ((new[4:] - bias[4:]).abs() <= 1e-3).all()


def test_expert_and_shared_neurons_are_dealt_over_the_ffn_nesting_blocks(pgs, moe_config) -> None:
    """With ``ffn_nesting_blocks`` 2 (at TP 2 one block per rank) ranking deals every expert's
    and the shared expert's neurons over the blocks as the dense FFN's: the permuted parent
    computes the same function, and a width keeps the same prefix of each block, together the
    best neurons (block 0 the 1st, 3rd, ... best, block 1 the 2nd, 4th, ...)."""
    from megatron_elastic.importance.estimate import estimate_importance, rank_model

    cfg = moe_config
    model = _model(cfg, pgs, ElasticConfig(budgets={"full": 1.0}, ffn_nesting_blocks=2))
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        before = _logits(model)
    ranking = estimate_importance(model, [{"tokens": TOKENS}], pgs, rank_layers=False)
    rank_model(model, ranking, pgs)
    with torch.no_grad():
        assert _rel(_logits(model), before) <= TOL
    spec = SubnetSpec.homogeneous(cfg, moe_expert_ffn=8, moe_shared_ffn=12)
    kept, hidden = model.sliced_state_dict(spec), ranking.hidden

    def dealt(best: list[int], keep: int) -> list[int]:  # each block's prefix, block-major
        return best[0 : 2 * keep : 2] + best[1 : 2 * keep : 2]

    for j in MOE_LAYERS:
        p = f"decoder.layers.{j}.mlp."
        assert ranking.orders["moe_shared_ffn"][j] != list(range(24))  # the test permutes
        for pos, e in enumerate(ranking.orders["moe_experts"][j]):
            best = ranking.orders["moe_expert_ffn"][j][e]  # in the parent's expert numbering
            want = original[f"{p}experts.local_experts.{e}.linear_fc1.weight"][dealt(best, 4)]
            got = kept[f"{p}experts.local_experts.{pos}.linear_fc1.weight"]
            torch.testing.assert_close(got, want[:, hidden], rtol=0, atol=0)
        best = ranking.orders["moe_shared_ffn"][j]
        want = original[f"{p}shared_experts.linear_fc1.weight"][dealt(best, 6)]
        got = kept[f"{p}shared_experts.linear_fc1.weight"]
        torch.testing.assert_close(got, want[:, hidden], rtol=0, atol=0)
