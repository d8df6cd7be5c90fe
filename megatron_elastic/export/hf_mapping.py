"""Parameter names of megatron-core's ``HybridModel`` (our local spec, TP=1) and of Hugging Face
NemotronH, as one declarative table per layer kind.

Every mapping pairs megatron name templates with HF name templates (``{layer}`` is the layer
index, the same on both sides; ``{expert}`` a routed expert's, read from the tensors present:
:class:`PerExpert`). Most tensors are equal on both sides (:class:`Rename`); the irregular ones are
the MoE router's expert bias (:class:`RouterGate`: optional in megatron, always present in HF) and
attention's fused ``linear_qkv`` (:class:`FusedQKV`), which megatron stores
grouped per query group (:class:`~megatron_elastic.model.layouts.AttentionLayout`) and HF as
separate ``q_proj``/``k_proj``/``v_proj``. Mamba's packed ``in_proj`` has the same row order on
both sides at TP=1 (:class:`~megatron_elastic.model.layouts.MambaLayout`), so it is a plain
rename. Sizes are read from the tensors, so the same table serves
models whose layers have different widths (heterogeneous budgets). :func:`to_hf_state_dict` and
:func:`from_hf_state_dict` apply the table and refuse missing or left-over tensors.
"""

from __future__ import annotations

import re
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
    "LayerLayout",
    "ParamMapping",
    "PerExpert",
    "Rename",
    "RouterGate",
]


@dataclass(frozen=True)
class LayerLayout:
    """What the transforms need besides the tensors (the same for every layer)."""

    num_query_groups: int
    """Key/value heads; megatron groups query heads by them."""
    head_dim: int
    """Channels per attention head."""
    expert_bias: bool = False
    """The megatron model's MoE routers carry an expert bias (``moe_router_enable_expert_bias``)."""


@dataclass(frozen=True)
class ParamMapping:
    """Megatron tensors ``megatron`` <-> HF tensors ``hf`` (name templates with ``{layer}``)."""

    megatron: tuple[str, ...]
    hf: tuple[str, ...]

    def megatron_names(self, layer: int | None) -> tuple[str, ...]:
        return tuple(t.format(layer=layer) for t in self.megatron)

    def hf_names(self, layer: int | None) -> tuple[str, ...]:
        return tuple(t.format(layer=layer) for t in self.hf)

    def instances(
        self, layer: int | None, src: Mapping[str, torch.Tensor], layout: LayerLayout, to_hf: bool
    ) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """(source names, target names) of each conversion this mapping makes in ``layer``."""
        m, h = self.megatron_names(layer), self.hf_names(layer)
        return [(m, h) if to_hf else (h, m)]

    def to_hf(self, tensors: Sequence[torch.Tensor], layout: LayerLayout) -> list[torch.Tensor]:
        raise NotImplementedError

    def to_megatron(
        self, tensors: Sequence[torch.Tensor], layout: LayerLayout
    ) -> list[torch.Tensor]:
        raise NotImplementedError


class Rename(ParamMapping):
    """One tensor, the same values under another name."""

    def __init__(self, megatron: str, hf: str) -> None:
        super().__init__((megatron,), (hf,))

    def to_hf(self, tensors: Sequence[torch.Tensor], layout: LayerLayout) -> list[torch.Tensor]:
        return list(tensors)

    def to_megatron(
        self, tensors: Sequence[torch.Tensor], layout: LayerLayout
    ) -> list[torch.Tensor]:
        return list(tensors)


class PerExpert(Rename):
    """One tensor per routed expert: ``{expert}`` in both templates. The experts converted are
    those the source holds for the layer (a budget may keep fewer than the parent)."""

    def instances(
        self, layer: int | None, src: Mapping[str, torch.Tensor], layout: LayerLayout, to_hf: bool
    ) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        (m,), (h,) = self.megatron, self.hf
        source, target = (m, h) if to_hf else (h, m)
        head, tail = source.format(layer=layer, expert="{expert}").split("{expert}")
        found = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + "$")
        experts = sorted(int(g.group(1)) for k in src if (g := found.match(k)))
        if experts != list(range(len(experts))) or not experts:
            raise ValueError(
                f"layer {layer}: routed experts {experts} under {head}N{tail}; expected 0..N-1"
            )
        return [
            ((source.format(layer=layer, expert=e),), (target.format(layer=layer, expert=e),))
            for e in experts
        ]


class RouterGate(ParamMapping):
    """megatron ``router.weight`` (+ ``router.expert_bias`` when the model has one) <-> HF
    ``gate.weight`` + ``gate.e_score_correction_bias`` (always present: zeros when megatron has no
    bias; refused on import unless zero, as the bias changes which experts are chosen)."""

    def __init__(self, weight: str, bias: str, hf_weight: str, hf_bias: str) -> None:
        super().__init__((weight, bias), (hf_weight, hf_bias))

    def megatron_names_for(self, layer: int | None, layout: LayerLayout) -> tuple[str, ...]:
        names = self.megatron_names(layer)
        return names if layout.expert_bias else names[:1]

    def instances(
        self, layer: int | None, src: Mapping[str, torch.Tensor], layout: LayerLayout, to_hf: bool
    ) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        m, h = self.megatron_names_for(layer, layout), self.hf_names(layer)
        return [(m, h) if to_hf else (h, m)]

    def to_hf(self, tensors: Sequence[torch.Tensor], layout: LayerLayout) -> list[torch.Tensor]:
        weight = tensors[0]
        bias = tensors[1] if layout.expert_bias else torch.zeros(weight.size(0))
        return [weight.float(), bias.float()]  # transformers keeps the router in fp32

    def to_megatron(
        self, tensors: Sequence[torch.Tensor], layout: LayerLayout
    ) -> list[torch.Tensor]:
        weight, bias = tensors
        if layout.expert_bias:
            return [weight, bias]
        if bias.abs().max() > 0:
            raise ValueError(
                "the HF router has a nonzero e_score_correction_bias; convert with "
                "moe_router_enable_expert_bias so it is kept"
            )
        return [weight]


class FusedQKV(ParamMapping):
    """megatron ``linear_qkv`` (:class:`~megatron_elastic.model.layouts.AttentionLayout`) <-> HF
    q/k/v_proj."""

    def __init__(self, megatron: str, q: str, k: str, v: str) -> None:
        super().__init__((megatron,), (q, k, v))

    def to_hf(self, tensors: Sequence[torch.Tensor], qkv: LayerLayout) -> list[torch.Tensor]:
        (fused,) = tensors
        layout = AttentionLayout.from_rows(fused.size(0), qkv.num_query_groups, qkv.head_dim)
        return [t.contiguous() for t in layout.split(fused)]  # heads group-major, as HF's GQA

    def to_megatron(self, tensors: Sequence[torch.Tensor], qkv: LayerLayout) -> list[torch.Tensor]:
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
    "moe": (
        Rename(_M + "pre_mlp_layernorm.weight", _H + "norm.weight"),
        RouterGate(
            _M + "mlp.router.weight",
            _M + "mlp.router.expert_bias",
            _H + "mixer.gate.weight",
            _H + "mixer.gate.e_score_correction_bias",
        ),
        PerExpert(
            _M + "mlp.experts.local_experts.{expert}.linear_fc1.weight",
            _H + "mixer.experts.{expert}.up_proj.weight",
        ),
        PerExpert(
            _M + "mlp.experts.local_experts.{expert}.linear_fc2.weight",
            _H + "mixer.experts.{expert}.down_proj.weight",
        ),
        Rename(
            _M + "mlp.shared_experts.linear_fc1.weight", _H + "mixer.shared_experts.up_proj.weight"
        ),
        Rename(
            _M + "mlp.shared_experts.linear_fc2.weight",
            _H + "mixer.shared_experts.down_proj.weight",
        ),
    ),
}
"""Tensors of one layer of each kind (``ModelConfig.layer_kinds()``)."""


# ---- applying the table ---------------------------------------------------------------------


def _convert(
    state: Mapping[str, torch.Tensor], kinds: Sequence[str], layout: LayerLayout, *, to_hf: bool
) -> dict[str, torch.Tensor]:
    src = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    plan = [(m, None, "global") for m in GLOBAL_MAPPINGS]
    plan += [(m, i, kind) for i, kind in enumerate(kinds) for m in LAYER_MAPPINGS[kind]]
    out: dict[str, torch.Tensor] = {}
    for mapping, layer, kind in plan:
        for names_in, names_out in mapping.instances(layer, src, layout, to_hf):
            missing = [n for n in names_in if n not in src]
            if missing:
                where = "" if layer is None else f" (layer {layer} is a {kind} layer)"
                raise ValueError(f"the state dict lacks {missing}{where}")
            tensors = [src.pop(n) for n in names_in]
            convert = mapping.to_hf if to_hf else mapping.to_megatron
            out.update(zip(names_out, convert(tensors, layout), strict=True))
    if src:
        raise ValueError(
            f"{len(src)} tensor(s) do not belong to a {''.join(_KIND_SYMBOL[k] for k in kinds)!r} "
            f"model: {sorted(src)[:6]}"
        )
    return out


def _layout(cfg: ModelConfig) -> LayerLayout:
    return LayerLayout(cfg.num_query_groups, cfg.head_dim, cfg.moe_router_enable_expert_bias)


def to_hf_state_dict(
    state: Mapping[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """megatron ``HybridModel`` tensors (TP=1, PP=1) -> NemotronH tensors (on-disk names).
    Per-layer widths may differ (only the pattern, query groups and head dim are read)."""
    return _convert(state, cfg.layer_kinds(), _layout(cfg), to_hf=True)


def from_hf_state_dict(
    state: Mapping[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """NemotronH tensors (``backbone.*`` on disk or ``model.*`` in memory) -> megatron names."""
    renamed = {("backbone." + k[6:] if k.startswith("model.") else k): v for k, v in state.items()}
    return _convert(renamed, cfg.layer_kinds(), _layout(cfg), to_hf=False)
