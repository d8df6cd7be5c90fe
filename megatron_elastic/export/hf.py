"""Hugging Face NemotronH <-> megatron-elastic: configs, state dicts and model directories.

A homogeneous model (one size per axis) is a stock ``nemotron_h`` directory that
``AutoModelForCausalLM.from_pretrained`` loads without custom code. A heterogeneous budget
(per-layer widths) is written with the remote-code model of :mod:`.remote_code`
(``trust_remote_code=True``).
Tensor names follow the declarative table of :mod:`.hf_mapping`.

Two details keep the HF model computing the megatron model's function:

- megatron's Mamba mixer normalises its gated output with epsilon 1e-5 whatever
  ``layernorm_epsilon`` is, while stock NemotronH uses ``layer_norm_epsilon`` for both norms: only
  1e-5 is representable in the stock config.
- megatron applies no lower clamp to the Mamba step size ``dt``; transformers' NemotronH clamps it
  at ``time_step_min``. A fresh export writes ``time_step_min: 0.0`` (no clamp); a config converted
  from HF keeps its own value.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_elastic.config import LAYER_SYMBOLS, ModelConfig
from megatron_elastic.elastic.model import ElasticHybridModel
from megatron_elastic.elastic.subnet import LayerChoice, SubnetSpec
from megatron_elastic.export import remote_code
from megatron_elastic.export.hf_mapping import from_hf_state_dict, to_hf_state_dict
from megatron_elastic.files import check_safetensors, read_json
from megatron_elastic.platform import use_torch_nemotron_h_kernels

__all__ = [
    "EXPORT_MANIFEST",
    "MAMBA_NORM_EPSILON",
    "export_subnet_to_hf",
    "from_hf_state_dict",
    "hf_config_from_model",
    "hf_pattern",
    "hf_weight_files",
    "nemotron_h_defaults",
    "load_hf_directory",
    "model_config_from_hf",
    "read_hf_config",
    "remote_code_config",
    "save_hf_directory",
    "save_remote_code_directory",
    "copy_tokenizer_files",
    "write_tokenizer_directory",
    "to_hf_state_dict",
    "use_torch_nemotron_h_kernels",
]

MAMBA_NORM_EPSILON = 1e-5
"""Epsilon of megatron-core's gated RMSNorm inside the Mamba mixer (fixed there)."""

_SYMBOL_OF_BLOCK = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
_BLOCK_OF_SYMBOL = {s: b for b, s in _SYMBOL_OF_BLOCK.items()}
_KIND_SYMBOL = {kind: symbol for symbol, kind in LAYER_SYMBOLS.items()}
_WEIGHTS = "model.safetensors"
EXPORT_MANIFEST = "export_manifest.json"
"""What an export came from (checkpoint, budget), its format, dims and parameter count."""

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


# ---- configs ------------------------------------------------------------------------------------


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
    """The layer pattern (``M``, ``*``, ``-``) of a NemotronH config dict; ``ValueError`` naming
    the first layer we cannot convert (mixture-of-experts or unknown)."""
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
        if symbol == "E":
            raise ValueError(
                f"layer {i} is a mixture-of-experts layer ('moe' / 'E'); megatron-elastic models "
                "have only Mamba, attention and MLP layers: convert a dense NemotronH (e.g. "
                "Nemotron-H or Nemotron Nano V2), not an MoE one"
            )
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
    )


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
"""Keys of transformers' NemotronH config not written: the layout is ``hybrid_override_pattern``
(loads in every transformers version, FACTS §4)."""
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
    )
    if "layers_block_type" in out:  # newer configs: keep the list, consistent with the pattern
        out["layers_block_type"] = [_BLOCK_OF_SYMBOL[s] for s in cfg.hybrid_pattern]
    out.pop("attention_head_dim", None)  # legacy key, ignored by transformers: head_dim rules
    return out


def remote_code_config(cfg: ModelConfig, layers: Sequence[LayerChoice]) -> dict[str, Any]:
    """``config.json`` of the remote-code model: the global dims of ``cfg`` (hidden size, query
    groups, head dim, Mamba groups/state, vocab...) and the per-layer widths of ``layers`` (the
    active layers, in order)."""
    pattern = "".join(_KIND_SYMBOL[c.kind] for c in layers)

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


# ---- directories --------------------------------------------------------------------------------


# Files of an HF tokenizer directory, copied as they are (the first two hold the vocabulary).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_TOKENIZER_FILES += ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def write_tokenizer_directory(tokenizer_path: str | Path, directory: Path, max_length: int) -> int:
    """Copy the tokenizer into ``directory``; a bare ``tokenizer.json`` / ``.model`` file gets a
    minimal ``tokenizer_config.json``. Return its end-of-document id."""
    from megatron_elastic.data.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer_path)  # ValueError for a missing or unknown file
    source = Path(tokenizer_path)
    if source.is_dir():
        for name in _TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, directory / name)
        if (source / "tokenizer_config.json").is_file():
            return tok.eod
        source = next(source / n for n in _TOKENIZER_FILES[:2] if (source / n).is_file())
    settings: dict[str, Any] = {
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
    }
    if tok.kind == "hf":
        shutil.copyfile(source, directory / "tokenizer.json")
        settings.update(tokenizer_class="PreTrainedTokenizerFast", eos_token=tok.decode([tok.eod]))
    else:
        import sentencepiece as spm

        shutil.copyfile(source, directory / "tokenizer.model")
        piece = spm.SentencePieceProcessor(model_file=str(source)).IdToPiece(tok.eod)
        settings.update(
            tokenizer_class="LlamaTokenizer",
            eos_token=piece,
            add_bos_token=False,  # the trainer encodes without special tokens
            add_eos_token=False,
        )
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return tok.eod


def copy_tokenizer_files(source: str | Path, directory: str | Path) -> list[str]:
    """Copy the tokenizer files of an HF model directory (those present); return their names."""
    names = [n for n in _TOKENIZER_FILES if (Path(source) / n).is_file()]
    if names:
        Path(directory).mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(Path(source) / name, Path(directory) / name)
    return names


def _write_directory(
    directory: str | Path,
    config: dict[str, Any],
    hf_state: Mapping[str, torch.Tensor],
    tokenizer_path: str | Path | None,
    max_length: int,
) -> dict[str, Any]:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer_path is not None:
        eos = write_tokenizer_directory(tokenizer_path, directory, max_length)
        for key in ("eos_token_id", "pad_token_id"):  # pad: generate() fills finished rows
            if config.get(key) is None:
                config[key] = eos
    tensors = {k: v.detach().cpu().contiguous() for k, v in hf_state.items()}
    save_file(tensors, str(directory / _WEIGHTS), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"use_cache": config["use_cache"]}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            generation[key] = config[key]
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return config


def _dtype(config: Mapping[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"config dtype {name!r} is not a torch dtype")
    return dtype


def save_hf_directory(
    directory: str | Path,
    cfg: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    tokenizer_path: str | Path | None = None,
    *,
    base_config: Mapping[str, Any] | None = None,
    use_cache: bool | None = None,
) -> dict[str, Any]:
    """Write a stock NemotronH directory (``config.json``, ``generation_config.json``,
    ``model.safetensors``, tokenizer files when ``tokenizer_path`` is given) for the megatron
    ``state_dict`` of a model of config ``cfg``; return the written config. Tensors are stored
    in the dtype of ``base_config`` (float32 without one)."""
    config = hf_config_from_model(cfg, base=base_config, use_cache=use_cache)
    dtype = _dtype(config)
    hf_state = {k: v.to(dtype) for k, v in to_hf_state_dict(state_dict, cfg).items()}
    return _write_directory(directory, config, hf_state, tokenizer_path, cfg.max_sequence_length)


def save_remote_code_directory(
    directory: str | Path,
    cfg: ModelConfig,
    layers: Sequence[LayerChoice],
    state_dict: Mapping[str, torch.Tensor],
    tokenizer_path: str | Path | None = None,
) -> dict[str, Any]:
    """Write a remote-code directory for a model with per-layer widths: ``layers`` are its
    (active) layers in order, ``state_dict`` its megatron tensors numbered 0..len(layers)-1 and
    ``cfg`` gives the global dims (hidden size, query groups, head dim, Mamba groups...)."""
    config = remote_code_config(cfg, layers)
    pattern = config["hybrid_override_pattern"]
    hf_state = to_hf_state_dict(state_dict, dataclasses.replace(cfg, hybrid_pattern=pattern))
    config = _write_directory(directory, config, hf_state, tokenizer_path, cfg.max_sequence_length)
    remote_code.copy_remote_code(directory)
    return config


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of an HF model directory."""
    file = Path(directory) / "config.json"
    if not file.is_file():
        raise ValueError(
            f"{str(directory)!r} is not a Hugging Face model directory (no config.json)"
        )
    config = read_json(file)
    if not isinstance(config, dict):
        raise ValueError(f"{str(file)!r} does not hold a JSON object")
    return config


def hf_weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of an HF model directory (one file or the shards of its index),
    each checked to be whole (:func:`check_safetensors`)."""
    directory = Path(directory)
    index = directory / f"{_WEIGHTS}.index.json"
    if (directory / _WEIGHTS).is_file():
        files = [directory / _WEIGHTS]
    elif index.is_file():
        content = read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{str(index)!r} has no weight_map")
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        raise ValueError(
            f"{str(directory)!r} has no {_WEIGHTS} (or sharded index); re-save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    for file in files:
        if not file.is_file():
            raise ValueError(f"{str(file)!r} (named by {index.name}) is missing")
        check_safetensors(file)
    return files


def load_hf_directory(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and all tensors (``model.safetensors`` or its sharded index) of an HF
    model directory."""
    from safetensors.torch import load_file

    config = read_hf_config(directory)
    state: dict[str, torch.Tensor] = {}
    for file in hf_weight_files(directory):
        state.update(load_file(str(file)))
    return config, state


def _homogeneous(layers: Sequence[LayerChoice]) -> bool:
    sizes = {(c.kind, c.width, c.head_dim) for c in layers}
    return len(sizes) == len({kind for kind, _, _ in sizes})


@torch.no_grad()
def export_subnet_to_hf(
    model: ElasticHybridModel,
    spec: SubnetSpec,
    directory: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Export the sub-network ``spec`` of the (unsplit) elastic ``model`` as a Hugging Face
    directory: stock NemotronH when homogeneous (and representable), the remote-code model
    otherwise. Writes
    ``export_manifest.json`` (``metadata`` plus format, dims, parameter count, cache setting)
    and returns it."""
    from megatron_elastic.elastic.budget import subnet_param_count
    from megatron_elastic.export.standalone import standalone_config, standalone_state_dict

    parent = model.model_config
    spec.validate(parent, model.elastic_config)
    active = [c for c in spec.layers if c.active]
    state = standalone_state_dict(model, spec)
    if _homogeneous(active) and parent.layernorm_epsilon == MAMBA_NORM_EPSILON:
        cfg = standalone_config(parent, spec)
        config = save_hf_directory(directory, cfg, state, tokenizer_path)
        fmt = "hf"
    else:
        pattern = "".join(_KIND_SYMBOL[c.kind] for c in active)
        cfg = dataclasses.replace(parent, hidden_size=spec.hidden, hybrid_pattern=pattern)
        config = save_remote_code_directory(directory, cfg, active, state, tokenizer_path)
        fmt = "hf-remote-code"
    manifest = {
        **(metadata or {}),
        "format": fmt,
        "params": subnet_param_count(parent, spec),
        "use_cache": config["use_cache"],
        "has_attention": any(c.kind == "attention" for c in active),
        "tokenizer": None if tokenizer_path is None else str(Path(tokenizer_path).resolve()),
        "dims": {
            "hidden": spec.hidden,
            "layers": [dataclasses.asdict(c) for c in spec.layers],
            "pattern": config["hybrid_override_pattern"],
        },
    }
    (Path(directory) / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
