"""Parameter names of megatron-core's ``HybridModel`` (our local spec, TP=1) and of Hugging Face
NemotronH, as one declarative table per layer kind.

Every mapping pairs megatron name templates with HF name templates (``{layer}`` is the layer
index, the same on both sides). Most tensors are equal on both sides (:class:`Rename`); the one
irregular tensor is attention's fused ``linear_qkv`` (:class:`FusedQKV`), which megatron stores
grouped per query group (:class:`~megatron_elastic.model.layouts.AttentionLayout`) and HF as
separate ``q_proj``/``k_proj``/``v_proj``. Mamba's packed ``in_proj`` has the same row order on
both sides at TP=1 (:class:`~megatron_elastic.model.layouts.MambaLayout`), so it is a plain
rename. Sizes are read from the tensors, so the same table serves
models whose layers have different widths (heterogeneous budgets). :func:`to_hf_state_dict` and
:func:`from_hf_state_dict` apply the table and refuse missing or left-over tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from megatron_elastic.config import LAYER_SYMBOLS, ModelConfig
from megatron_elastic.model.layouts import AttentionLayout

__all__ = [
    "GLOBAL_MAPPINGS",
    "from_hf_state_dict",
    "to_hf_state_dict",
    "LAYER_MAPPINGS",
    "FusedQKV",
    "ParamMapping",
    "QKVLayout",
    "Rename",
]


@dataclass(frozen=True)
class QKVLayout:
    """What the fused QKV transform needs besides the tensors (the same for every layer)."""

    num_query_groups: int
    """Key/value heads; megatron groups query heads by them."""
    head_dim: int
    """Channels per attention head."""


@dataclass(frozen=True)
class ParamMapping:
    """Megatron tensors ``megatron`` <-> HF tensors ``hf`` (name templates with ``{layer}``)."""

    megatron: tuple[str, ...]
    hf: tuple[str, ...]

    def megatron_names(self, layer: int | None) -> tuple[str, ...]:
        return tuple(t.format(layer=layer) for t in self.megatron)

    def hf_names(self, layer: int | None) -> tuple[str, ...]:
        return tuple(t.format(layer=layer) for t in self.hf)

    def to_hf(self, tensors: Sequence[torch.Tensor], qkv: QKVLayout) -> list[torch.Tensor]:
        raise NotImplementedError

    def to_megatron(self, tensors: Sequence[torch.Tensor], qkv: QKVLayout) -> list[torch.Tensor]:
        raise NotImplementedError


class Rename(ParamMapping):
    """One tensor, the same values under another name."""

    def __init__(self, megatron: str, hf: str) -> None:
        super().__init__((megatron,), (hf,))

    def to_hf(self, tensors: Sequence[torch.Tensor], qkv: QKVLayout) -> list[torch.Tensor]:
        return list(tensors)

    def to_megatron(self, tensors: Sequence[torch.Tensor], qkv: QKVLayout) -> list[torch.Tensor]:
        return list(tensors)


class FusedQKV(ParamMapping):
    """megatron ``linear_qkv`` (:class:`~megatron_elastic.model.layouts.AttentionLayout`) <-> HF
    q/k/v_proj."""

    def __init__(self, megatron: str, q: str, k: str, v: str) -> None:
        super().__init__((megatron,), (q, k, v))

    def to_hf(self, tensors: Sequence[torch.Tensor], qkv: QKVLayout) -> list[torch.Tensor]:
        (fused,) = tensors
        layout = AttentionLayout.from_rows(fused.size(0), qkv.num_query_groups, qkv.head_dim)
        return [t.contiguous() for t in layout.split(fused)]  # heads group-major, as HF's GQA

    def to_megatron(self, tensors: Sequence[torch.Tensor], qkv: QKVLayout) -> list[torch.Tensor]:
        q, k, v = tensors
        groups, d = qkv.num_query_groups, qkv.head_dim
        if k.size(0) != groups * d or v.shape != k.shape or q.size(0) % (groups * d):
            raise ValueError(
                f"q/k/v_proj shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} do not "
                f"match {groups} key/value heads of head_dim {d}"
            )
        layout = AttentionLayout(groups, q.size(0) // (groups * d), d)
        return [layout.fuse(q, k, v).contiguous()]


_KIND_SYMBOL = {kind: symbol for symbol, kind in LAYER_SYMBOLS.items()}
_M = "decoder.layers.{layer}."
_H = "backbone.layers.{layer}."

GLOBAL_MAPPINGS: tuple[ParamMapping, ...] = (
    Rename("embedding.word_embeddings.weight", "backbone.embeddings.weight"),
    Rename("decoder.final_norm.weight", "backbone.norm_f.weight"),
    Rename("output_layer.weight", "lm_head.weight"),
)
"""Tensors outside the layer stack."""

LAYER_MAPPINGS: dict[str, tuple[ParamMapping, ...]] = {
    "mamba": (
        Rename(_M + "norm.weight", _H + "norm.weight"),
        Rename(_M + "mixer.in_proj.weight", _H + "mixer.in_proj.weight"),
        Rename(_M + "mixer.conv1d_weight", _H + "mixer.conv1d.weight"),
        Rename(_M + "mixer.conv1d_bias", _H + "mixer.conv1d.bias"),
        Rename(_M + "mixer.dt_bias", _H + "mixer.dt_bias"),
        Rename(_M + "mixer.A_log", _H + "mixer.A_log"),
        Rename(_M + "mixer.D", _H + "mixer.D"),
        Rename(_M + "mixer.norm.weight", _H + "mixer.norm.weight"),
        Rename(_M + "mixer.out_proj.weight", _H + "mixer.out_proj.weight"),
    ),
    "attention": (
        Rename(_M + "input_layernorm.weight", _H + "norm.weight"),
        FusedQKV(
            _M + "self_attention.linear_qkv.weight",
            _H + "mixer.q_proj.weight",
            _H + "mixer.k_proj.weight",
            _H + "mixer.v_proj.weight",
        ),
        Rename(_M + "self_attention.linear_proj.weight", _H + "mixer.o_proj.weight"),
    ),
    "mlp": (
        Rename(_M + "pre_mlp_layernorm.weight", _H + "norm.weight"),
        Rename(_M + "mlp.linear_fc1.weight", _H + "mixer.up_proj.weight"),
        Rename(_M + "mlp.linear_fc2.weight", _H + "mixer.down_proj.weight"),
    ),
}
"""Tensors of one layer of each kind (``ModelConfig.layer_kinds()``)."""


# ---- applying the table ---------------------------------------------------------------------


def _convert(
    state: Mapping[str, torch.Tensor], kinds: Sequence[str], qkv: QKVLayout, *, to_hf: bool
) -> dict[str, torch.Tensor]:
    src = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    plan = [(m, None, "global") for m in GLOBAL_MAPPINGS]
    plan += [(m, i, kind) for i, kind in enumerate(kinds) for m in LAYER_MAPPINGS[kind]]
    out: dict[str, torch.Tensor] = {}
    for mapping, layer, kind in plan:
        names_in = mapping.megatron_names(layer) if to_hf else mapping.hf_names(layer)
        names_out = mapping.hf_names(layer) if to_hf else mapping.megatron_names(layer)
        missing = [n for n in names_in if n not in src]
        if missing:
            where = "" if layer is None else f" (layer {layer} is a {kind} layer)"
            raise ValueError(f"the state dict lacks {missing}{where}")
        tensors = [src.pop(n) for n in names_in]
        converted = mapping.to_hf(tensors, qkv) if to_hf else mapping.to_megatron(tensors, qkv)
        out.update(zip(names_out, converted, strict=True))
    if src:
        raise ValueError(
            f"{len(src)} tensor(s) do not belong to a {''.join(_KIND_SYMBOL[k] for k in kinds)!r} "
            f"model: {sorted(src)[:6]}"
        )
    return out


def to_hf_state_dict(
    state: Mapping[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """megatron ``HybridModel`` tensors (TP=1, PP=1) -> NemotronH tensors (on-disk names).
    Per-layer widths may differ (only the pattern, query groups and head dim are read)."""
    qkv = QKVLayout(cfg.num_query_groups, cfg.head_dim)
    return _convert(state, cfg.layer_kinds(), qkv, to_hf=True)


def from_hf_state_dict(
    state: Mapping[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """NemotronH tensors (``backbone.*`` on disk or ``model.*`` in memory) -> megatron names."""
    renamed = {("backbone." + k[6:] if k.startswith("model.") else k): v for k, v in state.items()}
    qkv = QKVLayout(cfg.num_query_groups, cfg.head_dim)
    return _convert(renamed, cfg.layer_kinds(), qkv, to_hf=False)
