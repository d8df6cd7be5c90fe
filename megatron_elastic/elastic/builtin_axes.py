"""The hybrid parent's elastic axes and layer kinds (registered on import).

Each :class:`~megatron_elastic.elastic.axes.Axis` states, in one place, what the rest of the code
needs of it: the parent's size, how its units nest, its constraints, how importance ranks it and
how its ranking permutes the weights (exactly: the permuted parent computes the same function).
Weights are the full (unsplit, TP=1) state dict with megatron-core names; fused tensors are read
through :mod:`megatron_elastic.model.layouts`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from megatron_elastic.config import ModelConfig, ParallelConfig
from megatron_elastic.elastic.axes import Axis, LayerKind, Number, Order, StateDict, register
from megatron_elastic.model.layouts import AttentionLayout, MambaLayout
from megatron_elastic.model.param_count import (
    attention_layer_params,
    mamba_layer_params,
    mlp_layer_params,
)

if TYPE_CHECKING:
    from megatron_elastic.elastic.config import ElasticConfig

__all__ = ["ATTENTION_HEADS", "DEPTH", "FFN", "HIDDEN", "MAMBA_HEADS", "MAMBA_HEAD_DIM"]


def take(t: torch.Tensor, dim: int, idx: list[int] | torch.Tensor) -> torch.Tensor:
    return t.index_select(dim, torch.as_tensor(idx, dtype=torch.long))


def argsort(scores: torch.Tensor) -> list[int]:
    """Most important first; ties keep index order."""
    return torch.argsort(scores, descending=True, stable=True).tolist()


def rank_within_groups(scores: torch.Tensor, num_groups: int) -> list[list[int]]:
    """For (units,) scores laid out group-major, each group's units from most to least important
    (indices local to the group)."""
    return [argsort(g) for g in scores.view(num_groups, -1)]


# ---- hidden ---------------------------------------------------------------------------------

_READS = (
    "mixer.in_proj.weight",
    "self_attention.linear_qkv.weight",
    "mlp.linear_fc1.weight",
    "mlp.router.weight",  # an E layer's gate
)
_WRITES = ("mixer.out_proj.weight", "self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_NORMS = (".norm.weight", "input_layernorm.weight", "pre_mlp_layernorm.weight")


def _hidden_dim(name: str) -> int | None:
    """The dim of a parameter indexed by embedding channels (1: it reads them, 0: it writes
    them), ``None`` if none is."""
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return 1
    if ".mlp.experts." in name or ".mlp.shared_experts." in name:  # an E layer's experts
        return 1 if name.endswith("linear_fc1.weight") else 0
    if name.endswith(_READS):
        return 1
    if name.endswith(_WRITES):
        return 0
    if name == "decoder.final_norm.weight" or (
        name.startswith("decoder.layers.") and name.endswith(_NORMS) and ".mixer." not in name
    ):
        return 0
    return None


def permute_hidden(sd: StateDict, model: ModelConfig, order: Order, layer: int, blocks: int):
    """Embedding channel ``order[i]`` becomes channel ``i`` everywhere."""
    for name in list(sd):
        dim = _hidden_dim(name)
        if dim is not None:
            sd[name] = take(sd[name], dim, order)


HIDDEN = Axis(
    name="hidden",
    kind=None,
    full=lambda m: m.hidden_size,
    label="hidden",
    config_field="hidden_choices",
    permute=permute_hidden,
)

# ---- depth ----------------------------------------------------------------------------------

DEPTH = Axis(
    name="depth",
    kind=None,
    full=lambda m: m.num_layers,
    label="depth",
    config_field="depth_choices",
)

# ---- attention ------------------------------------------------------------------------------


def _attention_layout(model: ModelConfig) -> AttentionLayout:
    groups = model.num_query_groups
    return AttentionLayout(groups, model.num_attention_heads // groups, model.head_dim)


def _rank_attention(stat: torch.Tensor, model: ModelConfig, options: Mapping[str, Any]):
    """An attention head: L2 over tokens of its output, ranked within its query group."""
    scores = stat.sqrt()
    return rank_within_groups(scores, model.num_query_groups), scores.tolist()


def _permute_attention(sd: StateDict, model: ModelConfig, heads: Order, layer: int, blocks: int):
    layout, name = _attention_layout(model), f"decoder.layers.{layer}.self_attention."
    sd[name + "linear_qkv.weight"] = take(sd[name + "linear_qkv.weight"], 0, layout.rows(heads))
    cols = layout.proj_cols(heads)
    sd[name + "linear_proj.weight"] = take(sd[name + "linear_proj.weight"], 1, cols)


ATTENTION_HEADS = Axis(
    name="attention_heads",
    kind="attention",
    full=lambda m: m.num_attention_heads,
    label="attention heads",
    config_field="attention_head_choices",
    groups=lambda m, e: m.num_query_groups,
    unit="query group",
    rank=_rank_attention,
    permute=_permute_attention,
)

# ---- Mamba ----------------------------------------------------------------------------------


def _mamba_layout(model: ModelConfig) -> MambaLayout:
    return MambaLayout(
        model.mamba_num_heads, model.mamba_head_dim, model.mamba_num_groups, model.mamba_state_dim
    )


def _channel_scores(stat: torch.Tensor) -> torch.Tensor:
    return stat.sqrt().sum(0)  # (heads, head_dim) sums of squares -> per channel, over heads


def _rank_mamba_channels(stat: torch.Tensor, model: ModelConfig, options: Mapping[str, Any]):
    """A head channel: L2 over tokens of ``s = LN(X) W_x^T``, summed over heads."""
    scores = _channel_scores(stat)
    return argsort(scores), scores.tolist()


def _rank_mamba_heads(stat: torch.Tensor, model: ModelConfig, options: Mapping[str, Any]):
    """A Mamba head: L2 of ``s`` over its ``mamba_top_channels`` best channels (default: all),
    ranked within its group."""
    top = options.get("mamba_top_channels") or model.mamba_head_dim
    channels = torch.argsort(_channel_scores(stat), descending=True, stable=True)
    scores = stat[:, channels[:top]].sum(1).sqrt()
    return rank_within_groups(scores, model.mamba_num_groups), scores.tolist()


def _permute_mamba(sd: StateDict, model: ModelConfig, heads, channels, layer: int) -> None:
    layout = _mamba_layout(model)
    head_idx = layout.heads(heads)
    inner_idx = layout.channels(head_idx, channels)
    m = f"decoder.layers.{layer}.mixer."
    rows = layout.in_proj_rows(head_idx, channels)
    sd[m + "in_proj.weight"] = take(sd[m + "in_proj.weight"], 0, rows)
    for key in ("conv1d_weight", "conv1d_bias"):
        sd[m + key] = take(sd[m + key], 0, layout.conv_rows(head_idx, channels))
    for key in ("dt_bias", "A_log", "D"):
        sd[m + key] = take(sd[m + key], 0, head_idx)
    sd[m + "norm.weight"] = take(sd[m + "norm.weight"], 0, inner_idx)
    sd[m + "out_proj.weight"] = take(sd[m + "out_proj.weight"], 1, inner_idx)


def _permute_mamba_heads(sd: StateDict, model: ModelConfig, heads: Order, layer: int, blocks: int):
    """Heads move within their groups, with every row, conv channel, dt/A/D entry, norm weight
    and out_proj column they own (channels stay in place)."""
    _permute_mamba(sd, model, heads, list(range(model.mamba_head_dim)), layer)


def _permute_mamba_channels(sd: StateDict, model: ModelConfig, order: Order, layer: int, blocks):
    """Head channels move, in the same order in every head (heads stay in place)."""
    per_group = model.mamba_num_heads // model.mamba_num_groups
    _permute_mamba(sd, model, [list(range(per_group))] * model.mamba_num_groups, order, layer)


def _check_mamba_cp(choices, model: ModelConfig, elastic, parallel: ParallelConfig) -> None:
    # Context parallelism gives every CP rank a contiguous share of this TP rank's active heads
    # (megatron's MambaContextParallel), so active heads per TP rank split over CP.
    tp, cp = parallel.tensor_parallel_size, parallel.context_parallel_size
    if cp == 1:
        return
    bad = [h for h in choices if (h // tp) % cp]
    if bad:
        ok = [
            h
            for h in range(model.mamba_num_groups, model.mamba_num_heads + 1)
            if h % model.mamba_num_groups == 0 and h % tp == 0 and (h // tp) % cp == 0
        ]
        raise ValueError(
            f"ElasticConfig mamba_heads choices {bad} are not possible with "
            f"context_parallel_size={cp} at tensor_parallel_size={tp}: the active Mamba "
            f"heads per TP rank must be divisible by CP; valid values are {ok}"
        )


MAMBA_HEADS = Axis(
    name="mamba_heads",
    kind="mamba",
    full=lambda m: m.mamba_num_heads,
    label="Mamba heads",
    config_field="mamba_head_choices",
    groups=lambda m, e: m.mamba_num_groups,
    unit="Mamba group",
    check=_check_mamba_cp,
    rank=_rank_mamba_heads,
    permute=_permute_mamba_heads,
)

MAMBA_HEAD_DIM = Axis(
    name="mamba_head_dim",
    kind="mamba",
    full=lambda m: m.mamba_head_dim,
    label="Mamba head_dim",
    config_field="mamba_head_dim_choices",
    rank=_rank_mamba_channels,
    permute=_permute_mamba_channels,
    ranking_key="mamba_channels",
)

# ---- FFN ------------------------------------------------------------------------------------


def block_interleave(order: list[int], blocks: int) -> list[int]:
    """Deal a most-important-first order round-robin into ``blocks`` equal blocks: position ``k``
    of block ``b`` gets ``order[k * blocks + b]``."""
    size = len(order) // blocks
    return [order[k * blocks + b] for b in range(blocks) for k in range(size)]


def _rank_ffn(stat: torch.Tensor, model: ModelConfig, options: Mapping[str, Any]):
    """An FFN neuron: sum over tokens of ``|X W1^T|``."""
    return argsort(stat), stat.tolist()


def _permute_ffn(sd: StateDict, model: ModelConfig, order: Order, layer: int, blocks: int):
    """Neurons are dealt round-robin over the nesting blocks, so every block's prefix (hence
    every TP rank's share) holds top-ranked neurons."""
    order, p = block_interleave(order, blocks), f"decoder.layers.{layer}.mlp."
    sd[p + "linear_fc1.weight"] = take(sd[p + "linear_fc1.weight"], 0, order)
    sd[p + "linear_fc2.weight"] = take(sd[p + "linear_fc2.weight"], 1, order)


def _check_ffn_blocks(choices, model: ModelConfig, elastic: ElasticConfig, parallel) -> None:
    blocks, tp = elastic.ffn_nesting_blocks, parallel.tensor_parallel_size
    if model.ffn_hidden_size % blocks:
        raise ValueError(
            f"ElasticConfig.ffn_nesting_blocks={blocks} must divide ffn_hidden_size="
            f"{model.ffn_hidden_size}"
        )
    if blocks % tp:
        raise ValueError(
            f"ElasticConfig.ffn_nesting_blocks={blocks} must be a multiple of "
            f"tensor_parallel_size={tp} so every rank keeps the same number of active FFN "
            f"neurons; use ffn_nesting_blocks={tp * max(1, blocks // tp)} or a TP size "
            f"dividing {blocks}"
        )


FFN = Axis(
    name="ffn",
    kind="mlp",
    full=lambda m: m.ffn_hidden_size,
    label="FFN neurons",
    config_field="ffn_choices",
    groups=lambda m, e: e.ffn_nesting_blocks if e is not None else 1,
    unit="FFN nesting block",
    check=_check_ffn_blocks,
    rank=_rank_ffn,
    permute=_permute_ffn,
)

# ---- layer kinds ----------------------------------------------------------------------------


def _mamba_params(model: ModelConfig, hidden: Number, s: Mapping[str, Number]) -> Number:
    return mamba_layer_params(
        hidden,
        s["mamba_heads"],
        s["mamba_head_dim"],
        model.mamba_num_groups,
        model.mamba_state_dim,
        model.mamba_conv_kernel,
    )


def _mamba_state(model: ModelConfig, s: Mapping[str, Number], tokens: int, batch: int, nbytes):
    """Conv state (kernel x conv channels) + SSM state (heads x head_dim x state), per sequence."""
    heads, head_dim = s["mamba_heads"], s["mamba_head_dim"]
    layout = MambaLayout(heads, head_dim, model.mamba_num_groups, model.mamba_state_dim)
    conv = layout.conv_size * model.mamba_conv_kernel
    ssm = heads * head_dim * model.mamba_state_dim
    return (conv + ssm) * batch * nbytes


def _attention_params(model: ModelConfig, hidden: Number, s: Mapping[str, Number]) -> Number:
    return attention_layer_params(
        hidden, s["attention_heads"], model.num_query_groups, model.head_dim
    )


def _kv_cache(model: ModelConfig, s: Mapping[str, Number], tokens: int, batch: int, nbytes):
    """Keys and values of every cached token; key/value heads are not elastic."""
    return 2 * model.num_query_groups * model.head_dim * tokens * batch * nbytes


MAMBA = LayerKind(
    "mamba",
    "M",
    ("mamba_heads", "mamba_head_dim"),
    _mamba_params,
    _mamba_state,
    "mamba_state",
)
ATTENTION = LayerKind(
    "attention", "*", ("attention_heads",), _attention_params, _kv_cache, "kv_cache"
)
MLP = LayerKind("mlp", "-", ("ffn",), lambda m, h, s: mlp_layer_params(h, s["ffn"]))


# Registration order is the router's draw order (changing it changes sampled architectures).
# The mixture-of-experts axes and layer kind follow in moe_axes.py.
register(HIDDEN, ATTENTION_HEADS, MAMBA_HEADS, MAMBA_HEAD_DIM, FFN, DEPTH, MAMBA, ATTENTION, MLP)
