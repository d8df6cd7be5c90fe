"""Reorder the parent's weights so every nested prefix holds the most important components.

Works on the full (unsplit, TP=1) state dict with megatron-core names; shard it afterwards for any
TP size. Each permutation is exact (the model computes the same function): hidden channels move
through every norm and projection; FFN neurons, attention heads *within* their query group,
Mamba heads *within* their group and Mamba head channels (the same order in every head) move
together with everything that reads or writes them, including the conv, dt/A/D and gated norm.
FFN neurons are dealt round-robin over the ``ffn_nesting_blocks`` blocks so that every block's
prefix (hence every TP rank's share) holds top-ranked neurons.
"""

from __future__ import annotations

import torch

from megatron_elastic.config import ModelConfig
from megatron_elastic.importance.scores import Ranking
from megatron_elastic.model.layouts import AttentionLayout, MambaLayout

__all__ = ["apply_ranking", "permute_hidden", "block_interleave"]

StateDict = dict[str, torch.Tensor]


def _take(t: torch.Tensor, dim: int, idx: list[int] | torch.Tensor) -> torch.Tensor:
    return t.index_select(dim, torch.as_tensor(idx, dtype=torch.long))


def permute_hidden(sd: StateDict, model: ModelConfig, order: list[int]) -> None:
    """Embedding channel ``order[i]`` becomes channel ``i`` everywhere."""
    reads = ("mixer.in_proj.weight", "self_attention.linear_qkv.weight", "mlp.linear_fc1.weight")
    writes = ("mixer.out_proj.weight", "self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
    norms = (".norm.weight", "input_layernorm.weight", "pre_mlp_layernorm.weight")
    for name in list(sd):
        t = sd[name]
        if name in ("embedding.word_embeddings.weight", "output_layer.weight") or name.endswith(
            reads
        ):
            sd[name] = _take(t, 1, order)
        elif name.endswith(writes):
            sd[name] = _take(t, 0, order)
        elif name == "decoder.final_norm.weight" or (
            name.startswith("decoder.layers.") and name.endswith(norms) and ".mixer." not in name
        ):
            sd[name] = _take(t, 0, order)


def block_interleave(order: list[int], blocks: int) -> list[int]:
    """Deal a most-important-first order round-robin into ``blocks`` equal blocks: position ``k``
    of block ``b`` gets ``order[k * blocks + b]``."""
    size = len(order) // blocks
    return [order[k * blocks + b] for b in range(blocks) for k in range(size)]


def _permute_ffn(sd: StateDict, prefix: str, order: list[int]) -> None:
    sd[prefix + "mlp.linear_fc1.weight"] = _take(sd[prefix + "mlp.linear_fc1.weight"], 0, order)
    sd[prefix + "mlp.linear_fc2.weight"] = _take(sd[prefix + "mlp.linear_fc2.weight"], 1, order)


def _permute_attention(sd: StateDict, prefix: str, model: ModelConfig, heads: list[list[int]]):
    groups = model.num_query_groups
    layout = AttentionLayout(groups, model.num_attention_heads // groups, model.head_dim)
    name = prefix + "self_attention."
    sd[name + "linear_qkv.weight"] = _take(sd[name + "linear_qkv.weight"], 0, layout.rows(heads))
    cols = layout.proj_cols(heads)
    sd[name + "linear_proj.weight"] = _take(sd[name + "linear_proj.weight"], 1, cols)


def _permute_mamba(
    sd: StateDict, prefix: str, model: ModelConfig, heads: list[list[int]], channels: list[int]
) -> None:
    layout = MambaLayout(
        model.mamba_num_heads, model.mamba_head_dim, model.mamba_num_groups, model.mamba_state_dim
    )
    head_idx = layout.heads(heads)
    inner_idx = layout.channels(head_idx, channels)
    m = prefix + "mixer."
    rows = layout.in_proj_rows(head_idx, channels)
    sd[m + "in_proj.weight"] = _take(sd[m + "in_proj.weight"], 0, rows)
    for key in ("conv1d_weight", "conv1d_bias"):
        sd[m + key] = _take(sd[m + key], 0, layout.conv_rows(head_idx, channels))
    for key in ("dt_bias", "A_log", "D"):
        sd[m + key] = _take(sd[m + key], 0, head_idx)
    sd[m + "norm.weight"] = _take(sd[m + "norm.weight"], 0, inner_idx)
    sd[m + "out_proj.weight"] = _take(sd[m + "out_proj.weight"], 1, inner_idx)


def apply_ranking(
    sd: StateDict, model: ModelConfig, ranking: Ranking, *, ffn_nesting_blocks: int = 1
) -> StateDict:
    """A copy of the full state dict ``sd`` with every ranked axis put in importance order."""
    sd = {k: v.clone() for k, v in sd.items()}
    permute_hidden(sd, model, ranking.hidden)
    for j, order in ranking.ffn.items():
        _permute_ffn(sd, f"decoder.layers.{j}.", block_interleave(order, ffn_nesting_blocks))
    for j, heads in ranking.attention_heads.items():
        _permute_attention(sd, f"decoder.layers.{j}.", model, heads)
    for j, heads in ranking.mamba_heads.items():
        _permute_mamba(sd, f"decoder.layers.{j}.", model, heads, ranking.mamba_channels[j])
    return sd
