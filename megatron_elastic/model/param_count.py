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
        else:
            counts.append(mlp_layer_params(cfg.hidden_size, width))
    return counts


def count_parameters(cfg: ModelConfig) -> int:
    """Total parameters of the (unsharded) model."""
    return embedding_params(cfg.hidden_size, cfg.vocab_size) + sum(layer_parameter_counts(cfg))
