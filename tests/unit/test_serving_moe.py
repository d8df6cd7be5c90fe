"""Serving mixture-of-experts budgets (issue 26 step 6): cached decoding of a tiny hybrid MoE
parent equals the elastic model's own forward (recomputation) at the parent, at homogeneous
budgets with fewer and narrower experts and a narrower shared expert, at per-layer MoE sizes, and
for every router kind (softmax top-3 without a shared expert, group-limited sigmoid);
self-speculative decoding at an MoE budget equals the verifier's greedy tokens; the serving
network's weights are what the budget's parameter count says."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from moe_fixture import MOE_YAML, ROUTERS, moe_elastic_model, randomise_moe

from megatron_elastic.config import ModelConfig, load_model_config
from megatron_elastic.elastic import ElasticConfig, SubnetSpec, build_elastic_model
from megatron_elastic.elastic.budget import subnet_memory
from megatron_elastic.eval import greedy_generate
from megatron_elastic.eval.sweep import serving_memory
from megatron_elastic.serving import InferenceState, build_serving_net, cached_generate, forward
from megatron_elastic.serving.speculative import speculative_generate
from megatron_elastic.training.lm_step import position_ids_like

NEW = 10
LOGITS_TOL = 3e-6
"""Max |cached - recomputed| logits (scale ~1): fp32 summation order only (chunked scan vs the
recurrence, tokens gathered per expert vs megatron's dispatcher). Measured worst 1.3e-6."""


def _model(cfg: ModelConfig, pgs):
    return moe_elastic_model(cfg, pgs)


@pytest.fixture(scope="module")
def moe_config() -> ModelConfig:
    return load_model_config(MOE_YAML)


@pytest.fixture(scope="module")
def moe_model(moe_config, pgs):
    return _model(moe_config, pgs)


def _spec(cfg: ModelConfig, name: str) -> SubnetSpec | None:
    if name == "parent":
        return None
    if name == "per_layer":  # "ME*E": the two MoE layers differ on every axis
        return SubnetSpec.heterogeneous(
            cfg,
            moe_experts=[0, 3, 0, 6],
            moe_expert_ffn=[0, 12, 0, 4],
            moe_shared_ffn=[0, 24, 0, 8] if cfg.moe_shared_expert_intermediate_size else None,
        )
    shared = {"moe_shared_ffn": 12} if cfg.moe_shared_expert_intermediate_size else {}
    return SubnetSpec.homogeneous(cfg, hidden=24, moe_experts=4, moe_expert_ffn=8, **shared)


def _check_cached_equals_recompute(model, cfg: ModelConfig, spec: SubnetSpec | None) -> None:
    net = build_serving_net(model, cfg, spec)
    kept = [layer.num_experts for layer in net.layers if layer.kind == "moe"]
    expected = (
        [cfg.num_moe_experts] * 2
        if spec is None
        else [c.size("moe_experts") for c in spec.layers if c.kind == "moe"]
    )
    assert kept == expected
    model.set_subnet(spec, mode="slice")
    try:
        # a long prefill (chunked scan), single steps, a short chunk (the recurrence), the rest
        tokens = torch.randint(
            0, cfg.vocab_size, (2, 44), generator=torch.Generator().manual_seed(1)
        )
        with torch.no_grad():
            ref = model(tokens, position_ids_like(tokens), None)
        state = InferenceState(net, 2, 48)
        pieces = [forward(net, tokens[:, :20], state)]
        pieces += [forward(net, tokens[:, t : t + 1], state) for t in range(20, 24)]
        pieces += [forward(net, tokens[:, 24:29], state), forward(net, tokens[:, 29:], state)]
        diff = (torch.cat(pieces, 1) - ref).abs().max().item()
        print(f"MoE cached vs recompute: max |diff| = {diff:.3g}")
        assert diff <= LOGITS_TOL, diff
        prompts = [tokens[0, :7].tolist(), tokens[1, :3].tolist()]
        greedy = greedy_generate(model, prompts, max_new_tokens=NEW)
        assert cached_generate(net, prompts, max_new_tokens=NEW) == greedy
    finally:
        model.set_subnet(None)


@pytest.mark.parametrize("name", ["parent", "homogeneous", "per_layer"])
def test_invariant_moe_cached_equals_recompute(moe_model, moe_config, name) -> None:
    _check_cached_equals_recompute(moe_model, moe_config, _spec(moe_config, name))


@pytest.mark.parametrize("router", list(ROUTERS)[1:])
def test_invariant_moe_cached_equals_recompute_for_every_router(pgs, moe_config, router) -> None:
    cfg = dataclasses.replace(moe_config, **ROUTERS[router])
    model = _model(cfg, pgs)
    for name in ("parent", "homogeneous"):
        _check_cached_equals_recompute(model, cfg, _spec(cfg, name))


def test_invariant_moe_speculative_equals_verifier_greedy(moe_model, moe_config) -> None:
    """An MoE budget verifies, a smaller MoE budget drafts."""
    cfg = moe_config
    verifier = build_serving_net(
        moe_model, cfg, SubnetSpec.homogeneous(cfg, moe_experts=6, moe_expert_ffn=12)
    )
    draft = build_serving_net(
        moe_model, cfg, SubnetSpec.homogeneous(cfg, moe_experts=4, moe_expert_ffn=12)
    )
    prompts = [[5, 9, 17], [3, 1, 4, 1, 5, 9, 2, 6]]
    expected = cached_generate(verifier, prompts, max_new_tokens=NEW)
    for k in (1, 3):
        got, stats = speculative_generate(
            verifier, draft, prompts, draft_tokens=k, max_new_tokens=NEW
        )
        assert got == expected and stats.proposed > 0
    assert 0 < stats.acceptance_rate < 1  # the draft is a different function


@pytest.mark.parametrize("name", ["parent", "homogeneous", "per_layer"])
def test_moe_serving_memory_is_the_planners_count(moe_model, moe_config, name) -> None:
    """What the sweep reports for an MoE budget: the serving network's weights are the budget's
    parameters (the router's expert bias is a buffer, not a weight) and its decode state is the
    planner's, less the conv column the planner counts per Mamba layer."""
    spec = _spec(moe_config, name) or SubnetSpec.full(moe_config)
    net = build_serving_net(moe_model, moe_config, _spec(moe_config, name))
    mem = serving_memory(net, moe_model, capacity=12)
    plan = subnet_memory(moe_config, spec, seq_length=12, param_bytes=4, state_bytes=4)
    assert mem["weights_bytes"] == plan.weights
    column = 4 * (
        moe_config.mamba_num_heads * moe_config.mamba_head_dim
        + 2 * moe_config.mamba_num_groups * moe_config.mamba_state_dim
    )
    assert mem["state_bytes"] == plan.kv_cache + plan.mamba_state - column
    # kept experts, their kept neurons and the kept hidden width are prefixes: all views
    assert mem["copied_bytes"] == 0


def test_server_serves_an_elastic_moe_checkpoint(moe_config, pgs, tmp_path) -> None:
    """``serving/api.py`` loads an elastic MoE checkpoint and answers greedy completions at the
    full budget and an MoE sub-budget with the elastic model's own (recomputed) greedy tokens."""
    from fastapi.testclient import TestClient

    from megatron_elastic.checkpoint import save_checkpoint
    from megatron_elastic.data.tokenizers import train_bpe_tokenizer
    from megatron_elastic.router import ElasticRouter, RouterConfig, router_state
    from megatron_elastic.serving.api import create_app, load_models

    cfg = dataclasses.replace(moe_config, vocab_size=320)  # the tokenizer's 300 ids fit
    small = {"hidden": 24, "moe_experts": 4, "moe_expert_ffn": 8, "moe_shared_ffn": 12}
    elastic = ElasticConfig(
        budgets={"full": 1.0, "small": 0.7},
        hidden_choices=(24, 32),
        choices={"moe_experts": (4,), "moe_expert_ffn": (8,), "moe_shared_ffn": (12,)},
        budget_choices={"small": small},
    )
    torch.manual_seed(0)
    model = build_elastic_model(cfg, elastic, pgs)
    randomise_moe(model)
    router = ElasticRouter(cfg, elastic, RouterConfig(anneal_steps=1, fixed=True))
    save_checkpoint(tmp_path / "ckpt", model, cfg, kind="elastic", extra=router_state(router))
    texts = [f"Question: What is {a} + {b}?\nAnswer: {a + b}" for a in range(20) for b in range(9)]
    train_bpe_tokenizer(texts, 300, tmp_path / "tok" / "tokenizer.json")
    models = load_models(tmp_path / "ckpt", pgs, tokenizer=tmp_path / "tok")
    tok, prompt = models.tokenizer, "Question: What is 3 + 4?\nAnswer:"
    with TestClient(create_app(models, batch_window_s=0.05)) as client:
        for budget in ("full", "small"):
            body = {"model": f"elastic@{budget}", "prompt": prompt, "max_tokens": NEW}
            response = client.post("/v1/completions", json={**body, "temperature": 0})
            assert response.status_code == 200, response.text
            spec = None if budget == "full" else SubnetSpec.homogeneous(cfg, **small)
            model.set_subnet(spec, mode="slice")
            try:
                want = greedy_generate(
                    model,
                    [tok.encode(prompt)],
                    max_new_tokens=NEW,
                    eos_id=tok.eod,
                    vocab_size=tok.vocab_size,
                ).tokens[0]
            finally:
                model.set_subnet(None)
            assert response.json()["choices"][0]["text"] == tok.decode(want), budget
