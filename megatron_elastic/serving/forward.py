"""One forward pass of a :class:`ServingNet` over new tokens, reading and extending an
:class:`InferenceState`: the only place caching enters the computation.

It is the slice-mode forward of the elastic model (:mod:`megatron_elastic.elastic`) restated for
decoding on the same tensors: RMSNorm, Mamba-2 mixer (causal conv, SSD scan, gated group RMSNorm),
GQA attention without positional embedding, squared-ReLU MLP, mixture of experts (megatron's own
top-k routing function on the kept experts' gate, squared-ReLU experts on the tokens routed to
them, the shared expert on all), residual adds. Long chunks (a
prompt) go through the chunked SSD scan with the carried-in state and the fused causal attention
kernel. Short ones (a decode step, a speculative verification of k + 1 tokens) are one pass that
costs about what its matmuls cost (1.4-1.7 one-token steps for 2-7 tokens on a CPU, where BLAS
runs several rows at 1.4-2x one row; docs/serving.md): attention reads the cache in place
with each query's causal mask, the conv is K shifted multiply-adds, and the SSM is the closed
form of :func:`chunk_states`, which returns the state after every token, so a rollback slices it
(no re-run, no per-token snapshot). Shapes are batch-first: ``b`` rows, ``s`` new tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_utils import (
    router_gating_linear,
    topk_routing_with_score_function,
)

from megatron_elastic.model.mamba import group_rms_norm
from megatron_elastic.model.norm import rms_norm
from megatron_elastic.model.ssd_scan import ssd_chunked_scan
from megatron_elastic.platform import lower_right_causal_attention
from megatron_elastic.serving.net import ServingLayer, ServingNet
from megatron_elastic.serving.state import AttentionCache, InferenceState, MambaCache

__all__ = ["RECURRENCE_MAX_TOKENS", "chunk_states", "forward", "layer_forward", "scan_with_state"]

RECURRENCE_MAX_TOKENS = 16
"""Chunks up to this many tokens use the token-by-token recurrence; longer ones the chunked scan."""


@torch.no_grad()
def forward(
    net: ServingNet, tokens: torch.Tensor, state: InferenceState, *, last_only: bool = False
) -> torch.Tensor:
    """Logits of ``tokens`` (b, s) following what ``state`` holds; ``state`` then holds them too.

    Returns (b, s, vocab), or (b, 1, vocab) for the last position only with ``last_only``.
    """
    b, s = tokens.shape
    if b != state.batch:
        raise ValueError(f"{b} rows of tokens for a state of {state.batch}")
    if max(state.lengths) + s > state.capacity:
        raise ValueError(f"{max(state.lengths) + s} tokens exceed the state's {state.capacity}")
    x = F.embedding(tokens, net.embedding)  # (b, s, h)
    for layer in net.layers:
        x = layer_forward(net, layer, x, state)
    state.lengths = [n + s for n in state.lengths]
    if last_only:
        x = x[:, -1:]
    return rms_norm(x, net.final_norm, net.eps) @ net.output.T


def layer_forward(
    net: ServingNet, layer: ServingLayer, x: torch.Tensor, state: InferenceState
) -> torch.Tensor:
    """One layer with its residual: (b, s, h) -> (b, s, h); extends the layer's cache (the
    caller advances ``state.lengths``)."""
    normed = rms_norm(x, layer.weights["norm"], net.eps)
    cache = state.layers.get(layer.index)
    if layer.kind == "mamba":
        out = _mamba(normed, layer, cache, net, state.recording)
    elif layer.kind == "attention":
        out = _attention(normed, layer, cache, state.lengths)
    elif layer.kind == "moe":
        out = _moe(normed, layer, net)
    else:
        out = net.activation(normed @ layer.weights["fc1"].T) @ layer.weights["fc2"].T
    return x + out


def _attention(
    x: torch.Tensor, layer: ServingLayer, cache: AttentionCache, lengths: list[int]
) -> torch.Tensor:
    b, s, _ = x.shape
    layout = layer.attention_layout
    per_group, groups, d = layout.heads_per_group, layer.num_groups, layer.head_dim
    q, k, v = layout.split_heads(x @ layer.weights["qkv"].T)
    start, end = min(lengths), max(lengths) + s
    if start + s == end:  # every row at the same length: a plain slice write
        cache.key[:, start:end], cache.value[:, start:end] = k, v
        query_pos = torch.arange(start, end, device=x.device).expand(b, s)
    else:
        query_pos = torch.tensor(lengths, device=x.device)[:, None] + torch.arange(
            s, device=x.device
        )  # (b, s)
        rows = torch.arange(b, device=x.device)[:, None]
        cache.key[rows, query_pos], cache.value[rows, query_pos] = k, v
    if start + s == end and s > RECURRENCE_MAX_TOKENS:
        # prefill (of a prompt, or of its next chunk): causal fused kernel, no (s, t) tensor
        keys = cache.key[:, :end].repeat_interleave(per_group, dim=2).transpose(1, 2)
        values = cache.value[:, :end].repeat_interleave(per_group, dim=2).transpose(1, 2)
        ctx = lower_right_causal_attention(q.transpose(1, 2), keys, values)  # (b, h, s, d)
        return ctx.transpose(1, 2).flatten(2) @ layer.weights["proj"].T
    # A decode step or a short chunk (a speculative verification): a group's query heads are
    # folded into the query rows, (b, groups, per_group * s, d), so the cached keys and values
    # are read in place (no per-head copy of the cache), with each query's own causal mask
    # ((s, t) booleans; the fused causal kernel would run all t query rows on CPU).
    keys = cache.key[:, :end].transpose(1, 2)  # (b, groups, t, d)
    values = cache.value[:, :end].transpose(1, 2)
    q = q.view(b, s, groups, per_group, d).permute(0, 2, 3, 1, 4).reshape(b, groups, -1, d)
    mask = None
    if s > 1 or start != end - 1:
        key_pos = torch.arange(end, device=x.device)
        mask = key_pos[None, None, :] <= query_pos[:, :, None]  # (b, s, t)
        mask = mask[:, None, None].expand(b, 1, per_group, s, end).reshape(b, 1, -1, end)
    ctx = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (b, g, hpg * s, d)
    ctx = ctx.view(b, groups, per_group, s, d).permute(0, 3, 1, 2, 4).reshape(b, s, -1)
    return ctx @ layer.weights["proj"].T  # (b, s, heads * d)


def _moe(x: torch.Tensor, layer: ServingLayer, net: ServingNet) -> torch.Tensor:
    """megatron's ``TopKRouter`` (gate in its router dtype, score function, expert bias for the
    choice, group-limited top-k, renormalisation and scaling: its own
    ``topk_routing_with_score_function``) and ``MoELayer`` (routed experts weighted by their
    probabilities, plus the shared expert) on (b, s, h); each expert runs only its tokens."""
    w, routing = layer.weights, net.moe
    assert routing is not None
    flat = x.reshape(-1, x.size(-1))
    logits = router_gating_linear(flat, w["router"], None, routing.router_dtype or flat.dtype)
    probs, routing_map = topk_routing_with_score_function(
        logits,
        routing.topk,
        use_pre_softmax=routing.pre_softmax,
        num_groups=routing.num_groups,
        group_topk=routing.group_topk,
        scaling_factor=routing.scaling_factor,
        score_function=routing.score_function,
        expert_bias=layer.expert_bias,
    )
    out = torch.zeros_like(flat)
    for e in routing_map.any(0).nonzero().flatten().tolist():  # the experts that got tokens
        tokens = routing_map[:, e].nonzero().squeeze(-1)
        y = net.activation(flat[tokens] @ w[f"fc1.{e}"].T) @ w[f"fc2.{e}"].T
        out.index_add_(0, tokens, (y * probs[tokens, e, None]).to(out.dtype))
    if "shared_fc1" in w:
        out = out + net.activation(flat @ w["shared_fc1"].T) @ w["shared_fc2"].T
    return out.view_as(x)


def _mamba(
    x: torch.Tensor, layer: ServingLayer, cache: MambaCache, net: ServingNet, record: bool
) -> torch.Tensor:
    w = layer.weights
    b, s, _ = x.shape
    layout = layer.mamba_layout
    inner, heads, p = layout.inner, layout.num_heads, layout.head_dim
    groups, n = layout.num_groups, layout.state_dim
    z, xbc, dt = layout.split_in_proj(x @ w["in_proj"].T)
    window = torch.cat([cache.conv, xbc.transpose(1, 2)], dim=-1)  # (b, C, K-1+s)
    short = s <= RECURRENCE_MAX_TOKENS
    if short:  # K shifted multiply-adds: a fraction of a conv1d call's fixed cost
        kernel = window.size(-1) - s + 1
        taps = window.unfold(-1, kernel, 1)  # (b, C, s, K), a view
        conv = (taps * w["conv_weight"].view(-1, 1, kernel)).sum(-1) + w["conv_bias"][:, None]
    else:
        conv = F.conv1d(window, w["conv_weight"], w["conv_bias"], groups=window.size(1))
    cache.conv = window[..., s:]
    xs, B, C = layout.split_conv(F.silu(conv).transpose(1, 2))
    dt = F.softplus(dt.float() + w["dt_bias"].float())  # (b, s, h)
    A = -torch.exp(w["A_log"].float())
    xs = xs.reshape(b, s, heads, p)
    B, C = B.reshape(b, s, groups, n), C.reshape(b, s, groups, n)
    if short or record:
        y, states = chunk_states(xs, dt, A, B, C, w["D"].float(), cache.ssm)
        cache.ssm = states[:, -1]
        if record:
            cache.log.append((window, states))
    else:
        y, cache.ssm = scan_with_state(xs, dt, A, B, C, w["D"], cache.ssm, net.chunk_size)
    gated = y.reshape(b, s, inner).to(x.dtype).float() * F.silu(z.float())
    y = group_rms_norm(gated, w["norm_weight"], inner // groups, net.eps, x.dtype)
    return y @ w["out_proj"].T


def chunk_states(x, dt, A, B, C, D, state):
    """The SSM over a short chunk that follows ``state`` (b, h, p, n), returning the state after
    *every* token, which a speculative rollback picks from: ``s_t = exp(dt_t A) s_{t-1} +
    dt_t x_t B_t^T``, ``y_t = s_t C_t + D x_t``, in float32, in closed form (no loop over
    tokens): ``s_t = sum_{u<=t} exp(a_{u+1} + .. + a_t) dt_u x_u B_u^T + exp(a_1 + .. + a_t)
    s_0``, the sum one batched matmul over heads. B and C stay per group (broadcast over the
    group's heads, no per-head copies). Returns y (b, s, h, p) and states (b, s, h, p, n)."""
    b, s, heads, p = x.shape
    groups, n = B.size(2), B.size(3)
    per_group = heads // groups
    dA = dt * A  # (b, s, h)
    cum = torch.cumsum(dA, dim=1)
    # dt_u x_u B_u^T per token: (b, s, g, hpg, p, n)
    inputs = (dt[..., None] * x.float()).view(b, s, groups, per_group, p, 1) * B.float().view(
        b, s, groups, 1, 1, n
    )
    carried = torch.exp(cum).view(b, s, heads, 1, 1) * state[:, None]  # (b, s, h, p, n)
    if s == 1:
        states = carried + inputs.view(b, 1, heads, p, n)
    else:
        seg = cum.transpose(1, 2)  # (b, h, s)
        decay = seg[..., :, None] - seg[..., None, :]  # (b, h, t, u): a over (u, t]
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        decay = torch.exp(decay.masked_fill(~causal, float("-inf")))
        flat = inputs.view(b, s, heads, p * n).transpose(1, 2)  # (b, h, u, p n)
        states = (decay @ flat).view(b, heads, s, p, n).transpose(1, 2) + carried
    readout = C.float().view(b, s, groups, 1, 1, n)
    y = (states.view(b, s, groups, per_group, p, n) * readout).sum(-1)
    y = y.view(b, s, heads, p) + x.float() * D[:, None]
    return y, states


def scan_with_state(x, dt, A, B, C, D, initial, chunk_size):
    """The chunked SSD scan of a chunk that follows the state ``initial`` (b, h, p, n).

    Returns y (b, s, h, p) float32 and the state after the last token (float32).
    """
    heads = x.size(2)
    y = ssd_chunked_scan(x, dt, A, B, C, chunk_size, D=D.float()).float()
    Bh = B.float().repeat_interleave(heads // B.size(2), dim=2)
    Ch = C.float().repeat_interleave(heads // C.size(2), dim=2)
    cum = torch.cumsum(dt * A, dim=1)  # (b, s, h), decreasing
    y = y + torch.einsum("blhn,bhpn,blh->blhp", Ch, initial, torch.exp(cum))
    to_end = torch.exp(cum[:, -1:] - cum)  # (b, s, h), exponents <= 0
    final = torch.einsum("blhn,blh,blhp->bhpn", Bh, to_end * dt, x.float())
    return y, final + torch.exp(cum[:, -1])[..., None, None] * initial
