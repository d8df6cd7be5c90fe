"""Hugging Face NemotronH <-> megatron-elastic: model directories (config, weights, tokenizer).

A homogeneous model (one size per axis) is a stock ``nemotron_h`` directory that
``AutoModelForCausalLM.from_pretrained`` loads without custom code. A heterogeneous budget
(per-layer widths) is written with the remote-code model of :mod:`.remote_code`
(``trust_remote_code=True``). The ``config.json`` of each (and what a stock config must hold to
convert back) is :mod:`.nemotron_h_config`; tensor names follow the declarative table of
:mod:`.hf_mapping`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_elastic.config import ModelConfig
from megatron_elastic.elastic.model import ElasticHybridModel
from megatron_elastic.elastic.subnet import LayerChoice, SubnetSpec
from megatron_elastic.export import remote_code
from megatron_elastic.export.hf_mapping import from_hf_state_dict, to_hf_state_dict
from megatron_elastic.export.nemotron_h_config import (
    MAMBA_NORM_EPSILON,
    hf_config_from_model,
    hf_pattern,
    layer_pattern,
    model_config_from_hf,
    nemotron_h_defaults,
    remote_code_config,
)
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

_WEIGHTS = "model.safetensors"
_FP32_TENSORS = ("mixer.gate.weight", "mixer.gate.e_score_correction_bias")
"""Kept in fp32 whatever the export dtype, as transformers keeps NemotronH's MoE router."""
EXPORT_MANIFEST = "export_manifest.json"
"""What an export came from (checkpoint, budget), its format, dims and parameter count."""


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
    hf_state = {
        k: v if k.endswith(_FP32_TENSORS) else v.to(dtype)
        for k, v in to_hf_state_dict(state_dict, cfg).items()
    }
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
    sizes = {(c.kind, c.sizes) for c in layers}
    return len(sizes) == len({kind for kind, _ in sizes})


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
    elif any(c.kind == "moe" for c in active):
        raise ValueError(
            "this MoE budget's layers differ per layer, which only the remote-code model holds, "
            "and it has no MoE layers: export a homogeneous MoE budget"
        )
    else:
        pattern = layer_pattern(active)
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
