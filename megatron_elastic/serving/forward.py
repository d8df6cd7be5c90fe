"""One forward pass of a :class:`ServingNet` over new tokens, reading and extending an
:class:`InferenceState`: the only place caching enters the computation.

It is the slice-mode forward of the elastic model (:mod:`megatron_elastic.elastic`) restated for
decoding on the same tensors: RMSNorm, Mamba-2 mixer (causal conv, SSD scan, gated group RMSNorm),
GQA attention without positional embedding, squared-ReLU MLP, residual adds. Long chunks (a
prompt) go through the chunked SSD scan with the carried-in state; short ones (a decode step, a
speculative verification) through the exact recurrence, which also yields the per-token states
that rollback needs. Shapes are batch-first: ``b`` rows, ``s`` new tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_elastic.model.mamba import group_rms_norm
from megatron_elastic.model.norm import rms_norm
from megatron_elastic.model.ssd_scan import ssd_chunked_scan
from megatron_elastic.platform import lower_right_causal_attention
from megatron_elastic.serving.net import ServingLayer, ServingNet
from megatron_elastic.serving.state import AttentionCache, InferenceState, MambaCache

__all__ = ["RECURRENCE_MAX_TOKENS", "forward", "layer_forward", "scan_with_state"]

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
    else:
        out = net.activation(normed @ layer.weights["fc1"].T) @ layer.weights["fc2"].T
    return x + out


def _attention(
    x: torch.Tensor, layer: ServingLayer, cache: AttentionCache, lengths: list[int]
) -> torch.Tensor:
    b, s, _ = x.shape
    layout = layer.attention_layout
    per_group = layout.heads_per_group
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
    keys = cache.key[:, :end].repeat_interleave(per_group, dim=2).transpose(1, 2)  # (b, h, t, d)
    values = cache.value[:, :end].repeat_interleave(per_group, dim=2).transpose(1, 2)
    q = q.transpose(1, 2)  # (b, heads, s, d)
    if start + s != end:  # rows at different lengths (decoding): each row's own causal mask
        key_pos = torch.arange(end, device=x.device)
        mask = (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]  # (b, 1, s, t)
        ctx = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    elif s == 1:  # one new token per row at equal lengths sees everything
        ctx = F.scaled_dot_product_attention(q, keys, values)
    else:  # prefill (of a prompt, or of its next chunk): causal fused kernel, no (s, t) tensor
        ctx = lower_right_causal_attention(q, keys, values)
    return ctx.transpose(1, 2).flatten(2) @ layer.weights["proj"].T  # (b, s, heads * d)


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
    conv = F.conv1d(window, w["conv_weight"], w["conv_bias"], groups=window.size(1))  # (b, C, s)
    cache.conv = window[..., s:]
    if record:
        cache.conv_log = torch.cat([cache.conv_log, xbc.transpose(1, 2)], dim=-1)
    xs, B, C = layout.split_conv(F.silu(conv).transpose(1, 2))
    dt = F.softplus(dt.float() + w["dt_bias"].float())  # (b, s, h)
    A = -torch.exp(w["A_log"].float())
    xs = xs.reshape(b, s, heads, p)
    B, C = B.reshape(b, s, groups, n), C.reshape(b, s, groups, n)
    if s <= RECURRENCE_MAX_TOKENS or record:
        y, states = _recurrence(xs, dt, A, B, C, w["D"].float(), cache.ssm)
        cache.ssm = states[:, -1]
        if record:
            cache.ssm_log.append(states)
    else:
        y, cache.ssm = scan_with_state(xs, dt, A, B, C, w["D"], cache.ssm, net.chunk_size)
    gated = y.reshape(b, s, inner).to(x.dtype).float() * F.silu(z.float())
    y = group_rms_norm(gated, w["norm_weight"], inner // groups, net.eps, x.dtype)
    return y @ w["out_proj"].T


def _recurrence(x, dt, A, B, C, D, state):
    """``s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T``, ``y_t = s_t C_t + D x_t`` for a short
    chunk, in float32, in closed form (``s_t = sum_u exp(a_u+1 + .. + a_t) dt_u x_u B_u^T +
    exp(a_1 + .. + a_t) s_0``: no loop over tokens). Returns y (b, s, h, p) and the state after
    each token (b, s, h, p, n)."""
    heads, s = x.size(2), x.size(1)
    Bh = B.float().repeat_interleave(heads // B.size(2), dim=2)  # (b, s, h, n)
    Ch = C.float().repeat_interleave(heads // C.size(2), dim=2)
    x32 = x.float()
    cum = torch.cumsum(dt * A, dim=1)  # (b, s, h)
    if s == 1:
        states = (torch.exp(cum)[..., None, None] * state[:, None]) + (
            (dt[..., None] * x32)[..., None] * Bh[:, :, :, None, :]
        )
    else:
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        decay = (cum[:, :, None, :] - cum[:, None, :, :]).masked_fill(
            ~causal[None, :, :, None], float("-inf")
        )  # (b, t, u, h): sum of a over (u, t]
        states = (
            torch.einsum("btuh,buhp,buhn->bthpn", torch.exp(decay), dt[..., None] * x32, Bh)
            + torch.exp(cum)[..., None, None] * state[:, None]
        )
    y = torch.einsum("bthpn,bthn->bthp", states, Ch) + x32 * D[:, None]
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
