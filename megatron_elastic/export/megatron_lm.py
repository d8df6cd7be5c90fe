"""Megatron-LM / Megatron-Bridge checkpoints: write and read the layout those tools load.

A directory written here holds::

    latest_checkpointed_iteration.txt    the iteration (Megatron-LM's tracker)
    latest_train_state.pt                Megatron-Bridge's tracker (its TrainState)
    iter_0000000/                        torch_dist checkpoint (dist_checkpointing)
        *.distcp, .metadata              weights under the TE hybrid spec's names, and the
                                         common state: args (a Namespace), checkpoint_version
                                         3.0, iteration
        run_config.yaml                  Megatron-Bridge: its HybridModelProvider's fields
        train_state.pt                   Megatron-Bridge: step 0
        tokenizer/                       the tokenizer (HF tokenizer.json or SentencePiece)
    export_manifest.json                 what it came from, and every file's size and sha256

The weights carry the names of megatron-core's Transformer-Engine hybrid spec (fused
``layer_norm_weight``\\ s and TE ``_extra_state``\\ s, :mod:`.te_mapping`), so Megatron-LM's
``pretrain_hybrid.py --load DIR --finetune --use-checkpoint-args`` and Megatron-Bridge build their
default model and load it. The ``args`` carry the hybrid pattern and every dimension, and only types
Megatron-LM unpickles with ``weights_only=True``; a model with ``E`` layers also carries the MoE
arguments (:mod:`.megatron_lm_moe`) and its experts under megatron's expert keys. An elastic parent
may also carry the router (``megatron_elastic`` in the common state, plain data and tensors), which
Megatron-LM ignores and :func:`read_megatron_lm` returns.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch import nn

from megatron_elastic.checkpoint import replace_directory
from megatron_elastic.config import ModelConfig, config_from_dict
from megatron_elastic.export.megatron_lm_moe import moe_args, moe_fields_from_args, moe_run_config
from megatron_elastic.export.te_mapping import te_empty_extra_state, te_extra_state_keys
from megatron_elastic.integrity import ALGORITHM, digest_files, list_files, verify_files

__all__ = [
    "BRIDGE_PROVIDER",
    "BRIDGE_PROVIDER_FIELDS",
    "MEGATRON_LM_DEFAULT_CONV_KERNEL",
    "MegatronLMCheckpoint",
    "bridge_run_config",
    "is_megatron_lm_checkpoint",
    "load_megatron_lm_weights",
    "megatron_lm_args",
    "read_megatron_lm",
    "save_megatron_lm",
    "te_sharded_state_dict",
]

TRACKER = "latest_checkpointed_iteration.txt"
BRIDGE_TRACKER = "latest_train_state.pt"
RUN_CONFIG = "run_config.yaml"
TRAIN_STATE = "train_state.pt"
TOKENIZER_DIR = "tokenizer"
EXPORT_MANIFEST = "export_manifest.json"
CHECKPOINT_VERSION = 3.0
ELASTIC_KEY = "megatron_elastic"
"""Common-state entry of what megatron-elastic adds (exact model config, router)."""

MEGATRON_LM_DEFAULT_CONV_KERNEL = 4
"""megatron's ``MambaMixer`` default ``d_conv``; Megatron-LM has no argument for another."""

BRIDGE_PROVIDER = "megatron.bridge.models.hybrid.hybrid_provider.HybridModelProvider"
"""The model provider Megatron-Bridge's NemotronH bridge builds (``nemotron_h_bridge.py``)."""

BRIDGE_PROVIDER_FIELDS: tuple[str, ...] = (
    "hybrid_layer_pattern",
    "mamba_chunk_size",
    "seq_length",
    "vocab_size",
    "should_pad_vocab",
    "make_vocab_size_divisible_by",
    "share_embeddings_and_output_weights",
    "position_embedding_type",
)
"""Fields of ``HybridModelProvider`` (Megatron-Bridge 0.6.2) that megatron-core's
``TransformerConfig`` does not have; every other key of ``run_config.yaml``'s ``model`` is a
``TransformerConfig`` field (tested against the installed megatron-core)."""

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _vocab_divisor(vocab_size: int) -> int:
    """The largest of 128, 64, ..., 1 dividing ``vocab_size``: Megatron pads the vocabulary to
    a multiple of it, so this one leaves it as it is."""
    return next(d for d in (128, 64, 32, 16, 8, 4, 2, 1) if vocab_size % d == 0)


def _check_representable(cfg: ModelConfig) -> None:
    if cfg.is_heterogeneous:
        raise ValueError(
            "Megatron-LM and Megatron-Bridge build one size per layer kind; this model has "
            "per-layer widths (a heterogeneous budget): export it with --format megatron "
            "(megatron-elastic's own layout) or --format hf (remote code)"
        )
    if cfg.mamba_conv_kernel != MEGATRON_LM_DEFAULT_CONV_KERNEL:
        raise ValueError(
            f"mamba_conv_kernel={cfg.mamba_conv_kernel}: Megatron-LM's hybrid model always "
            f"uses a {MEGATRON_LM_DEFAULT_CONV_KERNEL}-wide Mamba convolution"
        )


def megatron_lm_args(
    cfg: ModelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    tokenizer_model: str | None = None,
    iteration: int = 0,
) -> argparse.Namespace:
    """The ``args`` Megatron-LM saves with a checkpoint, for ``cfg``: every field that
    ``--use-checkpoint-args`` reads (``load_args_from_checkpoint``) or a resume compares
    (``check_checkpoint_args``), under Megatron-LM's argument names."""
    _check_representable(cfg)
    return argparse.Namespace(
        # architecture
        num_layers=cfg.num_layers,
        hybrid_layer_pattern=cfg.hybrid_pattern,
        hybrid_override_pattern=cfg.hybrid_pattern,  # the name before Megatron-LM 0.16
        is_hybrid_model=True,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        group_query_attention=cfg.num_query_groups != cfg.num_attention_heads,
        kv_channels=cfg.head_dim,
        mamba_num_heads=cfg.mamba_num_heads,
        mamba_head_dim=cfg.mamba_head_dim,
        mamba_num_groups=cfg.mamba_num_groups,
        mamba_state_dim=cfg.mamba_state_dim,
        seq_length=cfg.max_sequence_length,
        max_position_embeddings=cfg.max_sequence_length,
        position_embedding_type="none",
        add_position_embedding=False,
        use_rotary_position_embeddings=False,
        squared_relu=True,
        swiglu=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        untie_embeddings_and_output_weights=True,
        normalization="RMSNorm",
        norm_epsilon=cfg.layernorm_epsilon,
        apply_layernorm_1p=False,
        apply_query_key_layer_scaling=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        init_method_std=cfg.init_method_std,
        mtp_num_layers=None,
        **moe_args(cfg),
        # vocabulary and tokenizer
        padded_vocab_size=cfg.vocab_size,
        make_vocab_size_divisible_by=_vocab_divisor(cfg.vocab_size),
        tokenizer_type="HuggingFaceTokenizer" if tokenizer_model else None,
        tokenizer_model=tokenizer_model,
        vocab_file=None,
        # numerics, layout and progress
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        context_parallel_size=1,
        data_parallel_random_init=False,
        ckpt_format="torch_dist",
        use_dist_ckpt=True,
        iteration=iteration,
        consumed_train_samples=0,
        skipped_train_samples=0,
        consumed_valid_samples=0,
    )


def bridge_run_config(
    cfg: ModelConfig, *, params_dtype: torch.dtype = torch.float32, tokenizer: str | None = None
) -> dict[str, Any]:
    """Megatron-Bridge's ``run_config.yaml`` for ``cfg``: its ``model`` section instantiates
    ``HybridModelProvider`` (Bridge's ``load_model_config``), callables and dtypes written as
    Bridge's YAML representers write them (``_target_`` / ``_call_: false``)."""
    _check_representable(cfg)
    dtype = str(params_dtype)  # "torch.float32"
    model = {
        "_target_": BRIDGE_PROVIDER,
        "num_layers": cfg.num_layers,
        "hybrid_layer_pattern": cfg.hybrid_pattern,
        "is_hybrid_model": True,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_query_groups,
        "kv_channels": cfg.head_dim,
        "mamba_num_heads": cfg.mamba_num_heads,
        "mamba_head_dim": cfg.mamba_head_dim,
        "mamba_num_groups": cfg.mamba_num_groups,
        "mamba_state_dim": cfg.mamba_state_dim,
        "mamba_chunk_size": cfg.mamba_chunk_size,
        "seq_length": cfg.max_sequence_length,
        "vocab_size": cfg.vocab_size,
        "should_pad_vocab": False,
        "make_vocab_size_divisible_by": _vocab_divisor(cfg.vocab_size),
        "position_embedding_type": "none",
        "share_embeddings_and_output_weights": False,
        "normalization": "RMSNorm",
        "layernorm_epsilon": cfg.layernorm_epsilon,
        "activation_func": {"_target_": "megatron.core.activations.squared_relu", "_call_": False},
        "gated_linear_unit": False,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "init_method_std": cfg.init_method_std,
        "params_dtype": {"_target_": dtype, "_call_": False},
        "bf16": params_dtype == torch.bfloat16,
        "fp16": params_dtype == torch.float16,
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        **moe_run_config(cfg),
    }
    return {
        "model": model,
        "checkpoint": {"save_optim": False, "save_rng": False, "fully_parallel_save": True},
        "tokenizer": {
            "tokenizer_type": "HuggingFaceTokenizer" if tokenizer else None,
            "tokenizer_model": tokenizer,
        },
    }


def te_sharded_state_dict(model: nn.Module, cfg: ModelConfig) -> dict[str, Any]:
    """``model``'s sharded state dict as megatron's TE hybrid spec has it: every TE module's
    ``_extra_state`` present with TE's value (no FP8 state; one per expert for the experts'
    grouped linears), norms already under their fused names (our spec's keys map). Modules that
    are megatron's own in both specs (the output layer, the MoE router) keep theirs."""
    state = dict(model.sharded_state_dict())
    present: dict[str, list[str]] = {}
    for name, obj in state.items():
        if isinstance(obj, ShardedObject) and obj.key.endswith("._extra_state"):
            present.setdefault(obj.key, []).append(name)
    assert present, "a megatron model without any extra state"
    # an unsharded module's entry (an expert's has the expert axis)
    template = next(state[n[0]] for n in present.values() if state[n[0]].global_shape == (1,))
    shared = cfg.moe_shared_expert_intermediate_size is not None
    for key in te_extra_state_keys(cfg.layer_kinds(), moe_shared_expert=shared):
        for name in present.get(key, ()):
            state[name] = dataclasses.replace(state[name], data=te_empty_extra_state())
        if key not in present:  # a module that is a TE module only in the TE spec (norms)
            state[key] = dataclasses.replace(template, key=key, data=te_empty_extra_state())
    return state


@dataclass(frozen=True)
class MegatronLMCheckpoint:
    """A Megatron-LM / Megatron-Bridge checkpoint directory, read by :func:`read_megatron_lm`."""

    root: Path
    """The directory ``--load`` / ``--save`` names (it holds the tracker file)."""
    weights: Path
    """The ``iter_XXXXXXX`` (or ``release``) torch_dist directory."""
    iteration: int
    """Iteration in the tracker (0 for ``release``)."""
    model_config: ModelConfig
    """The architecture, from megatron-elastic's own record or else from ``args``."""
    elastic: dict[str, Any]
    """What megatron-elastic stored in the common state (``router`` etc.); empty otherwise."""
    tokenizer: Path | None
    """The tokenizer directory shipped inside the checkpoint, if any."""


def is_megatron_lm_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a Megatron-LM/Bridge checkpoint root (it has the tracker file)."""
    return (Path(path) / TRACKER).is_file()


def _weights_dir(root: Path) -> tuple[Path, int]:
    text = (root / TRACKER).read_text().strip()
    if text == "release":
        return root / "release", 0
    try:
        iteration = int(text)
    except ValueError:
        raise ValueError(
            f"{root / TRACKER} holds {text[:40]!r}, not an iteration or 'release'"
        ) from None
    return root / f"iter_{iteration:07d}", iteration


def _model_config_from_args(args: Any, where: str) -> ModelConfig:
    """megatron-elastic's ModelConfig of a Megatron-LM ``args`` namespace; refuses what our
    hybrid model cannot build, naming the argument."""

    def get(name: str, default: Any = None) -> Any:
        return getattr(args, name, default)

    pattern = get("hybrid_layer_pattern") or get("hybrid_override_pattern")
    if not pattern:
        raise ValueError(f"{where}: args carry no hybrid layer pattern (a GPT checkpoint?)")
    refusals = {
        "mtp_num_layers": (get("mtp_num_layers") or None, None, "multi-token-prediction layers"),
        "swiglu": (get("swiglu", False), False, "SwiGLU MLPs (NemotronH's are squared-ReLU)"),
        "squared_relu": (get("squared_relu", True), True, "MLPs other than squared-ReLU"),
        "add_bias_linear": (get("add_bias_linear", False), False, "linear biases"),
        "normalization": (get("normalization", "RMSNorm"), "RMSNorm", "LayerNorm"),
        "untie_embeddings_and_output_weights": (
            get("untie_embeddings_and_output_weights", True),
            True,
            "tied embeddings",
        ),
        "position_embedding_type": (
            get("position_embedding_type", "none"),
            "none",
            "position embeddings (NemotronH has none)",
        ),
    }
    for name, (value, wanted, what) in refusals.items():
        if value != wanted:
            raise ValueError(f"{where}: {name}={value!r}: megatron-elastic does not build {what}")
    heads = get("num_attention_heads")
    values = {
        "hybrid_pattern": pattern,
        "hidden_size": get("hidden_size"),
        "ffn_hidden_size": get("ffn_hidden_size"),
        "num_attention_heads": heads,
        "num_query_groups": get("num_query_groups") if get("group_query_attention") else heads,
        "head_dim": get("kv_channels") or get("hidden_size") // heads,
        "mamba_num_heads": get("mamba_num_heads"),
        "mamba_head_dim": get("mamba_head_dim"),
        "mamba_num_groups": get("mamba_num_groups"),
        "mamba_state_dim": get("mamba_state_dim"),
        "vocab_size": get("padded_vocab_size"),
        "max_sequence_length": get("max_position_embeddings") or get("seq_length"),
        "layernorm_epsilon": get("norm_epsilon", 1e-5),
        "init_method_std": get("init_method_std", 0.02),
    }
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ValueError(f"{where}: args lack what {missing} is built from")
    values |= moe_fields_from_args(get, where)
    return config_from_dict(ModelConfig, values, where=where)


def read_megatron_lm(path: str | Path) -> MegatronLMCheckpoint:
    """Read a Megatron-LM / Megatron-Bridge checkpoint's tracker and common state (as Megatron-LM
    does: ``weights_only=True`` with megatron-core's safe globals); its weights are loaded by
    :func:`load_megatron_lm_weights`. Checkpoints this module wrote are verified against their
    recorded checksums first."""
    from megatron.core.safe_globals import register_safe_globals

    root = Path(path)
    if not is_megatron_lm_checkpoint(root):
        raise ValueError(f"{str(root)!r} is not a Megatron-LM checkpoint (no {TRACKER})")
    weights, iteration = _weights_dir(root)
    if not weights.is_dir():
        raise ValueError(f"{root / TRACKER} names {weights.name}/, which does not exist")
    manifest_file = root / EXPORT_MANIFEST
    if manifest_file.is_file():
        from megatron_elastic.files import read_json

        recorded = read_json(manifest_file).get("files", {})
        verify_files(root, recorded, [], complete_under=weights.name, collective=False)
    register_safe_globals()
    try:
        common = dist_checkpointing.load_common_state_dict(str(weights))
    except Exception as exc:  # not a torch_dist directory, damaged metadata, unsafe pickle
        raise ValueError(f"{str(weights)!r} could not be read as torch_dist: {exc}") from exc
    elastic = dict(common.get(ELASTIC_KEY) or {})
    where = f"Megatron-LM checkpoint {str(root)!r}"
    if "model_config" in elastic:
        cfg = config_from_dict(ModelConfig, dict(elastic["model_config"]), where=where)
    elif "args" in common:
        cfg = _model_config_from_args(common["args"], where)
    else:
        raise ValueError(f"{where} has no args in its common state (a release without args?)")
    tokenizer = weights / TOKENIZER_DIR
    return MegatronLMCheckpoint(
        root, weights, iteration, cfg, elastic, tokenizer if tokenizer.is_dir() else None
    )


def load_megatron_lm_weights(checkpoint: MegatronLMCheckpoint, model: nn.Module) -> None:
    """Load the checkpoint's weights (TE-spec names, any TP/PP layout it was saved at) into our
    ``model``, built from ``checkpoint.model_config`` at any layout. TE extra states (FP8
    metadata) are not read: our local modules keep none."""
    request = {
        name: obj
        for name, obj in model.sharded_state_dict().items()
        if not (isinstance(obj, ShardedObject) and obj.key.endswith("._extra_state"))
    }
    try:
        state = dist_checkpointing.load(request, str(checkpoint.weights))
    except Exception as exc:
        raise ValueError(f"{str(checkpoint.weights)!r} could not be loaded: {exc}") from exc
    weights = {name: state[name] for name in request}  # not the common state (args etc.)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing


def save_megatron_lm(
    directory: str | Path,
    model: nn.Module,
    cfg: ModelConfig,
    *,
    tokenizer_path: str | Path | None = None,
    elastic: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write ``model`` (TP=1, PP=1; architecture ``cfg``) as a Megatron-LM / Megatron-Bridge
    checkpoint at iteration 0, atomically (a hidden sibling replaces ``directory`` once
    complete). ``elastic``: extra plain data (e.g. the router) kept in the common state.
    Refuses an existing non-empty ``directory`` unless ``force``. Returns the export manifest."""
    from megatron_elastic.export.hf import write_tokenizer_directory

    _check_representable(cfg)
    out = Path(directory)
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"{str(out)!r} exists and is not empty; pass --force to replace it")
    params_dtype = next(model.parameters()).dtype
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    weights = tmp / "iter_0000000"
    weights.mkdir(parents=True)
    tokenizer_model = None
    if tokenizer_path is not None:
        (weights / TOKENIZER_DIR).mkdir()
        write_tokenizer_directory(tokenizer_path, weights / TOKENIZER_DIR, cfg.max_sequence_length)
        tokenizer_model = str(out.resolve() / weights.name / TOKENIZER_DIR)
    state = {
        "args": megatron_lm_args(cfg, params_dtype=params_dtype, tokenizer_model=tokenizer_model),
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": 0,
        "num_floating_point_operations_so_far": 0,
        ELASTIC_KEY: {"model_config": dataclasses.asdict(cfg), **dict(elastic or {})},
        "model": te_sharded_state_dict(model, cfg),
    }
    dist_checkpointing.save(state, str(weights))
    run_config = bridge_run_config(cfg, params_dtype=params_dtype, tokenizer=tokenizer_model)
    (weights / RUN_CONFIG).write_text(yaml.safe_dump(run_config, sort_keys=False))
    train_state = {
        "step": torch.tensor(0, dtype=torch.int64),
        "consumed_train_samples": torch.tensor(0, dtype=torch.int64),
        "skipped_train_samples": torch.tensor(0, dtype=torch.int64),
        "consumed_valid_samples": torch.tensor(0, dtype=torch.int64),
        "floating_point_operations_so_far": torch.tensor(0, dtype=torch.float64),
        "do_train": torch.tensor(False),
        "do_valid": torch.tensor(False),
        "do_test": torch.tensor(False),
    }
    torch.save(train_state, weights / TRAIN_STATE)
    torch.save(train_state, tmp / BRIDGE_TRACKER)
    (tmp / TRACKER).write_text("0")
    manifest = {
        **dict(metadata or {}),
        "format": "megatron-lm",
        "dims": dataclasses.asdict(cfg),
        "params": sum(p.numel() for p in model.parameters()),
        "params_dtype": str(params_dtype).removeprefix("torch."),
        "has_router": bool(elastic and "router" in elastic),
        "checksum": ALGORITHM,
        "files": digest_files(tmp, list_files(tmp)),
    }
    (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    replace_directory(tmp, out)
    return manifest
