"""The memory planner (megatron_elastic/planning/memory.py, tools/plan_memory.py): per-category
figures equal hand-computed numbers for a small config; its CPU activation terms equal what
autograd really saves in the student's layers; its 12B stage-2 predictions move the right way;
the CLI reports user errors as ``error: ...`` with exit status 2; the benchmark's CPU peak
counts frees made on threads the profiler does not record. Measured peaks of whole training
steps: benchmarks/bench_memory.py (docs/benchmarks.md)."""

from __future__ import annotations

import gc
import importlib.util
import re
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_elastic.config import ModelConfig, ParallelConfig, load_model_config
from megatron_elastic.model import count_parameters
from megatron_elastic.planning import (
    LayerShape,
    MemoryPlanConfig,
    format_plan,
    kd_loss_bytes,
    layer_activation_terms,
    plan_config_from_recipe,
    plan_memory,
)
from megatron_elastic.training.recipe import load_train_recipe

ROOT = Path(__file__).parents[2]
STAGE1 = ROOT / "examples" / "nemotron_nano_12b" / "stage1_8k.yaml"
STAGE2 = ROOT / "examples" / "nemotron_nano_12b" / "stage2_49k.yaml"
GIB = 1024**3

# Every dimension distinct, so a term with the wrong dimension cannot match by accident.
SMALL = ModelConfig(
    hybrid_pattern="M-*",
    hidden_size=96,
    ffn_hidden_size=160,
    num_attention_heads=6,
    num_query_groups=2,
    head_dim=24,
    mamba_num_heads=4,
    mamba_head_dim=20,
    mamba_num_groups=2,
    mamba_state_dim=12,
    vocab_size=512,
    mamba_chunk_size=32,
)


def _small(**kw) -> MemoryPlanConfig:
    base = dict(
        model=SMALL,
        parallel=ParallelConfig(),
        seq_length=128,
        micro_batch_size=1,
        num_micro_batches=2,
    )
    return MemoryPlanConfig(**{**base, **kw})


# --- hand-computed figures ----------------------------------------------------------------------


def test_small_config_static_figures_by_hand() -> None:
    # Parameters: embedding 512*96 + output 512*96 + final norm 96; Mamba: norm 96, in_proj
    # 96*(2*80 + 2*2*12 + 4) = 20352, conv (80+48)*(4+1) = 640, dt_bias/A_log/D 12, gated norm 80,
    # out_proj 80*96 = 7680 -> 28860; MLP 96 + 2*96*160 = 30816; attention 96 + 96*(6+2*2)*24 +
    # 6*24*96 = 36960.
    params = 49152 + 49152 + 96 + 28860 + 30816 + 36960
    assert params == count_parameters(SMALL) == 195036
    (stage,) = plan_memory(_small()).stages
    assert stage.static["student weights"] == 4 * params
    assert stage.static["gradients (fp32 buffer)"] == 4 * params
    assert stage.static["optimizer state"] == 8 * params  # Adam moments, fp32 weights
    assert stage.static["teacher weights"] == 4 * params
    # TP 2: the three pre-norms and the final norm (4 x 96) whole on each rank, the rest halved.
    (tp2,) = plan_memory(_small(parallel=ParallelConfig(tensor_parallel_size=2))).stages
    assert tp2.static["student weights"] == 4 * (4 * 96 + (params - 4 * 96) / 2) == 4 * 97710
    # every core attention is causal SDPA: no (b*heads, s, s) score buffer; no SP gather either
    assert not any("global buffer" in k for k in stage.static)
    # bf16 on GPU: 2-byte weights, fp32 master + moments (12 B) sharded over DP 4
    (gpu,) = plan_memory(
        _small(profile="gpu-bf16", distributed_optimizer=True, data_parallel_size=4)
    ).stages
    assert gpu.static["student weights"] == 2 * params
    assert gpu.static["gradients (fp32 buffer)"] == 4 * params
    assert gpu.static["optimizer state"] == 12 * params / 4
    assert not any("global buffer" in k for k in gpu.static)


# SMALL's sizes, for shapes written out below: b samples of s tokens, fp32 (4 bytes).
B, S, FP32 = 1, 128, 4
H, FFN = 96, 160
HEADS, GROUPS, HEAD_DIM = 6, 2, 24
M_HEADS, M_DIM, M_GROUPS, STATE, CHUNK, CONV = 4, 20, 2, 12, 32, 4
INNER = M_HEADS * M_DIM  # 80 Mamba channels
CHUNKS = S // CHUNK  # 4


def _norm_and_gate(tokens: int) -> list[int]:
    """Elements a pre-norm layer saves around its mixer (our RMSNorm and the depth gate)."""
    return [
        tokens * B * H,  # norm input x, (s, b, h): x.pow(2)'s input
        tokens * B * 1,  # rsqrt of its mean square, (s, b, 1)
        tokens * B * H,  # x * rsqrt, (s, b, h): the norm weight's multiply input
        tokens * B * H,  # norm output, (s, b, h): the first linear's input
        tokens * B * H,  # depth gate x + g * (f(x) - x) keeps f(x) - x, (s, b, h)
    ]


# What autograd saves for backward in one layer of each kind (each tensor listed once, with its
# shape; read off the graph of SMALL's slice-mode layers with router weights and gates, the path
# test_cpu_terms_equal_what_autograd_saves measures), in fp32 elements.
MLP_SAVED = [
    *_norm_and_gate(S),
    S * B * FFN,  # relu(fc1(x)), (s, b, f): input of its square
    S * B * FFN,  # relu(.)^2, (s, b, f): input of the router-weight multiply
    S * B * FFN,  # router-weighted, (s, b, f): fc2's input
]
ATTENTION_SAVED = [
    *_norm_and_gate(S),
    B * HEADS * S * HEAD_DIM,  # query, (b, heads, s, d), SDPA's
    B * HEADS * S * HEAD_DIM,  # key expanded to every query head, (b, heads, s, d)
    B * HEADS * S * HEAD_DIM,  # value expanded to every query head, (b, heads, s, d)
    B * HEADS * S,  # logsumexp, (b, heads, s)
    S * B * HEADS * HEAD_DIM,  # attention output, (s, b, heads * d): router-weight mul input
    S * B * HEADS * HEAD_DIM,  # router-weighted output, (s, b, heads * d): linear_proj's input
]
MAMBA_SAVED = [
    *_norm_and_gate(S),
    # in_proj output [z, x, B, C, dt], (b, s, 2 * 80 + 2 * 2 * 12 + 4 = 212): silu(z) keeps it
    B * S * (2 * INNER + 2 * M_GROUPS * STATE + M_HEADS),
    # causal conv1d output [x, B, C] before trimming its k - 1 padding, (b, s + 3, 80 + 48)
    B * (S + CONV - 1) * (INNER + 2 * M_GROUPS * STATE),
    B * S * (INNER + 2 * M_GROUPS * STATE),  # its silu, (b, s, 128)
    # dt: softplus input (b, s, nh); dt per chunk (b, c, L, nh) and (b, c, L, nh, 1, 1); decay
    # exponents (b, nh, c, 1, 1, L)
    B * S * M_HEADS,
    B * CHUNKS * CHUNK * M_HEADS,
    B * CHUNKS * CHUNK * M_HEADS,
    B * M_HEADS * CHUNKS * CHUNK,
    # x in chunks, (b, c, L, nh, hd, 1), and x * dt as two bmm operands, (b c nh, L, hd), (b c nh,
    # hd, L)
    B * CHUNKS * CHUNK * M_HEADS * M_DIM,
    B * CHUNKS * M_HEADS * CHUNK * M_DIM,
    B * CHUNKS * M_HEADS * M_DIM * CHUNK,
    # B and C per head: (b, c, nh, 1, n, L) and four bmm operands (b c nh, L, n) / (b c nh, n, L)
    B * CHUNKS * M_HEADS * STATE * CHUNK,
    B * CHUNKS * M_HEADS * CHUNK * STATE,
    B * CHUNKS * M_HEADS * CHUNK * STATE,
    B * CHUNKS * M_HEADS * STATE * CHUNK,
    B * CHUNKS * M_HEADS * CHUNK * STATE,
    B * CHUNKS * M_HEADS * STATE * M_DIM,  # chunk states, (b c nh, n, hd)
    B * M_HEADS * (CHUNKS + 1) * STATE * M_DIM,  # states across chunks, (b nh, c + 1, n hd)
    B * M_HEADS * (CHUNKS + 1) * (CHUNKS + 1),  # decay between chunks, (b nh, c + 1, c + 1)
    # within-chunk blocks: scores C.B (b, c, nh, L, L), the decay (b, c, nh, L, L), and their
    # product as a bmm operand (b c nh, L, L)
    B * CHUNKS * M_HEADS * CHUNK * CHUNK,
    B * CHUNKS * M_HEADS * CHUNK * CHUNK,
    B * CHUNKS * M_HEADS * CHUNK * CHUNK,
    # output side, each (b, s, 80) or (s, b, 80): scan output y, silu(z), y * silu(z) in groups
    # (s, b, g, 40) with its group rsqrt (s, b, g, 1), the normalised result, its weighted form
    # (router-weight mul input) and the router-weighted out_proj input
    B * S * INNER,
    B * S * INNER,
    S * B * INNER,
    S * B * M_GROUPS,
    S * B * INNER,
    S * B * INNER,
    S * B * INNER,
]
# Also saved, in bytes: the two (L, L) bool causal masks of the chunked scan. Left out by the
# planner (and here): two (c + 1, c + 1) bool masks, exp(A_log) and its product (nh each), two
# 0-dim router weights: 90 bytes in all.
MAMBA_BOOL_MASK_BYTES = 2 * CHUNK * CHUNK


def test_small_config_activation_figures_by_hand() -> None:
    (stage,) = plan_memory(_small()).stages
    assert stage.in_flight == 1  # PP 1: one micro-batch at a time
    assert stage.activations["mlp layers"] == FP32 * sum(MLP_SAVED)
    assert stage.activations["attention layers"] == FP32 * sum(ATTENTION_SAVED)
    assert stage.activations["mamba layers"] == FP32 * sum(MAMBA_SAVED) + MAMBA_BOOL_MASK_BYTES
    # First stage: the embedding output (s, b, h) and the int64 token ids (b, s). Last stage: the
    # final norm without a gate (its input, rsqrt, x * rsqrt and output, as above).
    embedding = FP32 * S * B * H + 8 * B * S
    final_norm = FP32 * sum(_norm_and_gate(S)[:4])
    assert stage.activations["embedding / final norm / pipeline buffers"] == (
        embedding + final_norm
    )
    # Last stage: student and teacher logits, (b, s, V) fp32 each, and the chunked KD loss's
    # backward (8 chunks): the logits' gradient and two fp32 (b s / 8, V) chunk temporaries
    # (q, p); its forward's three chunk temporaries are less. The (b s, 6) normaliser table.
    logits = B * S * SMALL.vocab_size
    kd = FP32 * (2 + 1 + 2 / 8) * logits + FP32 * 6 * B * S
    assert stage.transients["logits + KD temporaries"] == kd


def test_recompute_keeps_two_hidden_tensors_per_layer() -> None:
    (stage,) = plan_memory(_small(recompute=True)).stages
    # the checkpointed layer's input and the gate's f(x) - x, (s, b, h) each
    assert stage.activations["mlp layers"] == FP32 * 2 * S * B * H
    assert stage.activations["mamba layers"] == FP32 * 2 * S * B * H


def test_block_recompute_rebuilds_only_the_first_layers() -> None:
    """megatron's block method: the first N layers of a stage keep their input (and the gate's
    f(x) - x), the others everything; N = all layers is the uniform plan. (Measured against the
    trainer by benchmarks/bench_memory.py, seq1024-recompute-block4.)"""
    cfg = _small(recompute=True, recompute_num_layers=1)
    (stage,) = plan_memory(cfg).stages
    layers = cfg.layers()
    rest = sum(sum(layer_activation_terms(cfg, layer, H).values()) for layer in layers[1:])
    stored = sum(v for k, v in stage.activations.items() if k.endswith(" layers"))
    assert stored == pytest.approx(FP32 * 2 * S * B * H + rest)
    every = plan_memory(_small(recompute=True, recompute_num_layers=len(layers))).stages[0]
    assert every.peak == plan_memory(_small(recompute=True)).stages[0].peak
    none = plan_memory(_small()).stages[0]
    assert every.peak < stage.peak < none.peak
    with pytest.raises(ValueError, match="recompute_num_layers"):
        _small(recompute_num_layers=1)  # without recompute


def test_pipeline_in_flight_and_parallel_shards() -> None:
    one = plan_memory(_small(num_micro_batches=4)).stages[0]
    plan = plan_memory(
        _small(
            model=ModelConfig(**{**SMALL.__dict__, "hybrid_pattern": "M-*-"}),
            parallel=ParallelConfig(pipeline_parallel_size=2),
            num_micro_batches=4,
        )
    )
    assert [s.in_flight for s in plan.stages] == [2, 1]  # 1F1B: stage i keeps PP - i
    assert plan.stages[0].activations["mamba layers"] == 2 * one.activations["mamba layers"]
    tp2 = plan_memory(_small(parallel=ParallelConfig(tensor_parallel_size=2))).stages[0]
    sp = plan_memory(
        _small(parallel=ParallelConfig(tensor_parallel_size=2, sequence_parallel=True))
    ).stages[0]
    # TP 2: each rank keeps half the FFN neurons, (s, b, f / 2), and the whole hidden-width
    # tensors; SP also splits the hidden-width tensors' tokens over TP, (s / 2, b, h).
    mlp = lambda s: s.activations["mlp layers"]
    assert mlp(tp2) == FP32 * (sum(_norm_and_gate(S)) + 3 * S * B * (FFN // 2))
    assert mlp(sp) == FP32 * (sum(_norm_and_gate(S // 2)) + 3 * S * B * (FFN // 2))
    cp = plan_memory(_small(parallel=ParallelConfig(context_parallel_size=2))).stages[0]
    assert mlp(cp) == mlp(one) / 2
    # CP 2 attention: 64 local query tokens, keys and values all-gathered to 128 (global chunk
    # order). On CPU each local query chunk (global chunks 0 and 3 of 32 tokens on rank 0) is
    # left-padded to its visible keys, 32 and 128 rows: 160 = (CP + 1/2) * 64 rows.
    local, rows = S // 2, 160
    assert cp.activations["attention layers"] == FP32 * (
        sum(_norm_and_gate(local))
        + 2 * B * HEADS * rows * HEAD_DIM  # padded query and SDPA output, (b, heads, rows, d)
        + B * HEADS * rows  # logsumexp, (b, heads, rows)
        + local * B * HEADS * HEAD_DIM  # weighted output, (s / 2, b, heads d)
        + 2 * B * HEADS * S * HEAD_DIM  # gathered key, value per query head, (b, heads, s, d)
    )


# --- the CPU terms are what autograd saves ------------------------------------------------------


def _saved_storages(out: torch.Tensor, exclude: set[int]) -> dict[int, int]:
    """Bytes of every distinct storage autograd saved for ``out``'s backward (by data pointer;
    ``exclude``: the weights' pointers), found by walking the graph from ``out``."""
    found: dict[int, int] = {}
    seen_nodes = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        names = [a for a in dir(node) if a.startswith("_saved_")]
        saved = []
        for name in names:
            try:
                saved.append(getattr(node, name))
            except RuntimeError:
                pass
        if not names and hasattr(node, "saved_tensors"):
            saved = list(node.saved_tensors)  # custom autograd Functions (megatron's linears)
        for value in saved:
            for t in value if isinstance(value, tuple | list) else [value]:
                if isinstance(t, torch.Tensor):
                    key = t.untyped_storage().data_ptr()
                    if key not in exclude:
                        found.setdefault(key, t.untyped_storage().nbytes())
        stack += [n for n, _ in node.next_functions]
    return found


def _saved_bytes_per_layer(net, tokens: torch.Tensor) -> list[float]:
    """Bytes of distinct storages autograd saved during each decoder layer's forward (weights
    excluded)."""
    owner: dict[int, int] = {}
    current = [-1]
    for i, layer in enumerate(net.decoder.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
    net.decoder.final_norm.register_forward_pre_hook(lambda m, a: current.__setitem__(0, -2))

    def pack(t):
        owner.setdefault(t.untyped_storage().data_ptr(), current[0])
        return t

    b, s = tokens.shape
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(tokens, torch.arange(s).expand(b, s), None)
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    per_layer = [0.0] * len(net.decoder.layers)
    for key, nbytes in _saved_storages(out, weights).items():
        if owner.get(key, -1) >= 0:
            per_layer[owner[key]] += nbytes
    return per_layer


def test_cpu_terms_equal_what_autograd_saves(pgs) -> None:
    from megatron_elastic.elastic import (
        ElasticConfig,
        SubnetSpec,
        SubnetWeights,
        build_elastic_model,
    )

    torch.manual_seed(0)
    net = build_elastic_model(SMALL, ElasticConfig(budgets={"full": 1.0}), pgs)
    net.train()
    w = torch.ones((), requires_grad=True)
    n = SMALL.num_layers
    net.set_subnet(  # the training path: router scalars on every axis and depth gate
        SubnetSpec.full(SMALL),
        SubnetWeights(hidden=w * 1, layers=(w * 1,) * n, gates=(w * 1,) * n),
    )
    tokens = torch.randint(0, SMALL.vocab_size, (2, 96))
    measured = _saved_bytes_per_layer(net, tokens)
    cfg = _small(seq_length=96, micro_batch_size=2)
    predicted = [
        sum(layer_activation_terms(cfg, layer, SMALL.hidden_size).values())
        for layer in cfg.layers()
    ]
    assert predicted == pytest.approx(measured, rel=2e-3), (predicted, measured)


# --- mixture-of-experts layers -------------------------------------------------------------------

# Nemotron 3 style (sigmoid router with expert bias, scaled top-2, aux loss and z-loss, a shared
# expert): hidden 32, 8 experts of 16 neurons, shared expert 24, vocabulary 128, pattern "ME*E".
MOE = load_model_config(ROOT / "tests" / "fixtures" / "hybrid_moe_small.yaml")
MOE_LAYERS = _small(model=MOE).layers()


def test_moe_static_figures_by_hand() -> None:
    # Embedding 128*32*2 + final norm 32 = 8224. Mamba (4 heads of 8, 2 groups, state 8): norm 32,
    # in_proj 32*(2*32 + 2*2*8 + 4) = 3200, conv (32+32)*(4+1) = 320, per head 12, gated norm 32,
    # out_proj 32*32 = 1024 -> 4620. Attention: norm 32, qkv 32*(4+2*2)*8 = 2048, proj 1024 ->
    # 3104. MoE: norm 32, router gate 8*32 = 256, shared expert 2*32*24 = 1536 (dense 1824), and
    # 8 routed experts of 2*32*16 = 1024 each (8192).
    dense = 8224 + 4620 + 3104 + 2 * 1824
    routed = 2 * 8192
    assert dense + routed == count_parameters(MOE) == 35980
    (one,) = plan_memory(_small(model=MOE, seq_length=48)).stages
    assert one.static["student weights"] == 4 * (dense + routed)
    assert one.static["optimizer state"] == 8 * (dense + routed)
    assert not any("global buffer" in k for k in one.static)
    # EP 2 on 2 data-parallel ranks (expert-DP 1), bf16, distributed optimizer: each rank holds
    # 4 of the 8 experts; the dense weights' Adam state is sharded over DP 2, the experts' over
    # expert-DP = DP x CP / EP = 1; the all-gather dispatcher gathers 2 ranks' tokens.
    ep2 = _small(
        model=MOE,
        seq_length=48,
        parallel=ParallelConfig(expert_model_parallel_size=2),
        data_parallel_size=2,
        distributed_optimizer=True,
        profile="gpu-bf16",
    )
    assert ep2.expert_data_parallel_size == 1
    (stage,) = plan_memory(ep2).stages
    local = dense + routed / 2
    assert stage.static["student weights"] == 2 * local
    assert stage.static["teacher weights"] == 2 * local
    assert stage.static["gradients (fp32 buffer)"] == 4 * local
    assert stage.static["optimizer state"] == 12 * (dense / 2 + routed / 2)
    assert stage.static["megatron global buffer (MoE dispatch gather)"] == 2 * 2 * 48 * 32
    # EP 2 with DP 4: expert-DP 2 halves the experts' optimizer state again
    ep2dp4 = plan_memory(replace(ep2, data_parallel_size=4)).stages[0]
    assert ep2dp4.static["optimizer state"] == 12 * (dense / 4 + routed / 2 / 2)


def test_moe_expert_parallel_bad_input() -> None:
    ep = lambda n, **kw: _small(
        model=MOE, seq_length=48, parallel=ParallelConfig(expert_model_parallel_size=n), **kw
    )
    # the experts' count and their absence: config.check_parallel_fit (recipes reach it too)
    with pytest.raises(ValueError, match=r"=3: ModelConfig.num_moe_experts=8 is not divisible"):
        ep(3, data_parallel_size=3)
    with pytest.raises(ValueError, match=r"does not divide data-parallel x context-parallel"):
        ep(4, data_parallel_size=2)
    with pytest.raises(ValueError, match="has no 'E'"):
        _small(parallel=ParallelConfig(expert_model_parallel_size=2), data_parallel_size=2)


def test_moe_activation_figures_by_hand() -> None:
    """One E layer of the fixture, t = 96 tokens, fp32: the router's tensors written out."""
    t, h, f, fs, e, k = 96, 32, 16, 24, 8, 2
    cfg = _small(model=MOE, seq_length=48, micro_batch_size=2)
    terms = layer_activation_terms(cfg, cfg.layers()[1], h)
    routed = k * t * (FP32 * (2 * h + 3 * f) + FP32 + 8)  # + fp32 prob, int64 token index
    dispatcher = t * e * (FP32 + 1)  # masked_select's local probs (fp32) and map (bool)
    widened = FP32 * t * e + 8 * e  # slice mode's index_copy: kept probs, kept-expert index
    shared = FP32 * 3 * t * fs
    router = FP32 * t * e + 8 * t * k + FP32 * t * (k + 1)  # scores, indices, top-k + sum
    z_loss = FP32 * t * (e + 1) + FP32  # logits, logsumexp; the 0-dim loss
    aux = FP32 * t * (e + 1) + 8 * e + FP32  # scores + sum, int64 counts per expert; the loss
    norm = FP32 * t * (4 * h + 1)
    assert sum(terms.values()) == (
        routed + dispatcher + widened + shared + router + z_loss + aux + norm
    )


MOE_ROUTERS = {  # (the fixture's: sigmoid, expert bias, aux loss, z-loss)
    "nemotron3": {},
    "softmax_topk3_no_shared_no_losses": {
        "moe_router_score_function": "softmax",
        "moe_router_enable_expert_bias": False,
        "moe_router_topk_scaling_factor": None,
        "moe_shared_expert_intermediate_size": None,
        "moe_router_topk": 3,
        "moe_z_loss_coeff": None,
        "moe_aux_loss_coeff": 0.0,
    },
    "pre_softmax_top1": {
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": True,
        "moe_router_enable_expert_bias": False,
        "moe_router_topk": 1,
    },
    "sigmoid_group_limited_no_bias": {
        "moe_router_enable_expert_bias": False,
        "moe_router_num_groups": 4,
        "moe_router_group_topk": 2,
    },
}


def _elastic_moe_net(pgs, model: ModelConfig, **sizes: int):
    """The elastic student of ``model`` on the training path (router scalars on every axis and
    the depth gate): its full budget, or the homogeneous sub-network of ``sizes`` (axis names,
    and ``hidden``)."""
    from megatron_elastic.elastic import (
        ElasticConfig,
        SubnetSpec,
        SubnetWeights,
        build_elastic_model,
    )

    torch.manual_seed(0)
    net = build_elastic_model(model, ElasticConfig(budgets={"full": 1.0}), pgs)
    net.train()
    w = torch.ones((), requires_grad=True)
    n = model.num_layers
    net.set_subnet(
        SubnetSpec.homogeneous(model, **sizes),
        SubnetWeights(hidden=w * 1, layers=(w * 1,) * n, gates=(w * 1,) * n),
    )
    return net


@pytest.mark.parametrize("router", MOE_ROUTERS)
def test_moe_terms_equal_what_autograd_saves(pgs, router: str) -> None:
    """The planner's E-layer terms against the bytes autograd saves in the student's slice-mode
    MoE layer (router scalars on every axis and the depth gate, as in training)."""
    model = replace(MOE, **MOE_ROUTERS[router])
    net = _elastic_moe_net(pgs, model)
    measured = _saved_bytes_per_layer(net, torch.randint(0, model.vocab_size, (2, 48)))
    cfg = _small(model=model, seq_length=48, micro_batch_size=2)
    for j, layer in enumerate(cfg.layers()):
        if layer.kind == "moe":
            predicted = sum(layer_activation_terms(cfg, layer, model.hidden_size).values())
            assert predicted == measured[j], (j, predicted, measured[j])


def test_moe_subnet_terms_equal_what_autograd_saves(pgs) -> None:
    """A sub-network (4 of 8 experts of 12 neurons, shared expert 20, hidden 28): the terms
    that follow the kept experts (router, widened probabilities) and those that follow the
    parent's (the dispatcher's one column per parent expert) are told apart."""
    sizes = {"moe_experts": 4, "moe_expert_ffn": 12, "moe_shared_ffn": 20}
    net = _elastic_moe_net(pgs, MOE, hidden=28, **sizes)
    measured = _saved_bytes_per_layer(net, torch.randint(0, MOE.vocab_size, (2, 48)))
    layers = tuple(
        LayerShape("moe", 4, expert_ffn=12, shared_ffn=20) if layer.kind == "moe" else layer
        for layer in MOE_LAYERS
    )
    cfg = _small(model=MOE, seq_length=48, micro_batch_size=2, student_layers=layers)
    for j in (1, 3):
        predicted = sum(layer_activation_terms(cfg, layers[j], 28).values())
        assert predicted == measured[j], (j, predicted, measured[j])


def test_moe_bf16_terms_equal_what_autograd_saves(pgs) -> None:
    """The gpu-bf16 profile's E-layer terms: the student runs the same MoE code on GPU, so its
    bf16 graph on CPU saves what it saves there (the router in fp32, bf16 expert tensors; the
    fp32 probability products are cast back before the index_add). One E layer in bf16 on a
    bf16 input; the depth gate's bf16 f(x) - x (outside the layer) is added by hand."""
    net = _elastic_moe_net(pgs, MOE)
    layer = net.decoder.layers[1].to(torch.bfloat16)
    x = torch.randn(48, 2, MOE.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    out, _ = layer(hidden_states=x, attention_mask=None)
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    measured = sum(_saved_storages(out, weights).values()) + 2 * x.numel()
    cfg = _small(model=MOE, seq_length=48, micro_batch_size=2, profile="gpu-bf16")
    predicted = sum(layer_activation_terms(cfg, cfg.layers()[1], MOE.hidden_size).values())
    # left out by the planner: the norm weight's fp32 copy (4 h bytes), the 0-dim bf16 scalar
    assert predicted == pytest.approx(measured, rel=2e-3), (predicted, measured)


def _allocator_peak(fn) -> int:
    """Peak of the CPU allocator's live bytes while ``fn`` runs, above those live before (one
    thread: the byte deltas of torch.profiler's memory events, as bench_memory_worker reads
    them)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            deltas.append((e.start_time_ns, e.extra_fields.alloc_size))
    live = peak = 0
    for _, delta in sorted(deltas):
        live += delta
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(
    ("profile", "chunks", "ce_trained"),
    [("cpu-fp32", 8, False), ("cpu-fp32", 1, False), ("gpu-bf16", 8, False), ("cpu-fp32", 4, True)],
)
def test_kd_term_is_the_measured_peak_of_the_chunked_loss(profile, chunks, ce_trained) -> None:
    """The planner's logits + KD term against the allocator peak of the loss's forward and
    backward (the logged CE included) on top of the two logits tensors (bf16 on CPU allocates
    what it does on GPU)."""
    from megatron_elastic.distill import kd_and_ce_loss

    cfg = _small(
        seq_length=256,
        micro_batch_size=2,
        profile=profile,
        loss_chunks=chunks,
        ce_trained=ce_trained,
    )
    dtype = torch.float32 if profile == "cpu-fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 256, SMALL.vocab_size, generator=g).to(dtype)
    teacher = torch.randn(2, 256, SMALL.vocab_size, generator=g).to(dtype)
    labels = torch.randint(0, SMALL.vocab_size, (2, 256), generator=g)

    def step() -> None:  # (everything it allocates is freed inside the profile)
        logits = student.detach().requires_grad_()  # the student's logits, no copy
        kd, ce = kd_and_ce_loss(logits, teacher, labels, 1.0, None, chunks)
        (kd.sum() + (ce.sum() if ce_trained else 0)).backward()

    measured = _allocator_peak(step) + 2 * student.numel() * student.element_size()
    assert kd_loss_bytes(cfg) == pytest.approx(measured, rel=0.01), (kd_loss_bytes(cfg), measured)


# --- the 12B recipes ----------------------------------------------------------------------------


def _peak(path: Path, *overrides: str) -> float:
    recipe = load_train_recipe(path, list(overrides))
    return plan_memory(plan_config_from_recipe(recipe, world_size=128)).peak / GIB


def test_12b_stage2_predictions_move_the_right_way() -> None:
    base = _peak(STAGE2)
    assert _peak(STAGE2, "parallel.sequence_parallel=false") > base  # SP lowers the peak
    assert _peak(STAGE2, "parallel.context_parallel_size=2") < base  # CP lowers it
    off = "train.recompute_granularity=null"
    assert _peak(STAGE2, off) > base  # recompute lowers it
    # recomputing the first 14 of the 62 layers only lies between (block method)
    block = ("train.recompute_method=block", "train.recompute_num_layers=14")
    assert base < _peak(STAGE2, *block) < _peak(STAGE2, off)
    bare = _peak(STAGE2, "parallel.sequence_parallel=false", off)
    assert bare > 80  # neither: does not fit an 80 GB H100
    assert base < 70  # the recipe's layout fits with headroom


def test_12b_recipes_fit_an_h100() -> None:
    for path in (STAGE1, STAGE2):
        assert _peak(path) < 70, path


NANO3 = ROOT / "examples" / "nemotron3_nano_30b"


@pytest.mark.parametrize("name", ["stage1_8k.yaml", "stage2_49k.yaml"])
def test_30b_recipes_fit_an_h100_as_their_comments_say(name: str) -> None:
    """The Nemotron 3 Nano 30B stage recipes (EP 8 x PP 2, TP 1) fit an 80 GB H100 with headroom
    for routing imbalance; the peak in their comments is the planner's; without EP they do not
    fit."""
    path = NANO3 / name
    peak = _peak(path)
    assert peak < 50, peak
    stated = re.search(r"^#\s+peak GiB per GPU: ([\d.]+)$", path.read_text(), re.M)
    assert float(stated.group(1)) == pytest.approx(peak, abs=0.005)
    assert _peak(path, "parallel.expert_model_parallel_size=1") > 80
    recipe = load_train_recipe(path)
    cfg = plan_config_from_recipe(recipe, world_size=128)
    p = recipe.parallel  # expert-DP: the DP x CP ranks over EP (64 non-pipeline ranks / 8)
    assert cfg.expert_data_parallel_size == cfg.data_parallel_size * p.context_parallel_size // 8
    assert cfg.expert_data_parallel_size == 8
    assert sum(layer.kind == "moe" for layer in cfg.layers()) == 23


def test_largest_budget_bounds_the_student() -> None:
    recipe = load_train_recipe(STAGE2)
    cfg = plan_config_from_recipe(recipe, world_size=128)
    assert cfg.student_hidden == recipe.model.hidden_size  # 12B: the parent itself
    assert all(layer.active for layer in cfg.student_layers)
    assert cfg.num_micro_batches == 512 // (1 * 128 // (4 * 1))  # TP 4, PP 1
    assert cfg.router_params > 0


def test_bad_input_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not a multiple of TP x PP x CP"):
        plan_config_from_recipe(load_train_recipe(STAGE2), world_size=126)
    with pytest.raises(ValueError, match="profile="):
        _small(profile="tpu")
    with pytest.raises(ValueError, match="planner models full recomputation only"):
        recipe = load_train_recipe(STAGE2, ["train.recompute_granularity=selective"])
        plan_config_from_recipe(recipe, world_size=128)
    with pytest.raises(ValueError, match="student_layers lists 1 layers"):
        _small(student_layers=(LayerShape("mlp", 160),))


# --- the CLI ------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plan_memory.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_prints_the_table_and_the_peak_last() -> None:
    pp2 = "parallel.pipeline_parallel_size=2"  # (stage 2's recipe runs PP 1: a column per stage)
    done = _cli("--recipe", str(STAGE2), pp2)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("peak GiB per GPU: "), lines[-1]
    assert float(lines[-1].split(": ")[1]) == pytest.approx(_peak(STAGE2, pp2), abs=0.01)
    for label in ("student weights", "optimizer state", "teacher weights", "mamba layers"):
        assert any(label in line for line in lines), label
    assert "stage 0" in done.stdout and "stage 1" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["parallel.tensor_parallel_size=3"], "not divisible by tensor_parallel_size=3"),
        (["train.stpes=3"], "did you mean 'steps'"),
        (["--world-size", "126"], "not a multiple of TP x PP x CP"),
    ],
)
def test_cli_user_errors_exit_2(args: list[str], message: str, capsys) -> None:
    """In this process (the table test above runs the CLI as its own process): a user error
    returns 2 with one ``error:`` line and raises nothing."""
    path = ROOT / "tools" / "plan_memory.py"
    spec = importlib.util.spec_from_file_location("plan_memory_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--recipe", str(STAGE2), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_format_plan_ends_with_the_peak() -> None:
    text = format_plan(plan_memory(_small()))
    assert text.splitlines()[-1] == f"peak GiB per GPU: {plan_memory(_small()).peak / GIB:.2f}"


def test_benchmark_peak_counts_frees_made_on_other_threads() -> None:
    """The CPU peak bench_memory_worker measures (planning/measure.py): a tensor whose last
    reference is dropped on a thread the profiler does not record (as gloo's worker threads
    drop the tensors of a collective) is freed there; the allocator's all-thread counter sees
    it, a replay of the profiler's byte deltas does not and keeps counting it."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from megatron_elastic.planning.measure import cpu_peak, track_all_threads

    mib = 1024**2
    previous = track_all_threads()
    gc.collect()
    gc.disable()  # a collection inside the window would free tensors the test does not count
    try:
        # live and counted before the profile (as a trainer's model is after its window turned
        # counting on): the window's figures start from the counter's value, not from 0
        kept = torch.empty(mib)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with record_function("window"):
                for _ in range(3):
                    held = [torch.empty(mib // 4)]  # 1 MiB of fp32, allocated here
                    thread = threading.Thread(target=held.clear)  # ... and freed there
                    thread.start()
                    thread.join()
    finally:
        gc.enable()
        track_all_threads(previous)
    result = cpu_peak(prof, "window")
    assert result["start_bytes"] >= kept.nbytes
    assert result["peak_bytes"] - result["start_bytes"] == mib
    assert result["replay_peak_bytes"] == 3 * mib
    # at the last recorded event (the third allocation) the replay lacks the first two frees
    assert result["untracked_free_bytes"] == 2 * mib


def test_cpu_window_peak_survives_garbage_collected_after_its_baseline() -> None:
    """The trainer's CPU peak window (planning/measure.py) reads its baseline after collecting
    unreachable cycles: an earlier object's tensor freed by a later collection would otherwise
    lower the live-bytes counter below the baseline and hide the window's peak (seen in the
    full suite: a trainer built after other tests logged no memory)."""
    from megatron_elastic.planning.measure import CpuPeakWindow, track_all_threads

    mib = 1024**2

    class Cycle:
        pass

    previous = track_all_threads()
    try:
        garbage = Cycle()
        garbage.self, garbage.tensor = garbage, torch.ones(64 * mib // 4)
        del garbage  # unreachable, still allocated until a collection
        window = CpuPeakWindow()
        gc.collect()  # Python's automatic collection, say while the trainer builds its model
        gc.disable()  # (and none inside the window: the test counts what it allocates)
        window.start()
        held = torch.empty(mib // 4)
        peak = window.stop()
        del held
    finally:
        gc.enable()
        track_all_threads(previous)
    assert abs(peak - mib) <= 1024, peak  # the window's 1 MiB (less the baseline's probe)


def test_cpu_measurements_leave_each_other_running() -> None:
    """``measure_cpu_peak`` restores the all-thread counting it found (a live trainer window
    relies on it), and a window closed unread (a step that raised) lets later windows open."""
    from megatron_elastic.planning.measure import (
        CpuPeakWindow,
        measure_cpu_peak,
        track_all_threads,
    )

    previous = track_all_threads(True)
    try:
        with measure_cpu_peak():
            torch.empty(16)
        assert track_all_threads(True) is True
        window = CpuPeakWindow()
        window.start()
        window.close()
        assert not window.running and not torch.autograd._profiler_enabled()
        other = CpuPeakWindow()
        other.start()
        assert other.running
        other.stop()
    finally:
        track_all_threads(previous)
