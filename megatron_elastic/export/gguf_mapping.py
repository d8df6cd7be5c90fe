"""Parameter names of megatron-core's ``HybridModel`` (our local spec, TP=1) and of llama.cpp's
``nemotron_h`` GGUF tensors, as one declarative table per layer kind.

Each :class:`GGUFMapping` pairs one megatron name template (``{layer}``: the layer index) with
the GGUF tensor(s) it becomes (names from the ``gguf`` package's ``TENSOR_NAMES``, ``{bid}``: the
same index) and the transform llama.cpp's loader needs, read from llama.cpp's converter
(``conversion/mamba.py``, ``conversion/nemotron.py``) and loader (``src/models/nemotron-h.cpp``):

- ``A_log`` is stored as ``A = -exp(A_log)``, one column per head (ggml shape ``{1, n_head}``);
- ``D`` likewise one column per head;
- the Mamba gated norm weight is grouped, ``(n_group, d_inner / n_group)``, because llama.cpp
  normalises each group separately, as megatron's ``RMSNormGated(group_size=d_inner / n_group)``;
- the depthwise conv weight ``(channels, 1, kernel)`` loses its middle axis;
- attention's fused ``linear_qkv`` is split into separate q/k/v
  (:meth:`~megatron_elastic.model.layouts.AttentionLayout.split`, as for HF; query heads
  group-major, which is how ggml broadcasts grouped K/V heads).

- an MoE layer's routed experts (``local_experts.{e}``) are stacked into one tensor per
  projection (``ffn_up_exps`` (experts, ffn, hidden), ``ffn_down_exps`` (experts, hidden, ffn):
  ggml's ``{hidden, ffn, experts}`` / ``{ffn, hidden, experts}``, what
  ``src/models/nemotron-h.cpp`` creates for ``nemotron_h_moe``); the router's expert bias is
  ``exp_probs_b.bias`` (zeros when the router has none: llama.cpp requires the tensor).

Everything else is the same tensor under a new name. A torch ``(out, in)`` weight is ggml's
``{in, out}``, so matrices need no transpose. Sizes are read from the tensors, so per-layer FFN
widths and attention heads (heterogeneous budgets) go through the same table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from gguf import MODEL_TENSOR, TENSOR_NAMES

from megatron_elastic.config import LAYER_SYMBOLS
from megatron_elastic.model.layouts import AttentionLayout

__all__ = [
    "GGUF_EXPERT_MAPPINGS",
    "GGUF_GLOBAL_MAPPINGS",
    "GGUF_LAYER_MAPPINGS",
    "GGUFLayout",
    "GGUFMapping",
    "TRANSFORMS",
    "to_gguf_tensors",
]


@dataclass(frozen=True)
class GGUFLayout:
    """The global dims the transforms need (the same for every layer)."""

    num_query_groups: int
    """Key/value heads of every attention layer."""
    head_dim: int
    """Channels per attention head."""
    mamba_num_groups: int
    """Mamba B/C groups; the gated norm is grouped by them."""


Transform = Callable[[torch.Tensor, GGUFLayout], list[torch.Tensor]]


def _same(t: torch.Tensor, layout: GGUFLayout) -> list[torch.Tensor]:
    return [t]


def _a_from_a_log(t: torch.Tensor, layout: GGUFLayout) -> list[torch.Tensor]:
    return [(-torch.exp(t.float())).reshape(-1, 1)]  # (n_head, 1): ggml {1, n_head}


def _per_head_column(t: torch.Tensor, layout: GGUFLayout) -> list[torch.Tensor]:
    return [t.reshape(-1, 1)]  # (n_head, 1): ggml {1, n_head}


def _grouped_norm(t: torch.Tensor, layout: GGUFLayout) -> list[torch.Tensor]:
    groups = layout.mamba_num_groups
    if t.numel() % groups:
        raise ValueError(f"Mamba norm of {t.numel()} channels is not divisible by {groups} groups")
    return [t.reshape(groups, -1)]  # (n_group, d_inner / n_group): ggml {d_inner/n_group, n_group}


def _squeeze_conv(t: torch.Tensor, layout: GGUFLayout) -> list[torch.Tensor]:
    return [t.reshape(t.size(0), t.size(-1))]  # (channels, 1, kernel) -> (channels, kernel)


def _split_qkv(t: torch.Tensor, layout: GGUFLayout) -> list[torch.Tensor]:
    qkv = AttentionLayout.from_rows(t.size(0), layout.num_query_groups, layout.head_dim)
    return list(qkv.split(t))


TRANSFORMS: dict[str, Transform] = {
    "same": _same,
    "a_from_a_log": _a_from_a_log,
    "per_head_column": _per_head_column,
    "grouped_norm": _grouped_norm,
    "squeeze_conv": _squeeze_conv,
    "split_qkv": _split_qkv,
}
"""Megatron tensor -> the GGUF tensor(s) llama.cpp's loader expects (see the module docstring)."""


def _name(tensor: MODEL_TENSOR, suffix: str | None) -> str:
    base = TENSOR_NAMES[tensor]
    return base if suffix is None else f"{base}.{suffix}"


@dataclass(frozen=True)
class GGUFMapping:
    """One megatron tensor -> GGUF tensor(s), through ``TRANSFORMS[transform]``."""

    megatron: str
    """Megatron name template (``{layer}`` = the layer index)."""
    gguf: tuple[str, ...]
    """GGUF name templates (``{bid}`` = the same index), in the order the transform returns."""
    transform: str = "same"
    """Key of :data:`TRANSFORMS`."""

    def megatron_name(self, layer: int | None, expert: int | None = None) -> str:
        return self.megatron.format(layer=layer, expert=expert)

    def gguf_names(self, layer: int | None) -> tuple[str, ...]:
        return tuple(t.format(bid=layer) for t in self.gguf)


def _map(megatron: str, *targets: tuple[MODEL_TENSOR, str | None], transform: str = "same"):
    return GGUFMapping(megatron, tuple(_name(t, s) for t, s in targets), transform)


_M = "decoder.layers.{layer}."
_W = "weight"

GGUF_GLOBAL_MAPPINGS: tuple[GGUFMapping, ...] = (
    _map("embedding.word_embeddings.weight", (MODEL_TENSOR.TOKEN_EMBD, _W)),
    _map("decoder.final_norm.weight", (MODEL_TENSOR.OUTPUT_NORM, _W)),
    _map("output_layer.weight", (MODEL_TENSOR.OUTPUT, _W)),
)
"""Tensors outside the layer stack (embedding and output stay separate: untied)."""

GGUF_LAYER_MAPPINGS: dict[str, tuple[GGUFMapping, ...]] = {
    "mamba": (
        _map(_M + "norm.weight", (MODEL_TENSOR.ATTN_NORM, _W)),
        _map(_M + "mixer.in_proj.weight", (MODEL_TENSOR.SSM_IN, _W)),  # MambaLayout.in_proj
        _map(_M + "mixer.conv1d_weight", (MODEL_TENSOR.SSM_CONV1D, _W), transform="squeeze_conv"),
        _map(_M + "mixer.conv1d_bias", (MODEL_TENSOR.SSM_CONV1D, "bias")),
        _map(_M + "mixer.dt_bias", (MODEL_TENSOR.SSM_DT, "bias")),
        _map(_M + "mixer.A_log", (MODEL_TENSOR.SSM_A, None), transform="a_from_a_log"),
        _map(_M + "mixer.D", (MODEL_TENSOR.SSM_D, None), transform="per_head_column"),
        _map(_M + "mixer.norm.weight", (MODEL_TENSOR.SSM_NORM, _W), transform="grouped_norm"),
        _map(_M + "mixer.out_proj.weight", (MODEL_TENSOR.SSM_OUT, _W)),
    ),
    "attention": (
        _map(_M + "input_layernorm.weight", (MODEL_TENSOR.ATTN_NORM, _W)),
        _map(
            _M + "self_attention.linear_qkv.weight",
            (MODEL_TENSOR.ATTN_Q, _W),
            (MODEL_TENSOR.ATTN_K, _W),
            (MODEL_TENSOR.ATTN_V, _W),
            transform="split_qkv",
        ),
        _map(_M + "self_attention.linear_proj.weight", (MODEL_TENSOR.ATTN_OUT, _W)),
    ),
    "mlp": (
        _map(_M + "pre_mlp_layernorm.weight", (MODEL_TENSOR.ATTN_NORM, _W)),  # "all blocks"
        _map(_M + "mlp.linear_fc1.weight", (MODEL_TENSOR.FFN_UP, _W)),
        _map(_M + "mlp.linear_fc2.weight", (MODEL_TENSOR.FFN_DOWN, _W)),
    ),
    "moe": (
        _map(_M + "pre_mlp_layernorm.weight", (MODEL_TENSOR.ATTN_NORM, _W)),
        _map(_M + "mlp.router.weight", (MODEL_TENSOR.FFN_GATE_INP, _W)),
        _map(_M + "mlp.router.expert_bias", (MODEL_TENSOR.FFN_EXP_PROBS_B, "bias")),
        _map(_M + "mlp.shared_experts.linear_fc1.weight", (MODEL_TENSOR.FFN_UP_SHEXP, _W)),
        _map(_M + "mlp.shared_experts.linear_fc2.weight", (MODEL_TENSOR.FFN_DOWN_SHEXP, _W)),
    ),
}
"""Tensors of one layer of each kind (``ModelConfig.layer_kinds()``); llama.cpp calls every
layer's pre-norm ``attn_norm``."""

GGUF_EXPERT_MAPPINGS: tuple[GGUFMapping, ...] = (
    GGUFMapping(
        _M + "mlp.experts.local_experts.{expert}.linear_fc1.weight",
        (_name(MODEL_TENSOR.FFN_UP_EXP, _W),),
    ),
    GGUFMapping(
        _M + "mlp.experts.local_experts.{expert}.linear_fc2.weight",
        (_name(MODEL_TENSOR.FFN_DOWN_EXP, _W),),
    ),
)
"""An MoE layer's per-expert tensors (``{expert}``: 0 .. experts-1) -> one GGUF tensor each,
stacked over the experts (expert-major)."""

_KIND_SYMBOL = {kind: symbol for symbol, kind in LAYER_SYMBOLS.items()}


def to_gguf_tensors(
    state: Mapping[str, torch.Tensor], kinds: Sequence[str], layout: GGUFLayout
) -> dict[str, torch.Tensor]:
    """megatron ``HybridModel`` tensors (TP=1, PP=1; layers numbered like ``kinds``) -> GGUF
    tensors (fp32, contiguous). ``ValueError`` for a missing or left-over tensor."""
    src = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    out: dict[str, torch.Tensor] = {}
    for i, kind in enumerate(kinds):
        if kind == "moe":
            out.update(_stack_experts(src, i))
    plan = [(m, None, "global") for m in GGUF_GLOBAL_MAPPINGS]
    plan += [(m, i, kind) for i, kind in enumerate(kinds) for m in GGUF_LAYER_MAPPINGS[kind]]
    for mapping, layer, kind in plan:
        name = mapping.megatron_name(layer)
        if name not in src:
            where = "" if layer is None else f" (layer {layer} is a {kind} layer)"
            raise ValueError(f"the state dict lacks {name!r}{where}")
        converted = TRANSFORMS[mapping.transform](src.pop(name).detach().float().cpu(), layout)
        for gguf_name, tensor in zip(mapping.gguf_names(layer), converted, strict=True):
            out[gguf_name] = tensor.contiguous()
    if src:
        raise ValueError(
            f"{len(src)} tensor(s) do not belong to a {''.join(_KIND_SYMBOL[k] for k in kinds)!r} "
            f"model: {sorted(src)[:6]}"
        )
    return out


def _stack_experts(src: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """Pop MoE layer ``layer``'s routed experts from ``src`` and stack each projection; a router
    without an expert bias gets a zero one (llama.cpp requires the tensor; zeros choose alike)."""
    router = src.get(_M.format(layer=layer) + "mlp.router.weight")
    if router is None:
        raise ValueError(f"the state dict lacks layer {layer}'s MoE router (a moe layer)")
    bias = _M.format(layer=layer) + "mlp.router.expert_bias"
    src.setdefault(bias, torch.zeros(router.size(0)))
    out = {}
    for mapping in GGUF_EXPERT_MAPPINGS:
        names = [mapping.megatron_name(layer, e) for e in range(router.size(0))]
        missing = [n for n in names if n not in src]
        if missing:
            raise ValueError(f"the state dict lacks {missing[0]!r} (layer {layer} is a moe layer)")
        stacked = torch.stack([src.pop(n).detach().float().cpu() for n in names])
        out[mapping.gguf_names(layer)[0]] = stacked.contiguous()
    return out
