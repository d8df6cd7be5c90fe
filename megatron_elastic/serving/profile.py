"""Measure a :class:`~megatron_elastic.elastic.latency.LatencyTable` on this device: the serving
path's time per token for every layer kind at every candidate size of an elastic recipe.

Each grid point builds :data:`COPIES` layers of that shape (random weights: timing does not
depend on the values; distinct tensors, so each call finds its weights out of the CPU caches as
in a whole model, which a single layer timed in a loop would not) and times
:func:`~megatron_elastic.serving.forward.layer_forward`, the code cached
generation runs: ``decode`` = one token with ``context`` tokens in the layer's cache (attention
reads them all; Mamba's state is constant-size), ``prefill`` = a ``prefill_tokens`` prompt,
divided by its length. ``base`` = a whole forward step without layers (embedding, final norm,
output layer, the step's bookkeeping). Each figure is the fastest of ``repeats`` timings after a
warm-up (other work on the machine only adds time), each timing starting with cold CPU caches
(:data:`FLUSH_BYTES` written first): in a decode step every layer's weights have been pushed out
by the other layers' since its last use, and a table timed with warm caches undershoots a whole
step by ~40% (measured on the tiny model).
"""

from __future__ import annotations

import dataclasses
import platform
import time

import torch
import torch.nn.functional as F

from megatron_elastic.config import ModelConfig
from megatron_elastic.elastic.config import ElasticConfig
from megatron_elastic.elastic.latency import PHASES, LatencyTable
from megatron_elastic.model.layouts import AttentionLayout, MambaLayout
from megatron_elastic.serving.forward import forward, layer_forward
from megatron_elastic.serving.net import ServingLayer, ServingNet
from megatron_elastic.serving.state import InferenceState

__all__ = ["COPIES", "FLUSH_BYTES", "profile_latency"]

COPIES = 6
"""Layers of one shape timed in a row per grid point (their weights differ)."""
FLUSH_BYTES = 64 * 2**20
"""Bytes written before every timing to evict the CPU caches."""


def _best_seconds(fn, repeats: int, flush: torch.Tensor) -> float:
    """Fastest of ``repeats`` calls of ``fn``, each after writing ``flush`` (a buffer larger than
    the CPU's caches, so the call reads its weights from memory as in a whole model's step)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        flush.fill_(1.0)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _layer(model: ModelConfig, kind: str, hidden: int, width: int, head_dim: int, gen, **kw):
    def rand(*shape):
        return torch.randn(*shape, generator=gen, **kw) * 0.02

    norm = torch.ones(hidden, **kw)
    if kind == "mamba":
        groups, state = model.mamba_num_groups, model.mamba_state_dim
        layout = MambaLayout(width, head_dim, groups, state)
        inner, channels = layout.inner, layout.conv.size
        w = {
            "norm": norm,
            "in_proj": rand(layout.in_proj.size, hidden),
            "conv_weight": rand(channels, 1, model.mamba_conv_kernel),
            "conv_bias": rand(channels),
            "dt_bias": rand(width),
            "A_log": rand(width),
            "D": torch.ones(width, **kw),
            "norm_weight": torch.ones(inner, **kw),
            "out_proj": rand(hidden, inner),
        }
        return ServingLayer(0, kind, w, width, head_dim, groups, state)
    if kind == "attention":
        groups, d = model.num_query_groups, model.head_dim
        w = {
            "norm": norm,
            "qkv": rand(AttentionLayout(groups, width // groups, d).size, hidden),
            "proj": rand(hidden, width * d),
        }
        return ServingLayer(0, kind, w, width, d, groups)
    return ServingLayer(
        0, kind, {"norm": norm, "fc1": rand(width, hidden), "fc2": rand(hidden, width)}
    )


def _net(model: ModelConfig, layer: ServingLayer, hidden: int, gen, **kw) -> ServingNet:
    vocab = torch.randn(model.vocab_size, hidden, generator=gen, **kw) * 0.02
    return ServingNet(
        hidden=hidden,
        embedding=vocab,
        layers=(layer,),
        final_norm=torch.ones(hidden, **kw),
        output=vocab,
        eps=model.layernorm_epsilon,
        activation=lambda x: F.relu(x).square(),
        chunk_size=model.mamba_chunk_size,
        conv_kernel=model.mamba_conv_kernel,
        max_sequence_length=1 << 30,  # a profiling net: any cache size
    )


@torch.no_grad()
def _time_layers(
    net: ServingNet, context: int, prefill: int, repeats: int, gen, flush: torch.Tensor
) -> tuple[float, float]:
    """(decode, prefill) seconds per token and per layer of ``net``'s layers run one after the
    other (copies of one shape with their own weights, so that, as in a real model, a layer's
    weights are not still in the CPU caches from its previous call)."""
    kw = {"dtype": net.dtype, "device": net.device}
    state = InferenceState(net, 1, max(context + 1, prefill))
    for cache in state.layers.values():  # a filled cache (values do not change the timing)
        for name in ("key", "value"):
            if hasattr(cache, name):
                getattr(cache, name).normal_(generator=gen)

    def run(x: torch.Tensor) -> None:
        for layer in net.layers:
            layer_forward(net, layer, x, state)

    one = torch.randn(1, 1, net.hidden, generator=gen, **kw)
    state.lengths = [context]
    decode = _best_seconds(lambda: run(one), repeats, flush)
    prompt = torch.randn(1, prefill, net.hidden, generator=gen, **kw)
    state.lengths = [0]
    whole = _best_seconds(lambda: run(prompt), max(3, repeats // 4), flush)
    copies = len(net.layers)
    return decode / copies, whole / prefill / copies


def _point(model, kind, h, width, head_dim, budget, gen, kw) -> tuple[float, float]:
    """(decode, prefill) seconds per token of one layer of this shape."""
    context, prefill, repeats, flush = budget
    layers = tuple(
        dataclasses.replace(_layer(model, kind, h, width, head_dim, gen, **kw), index=i)
        for i in range(COPIES)
    )
    net = dataclasses.replace(_net(model, layers[0], h, gen, **kw), layers=layers)
    return _time_layers(net, context, prefill, repeats, gen, flush)


def _base(model, h, budget, gen, kw) -> tuple[float, float]:
    """(decode, prefill) seconds per token of a whole :func:`forward` without layers: embedding,
    final norm, output layer and the step's own bookkeeping."""
    context, prefill, repeats, flush = budget
    net = dataclasses.replace(
        _net(model, _layer(model, "mlp", h, 1, 0, gen, **kw), h, gen, **kw), layers=()
    )
    state = InferenceState(net, 1, max(context + 1, prefill))
    one = torch.zeros(1, 1, dtype=torch.long, device=net.device)
    many = torch.zeros(1, prefill, dtype=torch.long, device=net.device)

    def step(tokens: torch.Tensor, length: int) -> torch.Tensor:
        state.lengths = [length]
        return forward(net, tokens, state, last_only=True)

    decode = _best_seconds(lambda: step(one, context), repeats, flush)
    whole = _best_seconds(lambda: step(many, 0), max(3, repeats // 4), flush)
    return decode, whole / prefill


@torch.no_grad()
def profile_latency(
    model: ModelConfig,
    elastic: ElasticConfig,
    *,
    context: int = 1024,
    prefill_tokens: int = 256,
    repeats: int = 20,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LatencyTable:
    """Seconds per token of every layer kind at every candidate size of ``elastic`` (see the
    module docstring), as a table for ``budget_target: latency``."""
    for name, value in (
        ("context", context),
        ("prefill_tokens", prefill_tokens),
        ("repeats", repeats),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    choices = elastic.axis_choices(model)
    axes = ("hidden", "mamba_heads", "mamba_head_dim", "attention_heads", "ffn")
    grids = {a: choices[a] for a in axes}
    gen = torch.Generator(device=device).manual_seed(0)
    kw = {"dtype": dtype, "device": device}
    budget = (context, prefill_tokens, repeats, torch.empty(FLUSH_BYTES // 4))
    kinds = set(model.layer_kinds())

    def point(kind: str, h: int, width: int, head_dim: int = 0) -> tuple[float, float]:
        if kind not in kinds:  # the pattern has no such layer: never counted
            return (0.0, 0.0)
        return _point(model, kind, h, width, head_dim, budget, gen, kw)

    timed = {
        "mamba": [
            [
                [point("mamba", h, w, d) for d in grids["mamba_head_dim"]]
                for w in grids["mamba_heads"]
            ]
            for h in grids["hidden"]
        ],
        "attention": [
            [point("attention", h, w) for w in grids["attention_heads"]] for h in grids["hidden"]
        ],
        "mlp": [[point("mlp", h, w) for w in grids["ffn"]] for h in grids["hidden"]],
        "base": [_base(model, h, budget, gen, kw) for h in grids["hidden"]],
    }

    def phase(i: int, nested):
        return nested[i] if isinstance(nested, tuple) else [phase(i, x) for x in nested]

    seconds = {name: {k: phase(i, v) for k, v in timed.items()} for i, name in enumerate(PHASES)}
    cpu = platform.processor() or platform.machine()
    where = f"{device} ({cpu}, {torch.get_num_threads()} threads)"
    return LatencyTable(grids, seconds, context, where)
