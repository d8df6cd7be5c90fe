"""Causal attention on fused kernels, exact under context parallelism: every core attention of
the local spec and of the elastic attention.

No (s, s) score or mask tensor is ever built: every call is torch's
``scaled_dot_product_attention`` with a causal flag (flash / memory-efficient kernels on GPU, the
flash kernel on CPU), whose saved state is linear in the sequence length.

Under context parallelism each CP rank holds two chunks of the sequence, megatron's load-balanced
("zig-zag") layout: of ``2*CP`` equal chunks, rank ``r`` holds chunks ``r`` and ``2*CP-1-r``
(:func:`megatron.core.utils.get_batch_on_this_cp_rank`). Keys and values are all-gathered over the
CP group (cheap with GQA: only the key/value heads travel; their gradients are reduce-scattered
back) and put into global chunk order; the queries of global chunk ``c`` attend to chunks
``0..c`` with a bottom-right-aligned causal mask
(:func:`megatron_elastic.platform.lower_right_causal_attention`). Transformer Engine's
context-parallel attention (ring p2p) does this on GPU for megatron's TE spec.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_elastic.platform import lower_right_causal_attention

__all__ = ["CausalCoreAttention", "causal_attention", "load_balanced_positions"]


def load_balanced_positions(
    local_len: int, cp_size: int, cp_rank: int, device: torch.device | str
) -> torch.Tensor:
    """Global positions of the ``local_len`` tokens CP rank ``cp_rank`` holds: chunks ``cp_rank``
    and ``2*cp_size-1-cp_rank`` of the ``2*cp_size`` chunks of the sequence."""
    chunk = local_len // 2
    first = torch.arange(chunk, device=device) + cp_rank * chunk
    second = torch.arange(chunk, device=device) + (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, second])


def _global_chunk_order(cp_size: int) -> list[int]:
    """For each global chunk ``j`` of ``2*cp_size``, its index among the rank-ordered gathered
    chunks (rank ``r`` contributes chunks ``r`` then ``2*cp_size-1-r``)."""
    return [2 * j if j < cp_size else 2 * (2 * cp_size - 1 - j) + 1 for j in range(2 * cp_size)]


def _load_balanced_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_size: int, rank: int, scale
) -> torch.Tensor:
    """q (b, h, s, d): this rank's two chunks; k, v (b, h, cp*s, d) gathered in rank order.
    Returns (b, h, s, d)."""
    b, h, s, d = q.shape
    chunk = s // 2
    order = _global_chunk_order(cp_size)
    # (b, h, 2cp, chunk, d) -> global chunk order, (b, h, 2cp*chunk, d)
    k = k.view(b, h, 2 * cp_size, chunk, d)[:, :, order].reshape(b, h, -1, d)
    v = v.view(b, h, 2 * cp_size, chunk, d)[:, :, order].reshape(b, h, -1, d)
    out = []
    for i, c in enumerate((rank, 2 * cp_size - 1 - rank)):  # this rank's chunks, global index c
        visible = (c + 1) * chunk  # keys of chunks 0..c; the last chunk is the diagonal one
        q_c = q[:, :, i * chunk : (i + 1) * chunk]
        out.append(lower_right_causal_attention(q_c, k[:, :, :visible], v[:, :, :visible], scale))
    return torch.cat(out, dim=2)


def causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cp_group=None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Causal GQA attention of this rank's queries.

    Args:
        query: (s, b, heads, d); key, value: (s, b, groups, d), ``heads`` a multiple of
            ``groups`` (each group's key/value serves ``heads // groups`` consecutive heads).
        cp_group: the context-parallel group (``None`` or one rank: plain causal attention over
            the local sequence); otherwise ``s`` is this rank's load-balanced share.
        softmax_scale: ``None``: ``1/sqrt(d)``.
    Returns:
        (s, b, heads * d)
    """
    s, b, heads, d = query.shape
    cp_size = 1 if cp_group is None else cp_group.size()
    if cp_size > 1:
        # (s, b, g, d) -> (cp*s, b, g, d) in rank order; backward reduce-scatters the gradients.
        key = gather_from_sequence_parallel_region(key, True, group=cp_group)
        value = gather_from_sequence_parallel_region(value, True, group=cp_group)
    repeat = heads // key.size(2)
    k = key.repeat_interleave(repeat, dim=2)  # (sk, b, heads, d): each group's kv for its heads
    v = value.repeat_interleave(repeat, dim=2)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, k, v))  # (b, heads, s, d) for SDPA
    if cp_size == 1:
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)
    else:
        ctx = _load_balanced_causal(q, k, v, cp_size, cp_group.rank(), softmax_scale)
    return ctx.permute(2, 0, 1, 3).reshape(s, b, heads * d)


class CausalCoreAttention(MegatronModule):
    """Core attention of the local spec at every CP size, in place of megatron's local
    ``DotProductAttention`` (which materialises (b*heads, s, s) scores and an fp32 softmax copy,
    and refuses CP). Same constructor as megatron's; no parameters, so checkpoints are unchanged.

    Computes what megatron's does for NemotronH: causal, scale ``1/sqrt(kv_channels)`` unless
    given, no dropout, no bias. ``apply_query_key_layer_scaling`` is accepted: megatron divides
    the scale by the layer number and multiplies the scores back before its softmax, so the result
    is the same. Options that would change the result raise ``ValueError``.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"attention_dropout={dropout}: CausalCoreAttention has no dropout; set "
                "attention_dropout=0 (NemotronH trains without it)"
            )
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(
                f"attn_mask_type={attn_mask_type}: CausalCoreAttention is causal only; build the "
                "attention with AttnMaskType.causal"
            )
        if getattr(config, "window_size", None) is not None:
            raise ValueError(
                f"window_size={config.window_size}: CausalCoreAttention has no sliding window; "
                "set window_size=None"
            )
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(
                f"softmax_type={config.softmax_type!r}: CausalCoreAttention computes the "
                "vanilla softmax; set softmax_type='vanilla'"
            )
        if pg_collection is None and config.context_parallel_size > 1:
            raise ValueError(
                "CausalCoreAttention under context parallelism needs the process groups: pass "
                "pg_collection (with .cp) when building the model"
            )
        self.cp_group = None if pg_collection is None else pg_collection.cp
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(config.kv_channels)
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """query (s, b, heads, d), key/value (s, b, groups, d) -> (s, b, heads * d)."""
        if attention_mask is not None or attention_bias is not None:
            raise ValueError(
                "CausalCoreAttention applies the causal mask itself: pass attention_mask=None "
                "and attention_bias=None (build data with create_attention_mask=False)"
            )
        if packed_seq_params is not None:
            raise ValueError(
                "CausalCoreAttention has no packed sequences: pass packed_seq_params=None, or "
                "use the Transformer-Engine spec"
            )
        return causal_attention(query, key, value, self.cp_group, self.softmax_scale)
