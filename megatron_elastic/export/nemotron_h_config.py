"""NemotronH ``config.json`` <-> :class:`ModelConfig`: what a stock ``nemotron_h`` config must
hold for megatron-elastic to build the same model, and the configs an export writes (stock
NemotronH, or the remote-code model of :mod:`.remote_code` for per-layer widths).

Two details keep the HF model computing the megatron model's function:

- megatron's Mamba mixer normalises its gated output with epsilon 1e-5 whatever
  ``layernorm_epsilon`` is, while stock NemotronH uses ``layer_norm_epsilon`` for both norms: only
  1e-5 is representable in the stock config.
- megatron applies no lower clamp to the Mamba step size ``dt``; transformers' NemotronH clamps it
  at ``time_step_min``. A fresh export writes ``time_step_min: 0.0`` (no clamp); a config converted
  from HF keeps its own value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from megatron_elastic.config import LAYER_SYMBOLS, ModelConfig
from megatron_elastic.elastic.subnet import LayerChoice
from megatron_elastic.export import remote_code

__all__ = [
    "MAMBA_NORM_EPSILON",
    "hf_config_from_model",
    "hf_pattern",
    "layer_pattern",
    "model_config_from_hf",
    "nemotron_h_defaults",
    "remote_code_config",
]

MAMBA_NORM_EPSILON = 1e-5
"""Epsilon of megatron-core's gated RMSNorm inside the Mamba mixer (fixed there)."""

_SYMBOL_OF_BLOCK = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
_BLOCK_OF_SYMBOL = {s: b for b, s in _SYMBOL_OF_BLOCK.items()}
_KIND_SYMBOL = {kind: symbol for symbol, kind in LAYER_SYMBOLS.items()}

# Key: (required value, why). A config with another value computes something we cannot build.
_FIXED_KEYS: dict[str, tuple[Any, str]] = {
    "mlp_hidden_act": ("relu2", "MLPs are squared-ReLU"),
    "mamba_hidden_act": ("silu", "the Mamba conv activation is SiLU"),
    "tie_word_embeddings": (False, "input embedding and output layer are separate tensors"),
    "use_bias": (False, "linear layers have no bias"),
    "mlp_bias": (False, "linear layers have no bias"),
    "attention_bias": (False, "linear layers have no bias"),
    "mamba_proj_bias": (False, "linear layers have no bias"),
    "use_conv_bias": (True, "the Mamba conv has a bias"),
    "num_nextn_predict_layers": (0, "multi-token-prediction (MTP) layers are not supported"),
    "sliding_window": (None, "attention is global (no sliding window)"),
    "layer_norm_epsilon": (MAMBA_NORM_EPSILON, "megatron's Mamba gated norm uses eps 1e-5"),
}


def _decode_floats(value: Any) -> Any:
    """transformers writes inf/nan in config.json as ``{"__float__": "Infinity"}``."""
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"].replace("Infinity", "inf"))
        return {k: _decode_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_floats(v) for v in value]
    return value


def hf_pattern(hf: Mapping[str, Any]) -> str:
    """The layer pattern (``M``, ``*``, ``-``, ``E``) of a NemotronH config dict; ``ValueError``
    naming the first layer of an unknown kind."""
    blocks = hf.get("layers_block_type")
    if blocks is not None:
        unknown = [(i, b) for i, b in enumerate(blocks) if b not in _SYMBOL_OF_BLOCK]
        if unknown:
            i, b = unknown[0]
            raise ValueError(f"layer {i} has the unknown NemotronH block type {b!r}")
        pattern = "".join(_SYMBOL_OF_BLOCK[b] for b in blocks)
    elif hf.get("hybrid_override_pattern"):
        pattern = hf["hybrid_override_pattern"]
    else:
        raise ValueError("the config has neither layers_block_type nor hybrid_override_pattern")
    for i, symbol in enumerate(pattern):
        if symbol not in LAYER_SYMBOLS:
            raise ValueError(f"layer {i} has the unsupported layer symbol {symbol!r}")
    return pattern


def model_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a stock NemotronH ``config.json`` dict (missing keys take
    transformers' defaults). ``ValueError`` for what megatron-elastic cannot represent."""
    if hf.get("model_type") != "nemotron_h":
        raise ValueError(
            f"config model_type is {hf.get('model_type')!r}; only 'nemotron_h' converts"
        )
    from transformers import NemotronHConfig

    pattern = hf_pattern(hf)  # before NemotronHConfig, which accepts MoE layers
    full = NemotronHConfig.from_dict(_decode_floats(dict(hf)))
    for key, (value, why) in _FIXED_KEYS.items():
        got = getattr(full, key)
        if got != value:
            raise ValueError(f"config {key}={got!r} is not supported ({why}); it must be {value!r}")
    return ModelConfig(
        hybrid_pattern=pattern,
        hidden_size=full.hidden_size,
        ffn_hidden_size=full.intermediate_size,
        num_attention_heads=full.num_attention_heads,
        num_query_groups=full.num_key_value_heads,
        head_dim=full.head_dim,
        mamba_num_heads=full.mamba_num_heads,
        mamba_head_dim=full.mamba_head_dim,
        mamba_num_groups=full.n_groups,
        mamba_state_dim=full.ssm_state_size,
        vocab_size=full.vocab_size,
        mamba_conv_kernel=full.conv_kernel,
        mamba_chunk_size=full.chunk_size,
        max_sequence_length=full.max_position_embeddings,
        layernorm_epsilon=full.layer_norm_epsilon,
        init_method_std=full.initializer_range,
        **(_moe_fields_from_hf(full) if "E" in pattern else {}),
    )


def _moe_fields_from_hf(full: Any) -> dict[str, Any]:
    """The ``moe_*`` :class:`ModelConfig` fields of a NemotronH MoE config, or ``ValueError`` for
    routing that megatron-core's router does not compute (see :func:`_moe_keys`)."""
    topk, groups, group_topk = full.num_experts_per_tok, full.n_group, full.topk_group
    if getattr(full, "moe_latent_size", None) is not None:
        raise ValueError("config moe_latent_size is not supported (latent MoE projections)")
    if bool(full.norm_topk_prob) != (topk > 1):
        raise ValueError(
            f"config norm_topk_prob={full.norm_topk_prob} with num_experts_per_tok={topk}: "
            "megatron-core's sigmoid router renormalises the top-k weights exactly when k > 1"
        )
    if groups > 1 and topk != 2 * group_topk:
        raise ValueError(
            f"config n_group={groups}, topk_group={group_topk}, num_experts_per_tok={topk}: "
            "NemotronH scores a group by its top-2 experts, megatron-core by its top "
            "num_experts_per_tok/topk_group; they agree only when that is 2"
        )
    return {
        "num_moe_experts": full.n_routed_experts,
        "moe_ffn_hidden_size": full.moe_intermediate_size,
        "moe_router_topk": topk,
        "moe_shared_expert_intermediate_size": full.moe_shared_expert_intermediate_size,
        "moe_router_score_function": "sigmoid",
        "moe_router_topk_scaling_factor": float(full.routed_scaling_factor),
        "moe_router_enable_expert_bias": True,  # e_score_correction_bias is always there
        "moe_router_num_groups": groups if groups > 1 else None,
        "moe_router_group_topk": group_topk if groups > 1 else None,
    }


def _moe_keys(cfg: ModelConfig) -> dict[str, Any]:
    """NemotronH's mixture-of-experts keys for ``cfg``'s ``E`` layers, or ``ValueError`` for a
    router stock NemotronH does not compute: its router is sigmoid over all experts, top-k of
    score + ``e_score_correction_bias``, renormalised over the k when ``norm_topk_prob``, times
    ``routed_scaling_factor``, groups scored by their top-2 experts; and every MoE layer has one
    shared expert."""
    fail = "cannot be exported as stock NemotronH: "
    if cfg.moe_router_score_function != "sigmoid":
        raise ValueError(
            f"moe_router_score_function={cfg.moe_router_score_function!r} {fail}"
            "its router is sigmoid"
        )
    if not cfg.moe_shared_expert_intermediate_size:
        raise ValueError(f"an MoE layer without a shared expert {fail}every MoE layer has one")
    if cfg.num_moe_experts < 2:
        raise ValueError(f"num_moe_experts={cfg.num_moe_experts} {fail}it needs >= 2 experts")
    groups, group_topk = cfg.moe_router_num_groups or 1, cfg.moe_router_group_topk or 1
    if groups > 1 and cfg.moe_router_topk != 2 * group_topk:
        raise ValueError(
            f"group-limited routing with moe_router_topk={cfg.moe_router_topk} and "
            f"moe_router_group_topk={group_topk} {fail}it scores a group by its top-2 experts"
        )
    scaling = cfg.moe_router_topk_scaling_factor
    return {
        "n_routed_experts": cfg.num_moe_experts,
        "num_experts_per_tok": cfg.moe_router_topk,
        "moe_intermediate_size": cfg.moe_ffn_hidden_size,
        "moe_shared_expert_intermediate_size": cfg.moe_shared_expert_intermediate_size,
        "n_shared_experts": 1,
        "routed_scaling_factor": 1.0 if scaling is None else scaling,
        "n_group": groups,
        "topk_group": group_topk,
        "norm_topk_prob": cfg.moe_router_topk > 1,
        "moe_latent_size": None,
    }


def _common_keys(cfg: ModelConfig, pattern: str) -> dict[str, Any]:
    return {
        "hybrid_override_pattern": pattern,
        "num_hidden_layers": len(pattern),  # NVIDIA's configs carry it; llama.cpp reads it
        "hidden_size": cfg.hidden_size,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "n_groups": cfg.mamba_num_groups,
        "ssm_state_size": cfg.mamba_state_dim,
        "conv_kernel": cfg.mamba_conv_kernel,
        "chunk_size": cfg.mamba_chunk_size,
        "mlp_hidden_act": "relu2",
        "layer_norm_epsilon": cfg.layernorm_epsilon,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_sequence_length,
        "initializer_range": cfg.init_method_std,
        "tie_word_embeddings": False,
    }


_NOT_DEFAULTED = ("layers_block_type", "mtp_layers_block_type")
"""Keys of transformers' NemotronH config not written: the layout is ``hybrid_override_pattern``,
which both older (5.12) and newer (5.24) transformers read: ``NemotronHConfig.__init__`` turns it
into ``layers_block_type`` for backward compatibility (transformers,
``src/transformers/models/nemotron_h/configuration_nemotron_h.py``)."""
_MOE_KEY_PARTS = ("moe", "expert", "routed", "router", "topk", "mtp")
"""Mixture-of-experts and MTP keys (NVIDIA's dense NemotronH configs do not carry them)."""


def nemotron_h_defaults() -> dict[str, Any]:
    """Every architecture key of transformers' ``NemotronHConfig`` with its default value, as
    NVIDIA's own dense NemotronH configs carry them (``expand``, ``time_step_*``,
    ``rescale_prenorm_residual``, ``use_mamba_kernels``, dropouts...), so that tools reading
    ``config.json`` directly (llama.cpp's converter, Megatron-Bridge) find what they expect.
    Generic ``PretrainedConfig`` keys and mixture-of-experts keys are left out."""
    from transformers import NemotronHConfig, PretrainedConfig

    generic = set(PretrainedConfig().to_dict())
    return {
        key: value
        for key, value in NemotronHConfig().to_dict().items()
        if key not in generic
        and key not in _NOT_DEFAULTED
        and key != "n_group"  # expert groups (``n_groups`` is Mamba's)
        and not any(part in key for part in _MOE_KEY_PARTS)
    }


def hf_config_from_model(
    cfg: ModelConfig,
    *,
    base: Mapping[str, Any] | None = None,
    use_cache: bool | None = None,
) -> dict[str, Any]:
    """A stock NemotronH ``config.json`` dict for ``cfg``. ``base`` (e.g. the config an HF model
    was converted from) keeps its other keys. ``use_cache`` defaults to false for a model without
    attention layers (stock NemotronH's default cache fails without one), else to ``base``'s
    value or true."""
    moe = _moe_keys(cfg) if "E" in cfg.hybrid_pattern else {}
    if cfg.layernorm_epsilon != MAMBA_NORM_EPSILON:
        raise ValueError(
            f"layernorm_epsilon={cfg.layernorm_epsilon} cannot be exported as stock NemotronH: "
            f"its Mamba gated norm would use it while megatron's uses {MAMBA_NORM_EPSILON}; "
            "export through the remote-code model instead"
        )
    out: dict[str, Any] = dict(base) if base else nemotron_h_defaults()
    if use_cache is None:
        use_cache = "*" in cfg.hybrid_pattern and out.get("use_cache", True)
    if not base:
        out.update(
            architectures=["NemotronHForCausalLM"],
            model_type="nemotron_h",
            mamba_hidden_act="silu",
            use_bias=False,
            mlp_bias=False,
            attention_bias=False,
            mamba_proj_bias=False,
            use_conv_bias=True,
            num_nextn_predict_layers=0,
            time_step_min=0.0,  # no dt clamp, as megatron (see the module docstring)
            num_logits_to_keep=1,
            residual_in_fp32=False,
            dtype="float32",
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
    out.update(_common_keys(cfg, cfg.hybrid_pattern))
    out.update(
        intermediate_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        mamba_num_heads=cfg.mamba_num_heads,
        mamba_head_dim=cfg.mamba_head_dim,
        use_cache=use_cache,
        **moe,
    )
    if "layers_block_type" in out:  # newer configs: keep the list, consistent with the pattern
        out["layers_block_type"] = [_BLOCK_OF_SYMBOL[s] for s in cfg.hybrid_pattern]
    out.pop("attention_head_dim", None)  # legacy key, ignored by transformers: head_dim rules
    return out


def layer_pattern(layers: Sequence[LayerChoice]) -> str:
    """The layer pattern (``M``, ``*``, ``-``) of ``layers`` (the active layers, in order)."""
    return "".join(_KIND_SYMBOL[c.kind] for c in layers)


def remote_code_config(cfg: ModelConfig, layers: Sequence[LayerChoice]) -> dict[str, Any]:
    """``config.json`` of the remote-code model: the global dims of ``cfg`` (hidden size, query
    groups, head dim, Mamba groups/state, vocab...) and the per-layer widths of ``layers`` (the
    active layers, in order)."""
    pattern = layer_pattern(layers)

    def per_layer(kind: str, attr: str) -> list[int]:
        return [getattr(c, attr) if c.kind == kind else 0 for c in layers]

    out = {
        "architectures": ["ElasticNemotronHForCausalLM"],
        "model_type": remote_code.MODEL_TYPE,
        "auto_map": dict(remote_code.AUTO_MAP),
        **_common_keys(cfg, pattern),
        "num_attention_heads_per_layer": per_layer("attention", "width"),
        "mamba_num_heads_per_layer": per_layer("mamba", "width"),
        "mamba_head_dim_per_layer": per_layer("mamba", "head_dim"),
        "intermediate_size_per_layer": per_layer("mlp", "width"),
        "mamba_norm_epsilon": MAMBA_NORM_EPSILON,
        "use_cache": False,  # the remote-code model recomputes; it has no cache
        "dtype": "float32",
    }
    return out
