"""Exact parameter counts of the hybrid parent by arithmetic (no weights are allocated).

The per-layer functions take explicit sizes so that a sub-network's count uses the same formulas.
"""

from __future__ import annotations

from megatron_elastic.config import ModelConfig
from megatron_elastic.model.layouts import AttentionLayout, MambaLayout

__all__ = [
    "attention_layer_params",
    "count_parameters",
    "embedding_params",
    "layer_parameter_counts",
    "mamba_layer_params",
    "mlp_layer_params",
    "moe_layer_active_params",
    "moe_layer_params",
    "moe_layer_params_of",
    "count_active_parameters",
]


def mamba_layer_params(
    hidden: int, num_heads: int, head_dim: int, num_groups: int, state_dim: int, conv_kernel: int
) -> int:
    """Pre-norm + Mamba-2 mixer: in_proj, depthwise conv with bias (:class:`MambaLayout`),
    dt_bias, A_log, D per head, gated-norm weight, out_proj."""
    layout = MambaLayout(num_heads, head_dim, num_groups, state_dim)
    inner, conv_channels = layout.inner, layout.conv_size
    in_proj = hidden * layout.in_proj_size
    conv = conv_channels * conv_kernel + conv_channels
    per_head = 3 * num_heads
    return hidden + in_proj + conv + per_head + inner + inner * hidden


def attention_layer_params(
    hidden: int, num_heads: int, num_query_groups: int, head_dim: int
) -> int:
    """Pre-norm + fused QKV (GQA, :class:`AttentionLayout`) + output projection, no biases."""
    qkv = hidden * AttentionLayout.head_rows(num_heads, num_query_groups) * head_dim
    return hidden + qkv + num_heads * head_dim * hidden


def mlp_layer_params(hidden: int, ffn: int) -> int:
    """Pre-norm + fc1 + fc2 (squared ReLU, not gated), no biases."""
    return hidden + 2 * hidden * ffn


def embedding_params(hidden: int, vocab: int) -> int:
    """Input embedding, final norm and the untied output layer."""
    return 2 * vocab * hidden + hidden


def layer_parameter_counts(cfg: ModelConfig) -> list[int]:
    """Parameters of each layer of the stack, in pattern order (per-layer widths honoured)."""
    counts = []
    for kind, (width, head_dim) in zip(cfg.layer_kinds(), cfg.layer_sizes(), strict=True):
        if kind == "mamba":
            counts.append(
                mamba_layer_params(
                    cfg.hidden_size,
                    width,
                    head_dim,
                    cfg.mamba_num_groups,
                    cfg.mamba_state_dim,
                    cfg.mamba_conv_kernel,
                )
            )
        elif kind == "attention":
            counts.append(
                attention_layer_params(cfg.hidden_size, width, cfg.num_query_groups, cfg.head_dim)
            )
        elif kind == "moe":
            counts.append(moe_layer_params_of(cfg))
        else:
            counts.append(mlp_layer_params(cfg.hidden_size, width))
    return counts


def count_parameters(cfg: ModelConfig) -> int:
    """Total parameters of the (unsharded) model."""
    return embedding_params(cfg.hidden_size, cfg.vocab_size) + sum(layer_parameter_counts(cfg))


def moe_layer_params(hidden: int, experts: int, expert_ffn: int, shared_ffn: int) -> int:
    """Pre-norm + router gate (``experts x hidden``, no bias) + ``experts`` routed squared-ReLU
    experts (fc1 + fc2, no biases) + the shared expert (``shared_ffn`` neurons, 0: none). The
    router's expert bias is a buffer, not a parameter."""
    return hidden + experts * hidden + experts * 2 * hidden * expert_ffn + 2 * hidden * shared_ffn


def moe_layer_active_params(
    hidden: int, experts: int, topk: int, expert_ffn: int, shared_ffn: int
) -> int:
    """What one token touches in an MoE layer: the pre-norm, the whole router gate (every
    expert's logit is computed), its ``topk`` routed experts and the shared expert."""
    return hidden + experts * hidden + topk * 2 * hidden * expert_ffn + 2 * hidden * shared_ffn


def moe_layer_params_of(cfg: ModelConfig) -> int:
    """Parameters of one ``E`` layer of ``cfg``."""
    return moe_layer_params(
        cfg.hidden_size,
        cfg.num_moe_experts or 0,
        cfg.moe_ffn_hidden_size or 0,
        cfg.moe_shared_expert_intermediate_size or 0,
    )


def count_active_parameters(cfg: ModelConfig) -> int:
    """Parameters one token touches: :func:`count_parameters` with each ``E`` layer counted by
    :func:`moe_layer_active_params` (embedding and output layer counted whole, as usual for
    "active parameters"). Equals :func:`count_parameters` for a model without ``E`` layers."""
    moe_layers = cfg.layer_kinds().count("moe")
    if not moe_layers:
        return count_parameters(cfg)
    active = moe_layer_active_params(
        cfg.hidden_size,
        cfg.num_moe_experts,
        cfg.moe_router_topk,
        cfg.moe_ffn_hidden_size,
        cfg.moe_shared_expert_intermediate_size or 0,
    )
    return count_parameters(cfg) - moe_layers * (moe_layer_params_of(cfg) - active)
