"""The weights one budget decodes with: a :class:`ServingNet` (per-layer tensors and sizes).

For an elastic checkpoint the tensors are exactly those slice mode computes with
(:meth:`ElasticHybridModel.sliced_state_dict` with ``copy=False``): views of the loaded
parameters wherever the active part is a contiguous prefix (the hidden width, whole layers at
their full size), copies only where the active rows are not contiguous (Mamba and attention heads
trimmed within groups, FFN neurons within nesting blocks). So the full budget costs no extra
memory and a smaller budget at most a copy of its own (smaller) weights, held while it is the
active budget. A plain (exported) model serves its parameters as they are.

A mixture-of-experts (``E``) layer keeps the kept experts' tensors (a prefix of the parent's
experts, renumbered ``0..kept-1``, their kept neurons), the router's gate rows and expert bias for
them, and the shared expert's kept neurons; :class:`MoERouting` carries megatron's routing options
(one set for the model), so the serving forward routes exactly as megatron's router does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from megatron_elastic.config import ModelConfig
from megatron_elastic.elastic.model import ElasticHybridModel
from megatron_elastic.elastic.subnet import SubnetSpec
from megatron_elastic.model.layouts import AttentionLayout, MambaLayout

__all__ = ["MoERouting", "ServingLayer", "ServingNet", "build_serving_net"]

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


@dataclass(frozen=True)
class MoERouting:
    """megatron's top-k routing options (``TransformerConfig.moe_router_*``) of the ``E`` layers."""

    topk: int
    """Experts per token (the parent's; kept experts are never fewer)."""
    score_function: str
    """``sigmoid`` or ``softmax``."""
    pre_softmax: bool
    """Softmax before the top-k (softmax router only)."""
    num_groups: int | None
    """Expert groups of group-limited routing (``None``: not group-limited)."""
    group_topk: int | None
    """Groups each token may route to."""
    scaling_factor: float | None
    """Multiplies the (renormalised) top-k weights."""
    router_dtype: torch.dtype | None
    """The gate's output dtype (``None``: the hidden states')."""

    @classmethod
    def of(cls, config) -> MoERouting:
        """The options of a megatron ``TransformerConfig``."""
        return cls(
            config.moe_router_topk,
            config.moe_router_score_function,
            config.moe_router_pre_softmax,
            config.moe_router_num_groups,
            config.moe_router_group_topk,
            config.moe_router_topk_scaling_factor,
            _ROUTER_DTYPES.get(config.moe_router_dtype),
        )


@dataclass(frozen=True)
class ServingLayer:
    """One layer that runs, with its (sliced) tensors under short names."""

    index: int
    """Layer number in the model that holds the weights (0-based)."""
    kind: str
    """``mamba``, ``attention``, ``mlp`` or ``moe``."""
    weights: dict[str, torch.Tensor]
    """``norm`` and the mixer's tensors: Mamba ``in_proj, conv_weight (C, 1, K), conv_bias,
    dt_bias, A_log, D, norm_weight, out_proj``; attention ``qkv, proj``; MLP ``fc1, fc2``; MoE
    ``router`` (experts, hidden), ``fc1.{e}, fc2.{e}`` per kept expert and, with a shared expert,
    ``shared_fc1, shared_fc2``."""
    num_heads: int = 0
    """Active Mamba heads, or active attention query heads."""
    head_dim: int = 0
    """Mamba channels per head, or attention head dim."""
    num_groups: int = 0
    """Mamba groups (B/C), or attention key/value groups."""
    state_dim: int = 0
    """Mamba state size (0 for other kinds)."""
    num_experts: int = 0
    """Kept routed experts (an MoE layer)."""
    expert_bias: torch.Tensor | None = None
    """The router's per-expert score bias (a buffer, not a weight: added for the choice only)."""

    @cached_property
    def attention_layout(self) -> AttentionLayout:
        """How ``qkv``'s rows are laid out (an attention layer)."""
        groups = self.num_groups
        return AttentionLayout(groups, self.num_heads // groups, self.head_dim)

    @cached_property
    def mamba_layout(self) -> MambaLayout:
        """How ``in_proj``'s rows and the conv's channels are laid out (a Mamba layer)."""
        return MambaLayout(self.num_heads, self.head_dim, self.num_groups, self.state_dim)


@dataclass(frozen=True)
class ServingNet:
    """A decodable network: embedding, the layers that run, final norm, output layer."""

    hidden: int
    """Active embedding width."""
    embedding: torch.Tensor
    """(vocab, hidden) (a view of the parent's when sliced)."""
    layers: tuple[ServingLayer, ...]
    final_norm: torch.Tensor
    output: torch.Tensor
    """(vocab, hidden)."""
    eps: float
    activation: Callable[[torch.Tensor], torch.Tensor]
    """The MLP's activation (squared ReLU for NemotronH)."""
    chunk_size: int
    """Mamba scan chunk for prefills."""
    conv_kernel: int
    max_sequence_length: int
    moe: MoERouting | None = None
    """Routing of the ``E`` layers (``None``: the model has none)."""

    @property
    def vocab_size(self) -> int:
        return self.output.size(0)

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.dtype


_MAMBA = {
    "norm.weight": "norm",
    "mixer.in_proj.weight": "in_proj",
    "mixer.conv1d_weight": "conv_weight",
    "mixer.conv1d_bias": "conv_bias",
    "mixer.dt_bias": "dt_bias",
    "mixer.A_log": "A_log",
    "mixer.D": "D",
    "mixer.norm.weight": "norm_weight",
    "mixer.out_proj.weight": "out_proj",
}
_ATTENTION = {
    "input_layernorm.weight": "norm",
    "self_attention.linear_qkv.weight": "qkv",
    "self_attention.linear_proj.weight": "proj",
}
_MLP = {
    "pre_mlp_layernorm.weight": "norm",
    "mlp.linear_fc1.weight": "fc1",
    "mlp.linear_fc2.weight": "fc2",
}


def _layer(j: int, sd: dict[str, torch.Tensor], cfg: ModelConfig) -> ServingLayer:
    prefix = f"decoder.layers.{j}."
    if prefix + "mixer.in_proj.weight" in sd:
        w = {short: sd[prefix + name] for name, short in _MAMBA.items()}
        m = MambaLayout.from_conv(
            w["conv_weight"].size(0),
            w["dt_bias"].numel(),
            cfg.mamba_num_groups,
            cfg.mamba_state_dim,
        )
        return ServingLayer(j, "mamba", w, m.num_heads, m.head_dim, m.num_groups, m.state_dim)
    if prefix + "self_attention.linear_qkv.weight" in sd:
        w = {short: sd[prefix + name] for name, short in _ATTENTION.items()}
        a = AttentionLayout.from_rows(w["qkv"].size(0), cfg.num_query_groups, cfg.head_dim)
        return ServingLayer(j, "attention", w, a.num_heads, a.head_dim, a.num_groups)
    if prefix + "mlp.router.weight" in sd:
        return _moe_layer(j, sd, prefix)
    w = {short: sd[prefix + name] for name, short in _MLP.items()}
    return ServingLayer(j, "mlp", w)


def _moe_layer(j: int, sd: dict[str, torch.Tensor], prefix: str) -> ServingLayer:
    router = sd[prefix + "mlp.router.weight"]
    w = {"norm": sd[prefix + "pre_mlp_layernorm.weight"], "router": router}
    for e in range(router.size(0)):
        expert = f"{prefix}mlp.experts.local_experts.{e}."
        w[f"fc1.{e}"] = sd[expert + "linear_fc1.weight"]
        w[f"fc2.{e}"] = sd[expert + "linear_fc2.weight"]
    if prefix + "mlp.shared_experts.linear_fc1.weight" in sd:
        w["shared_fc1"] = sd[prefix + "mlp.shared_experts.linear_fc1.weight"]
        w["shared_fc2"] = sd[prefix + "mlp.shared_experts.linear_fc2.weight"]
    bias = sd.get(prefix + "mlp.router.expert_bias")
    if bias is not None:  # megatron keeps it in float32 whatever the model's dtype
        bias = bias.float()
    return ServingLayer(j, "moe", w, num_experts=router.size(0), expert_bias=bias)


@torch.no_grad()
def build_serving_net(
    model: nn.Module, model_config: ModelConfig, spec: SubnetSpec | None = None
) -> ServingNet:
    """The decodable network of ``model`` at ``spec`` (an elastic model's sub-network; ``None``:
    the model's own parameters, e.g. an exported budget or the elastic parent). The model must
    be whole on this rank (TP = PP = 1)."""
    if not (getattr(model, "pre_process", True) and getattr(model, "post_process", True)):
        raise ValueError("cached generation needs the whole model on this rank (PP = 1)")
    tp = getattr(model, "pg_collection", None)
    if tp is not None and tp.tp.size() > 1:
        raise ValueError("cached generation runs unsplit (tensor parallel size 1)")
    if spec is not None:
        if not isinstance(model, ElasticHybridModel):
            raise ValueError("a sub-network spec needs an elastic model")
        sd = model.sliced_state_dict(spec, copy=False)
    else:
        sd = {k: v.detach() for k, v in model.named_parameters()}
        sd.update((k, b) for k, b in model.named_buffers() if k.endswith("router.expert_bias"))
    indices = sorted({int(k.split(".")[2]) for k in sd if k.startswith("decoder.layers.")})
    embedding = sd["embedding.word_embeddings.weight"]
    return ServingNet(
        hidden=embedding.size(1),
        embedding=embedding,
        layers=tuple(_layer(j, sd, model_config) for j in indices),
        final_norm=sd["decoder.final_norm.weight"],
        output=sd["output_layer.weight"],
        eps=model_config.layernorm_epsilon,
        activation=model.config.activation_func,
        chunk_size=model_config.mamba_chunk_size,
        conv_kernel=model_config.mamba_conv_kernel,
        max_sequence_length=model_config.max_sequence_length,
        moe=MoERouting.of(model.config) if "E" in model_config.hybrid_pattern else None,
    )
