"""Causal attention, exact under context parallelism: the one place CP enters attention.

Under context parallelism each CP rank holds two chunks of the sequence, megatron's load-balanced
("zig-zag") layout: of ``2*CP`` equal chunks, rank ``r`` holds chunks ``r`` and ``2*CP-1-r``
(:func:`megatron.core.utils.get_batch_on_this_cp_rank`). Keys and values are all-gathered over the
CP group (cheap with GQA: only the key/value heads travel; their gradients are reduce-scattered
back), and each local query attends to the gathered keys at global positions not after its own.
Transformer Engine's context-parallel attention (ring p2p) does this on GPU for megatron's TE
spec; this implementation serves the local spec and the elastic attention on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule

__all__ = ["ContextParallelDotProductAttention", "causal_attention", "load_balanced_positions"]


def load_balanced_positions(
    local_len: int, cp_size: int, cp_rank: int, device: torch.device | str
) -> torch.Tensor:
    """Global positions of the ``local_len`` tokens CP rank ``cp_rank`` holds: chunks ``cp_rank``
    and ``2*cp_size-1-cp_rank`` of the ``2*cp_size`` chunks of the sequence."""
    chunk = local_len // 2
    first = torch.arange(chunk, device=device) + cp_rank * chunk
    second = torch.arange(chunk, device=device) + (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, second])


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
        rank = cp_group.rank()
        q_pos = load_balanced_positions(s, cp_size, rank, query.device)
        k_pos = torch.cat(
            [load_balanced_positions(s, cp_size, r, query.device) for r in range(cp_size)]
        )
        allowed = q_pos[:, None] >= k_pos[None, :]  # (s, cp*s): keys not after the query
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=softmax_scale)
    return ctx.permute(2, 0, 1, 3).reshape(s, b, heads * d)


class ContextParallelDotProductAttention(MegatronModule):
    """Core attention of the local spec under context parallelism (megatron's local
    ``DotProductAttention`` refuses CP): causal, no dropout, no bias, as NemotronH trains."""

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
        if pg_collection is None or (config.attention_dropout or 0.0) > 0:
            raise ValueError(
                "ContextParallelDotProductAttention needs explicit process groups and "
                "attention_dropout=0"
            )
        self.cp_group = pg_collection.cp
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

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
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("context-parallel attention has no bias or packed sequences")
        return causal_attention(query, key, value, self.cp_group, self.softmax_scale)
