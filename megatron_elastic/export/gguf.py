"""A budget as a GGUF file that llama.cpp runs (architecture ``nemotron_h``, or
``nemotron_h_moe`` for a parent with ``E`` layers), written with the ``gguf`` package. Tensor
names and transforms: the table of :mod:`.gguf_mapping`.

What llama.cpp's NemotronH can hold, read from its loader (``src/models/nemotron-h.cpp``):

- A layer's kind is encoded in per-layer arrays: a Mamba layer has ``head_count_kv == 0`` and
  ``feed_forward_length == 0``, an attention layer ``feed_forward_length == 0`` and
  ``head_count_kv > 0``, an MLP layer ``feed_forward_length > 0``. FFN widths and attention
  (query) heads are per-layer arrays, so heterogeneous FFN/attention budgets export.
- The Mamba shape (``ssm.inner_size``, ``ssm.time_step_rank`` = heads, groups, state, conv) is
  global: a budget whose Mamba layers differ in heads or head dim is refused
  (:func:`check_gguf_exportable`).
- One RMS-norm epsilon serves every norm, the Mamba gated norm included. megatron's gated norm
  uses 1e-5 whatever ``layernorm_epsilon`` is, so only a parent with epsilon 1e-5 exports.
- The Mamba step size is ``softplus(dt + dt_bias)`` without clamping, as in megatron.
- Attention has no positional embedding and scales by ``1/sqrt(head_dim)``, as megatron's.
- llama.cpp's hybrid memory needs at least one attention layer: with none it aborts the
  process on the first decode (``GGML_ASSERT(buffer)`` in ``ggml_backend_buffer_is_host``,
  called from ``llama_kv_cache::set_input_k_idxs``: ``llm_graph_input_mem_hybrid::set_input``
  fills the attention inputs whether or not a layer reads them, and unread inputs get no
  buffer; seen with llama-cpp-python 0.3.36). A budget without attention layers therefore gets
  one *placeholder* attention block in front (one query and one key/value head, every
  projection zero, so it adds exactly 0 to the residual stream: the function is unchanged);
  the manifest says so (``placeholder_attention_layer``) and counts its zero parameters apart.
- ``head_count`` of layer 0 decides whether llama.cpp reads ``key_length`` at all, so every
  non-attention layer carries the largest attention head count (unused there).

Mixture of experts (``nemotron_h_moe``, ``src/models/nemotron-h.cpp``): an MoE layer is a
feed-forward layer (``feed_forward_length > 0``) with ``ffn_gate_inp``; llama.cpp routes with
``build_moe_ffn``: sigmoid scores (hard-coded), ``exp_probs_b`` added for the choice only, top
``expert_used_count``, the chosen scores renormalised when ``expert_weights_norm`` and multiplied
by ``expert_weights_scale``, squared-ReLU experts, plus the always-on shared expert
(``ffn_up_shexp`` / ``ffn_down_shexp``). With ``expert_group_count`` > 1 it keeps the
``expert_group_used_count`` groups whose top-2 biased scores sum highest. That is megatron's
sigmoid router (which renormalises for top-k > 1 and scores a group by its top
``topk // group_topk``) exactly when the router is sigmoid, a shared expert exists, and, for
group-limited routing, ``topk // group_topk == 2``; anything else is refused by
:func:`check_gguf_exportable`, as are per-layer MoE sizes (one expert count and width in the
file) and a parent with plain ``-`` MLP layers beside ``E`` layers (``nemotron_h_moe`` makes every
feed-forward layer an MoE layer). Checked with llama-cpp-python 0.3.36.

Tokenizer: a byte-level BPE ``tokenizer.json`` (GPT-2 split regex, no prefix space, no
normalizer: what :func:`~megatron_elastic.data.tokenizers.train_bpe_tokenizer` makes) is written
as llama.cpp's ``gpt2`` tokenizer with pre-tokenizer ``gpt-2``, padded with unused ``[PADi]``
tokens to the model's vocabulary as llama.cpp's converter pads. Any other tokenizer is left out:
the file is token-ids only (``tokenizer.ggml.model = none`` plus ``vocab_size``, llama.cpp's own
vocabulary-less mode) and the manifest says why.

Tensor types follow llama.cpp's converter: 1-D tensors, norms, the conv kernel, ``A``/``D`` and
biases stay f32; matrices take the requested type; a matrix whose row length is not a multiple
of a q8_0 block (32) falls back to f16, as the converter does.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_elastic.config import LAYER_SYMBOLS, ModelConfig
from megatron_elastic.elastic.model import ElasticHybridModel
from megatron_elastic.elastic.subnet import SubnetSpec
from megatron_elastic.export.hf import EXPORT_MANIFEST, MAMBA_NORM_EPSILON

__all__ = [
    "GGUF_ARCH",
    "GGUF_FILE",
    "GGUF_MOE_ARCH",
    "GGUF_TYPES",
    "check_gguf_exportable",
    "export_subnet_to_gguf",
    "gguf_tokenizer_vocab",
]

GGUF_TYPES = ("f32", "f16", "q8_0")
"""Tensor types an export can request (``dtype``); llama.cpp runs each on CPU for these tensors."""
GGUF_ARCH = "nemotron_h"
"""llama.cpp architecture name written into ``general.architecture``."""
GGUF_MOE_ARCH = "nemotron_h_moe"
"""The architecture of a budget with MoE (``E``) layers."""
LLAMA_CPP_VERSION = "llama-cpp-python 0.3.36"
"""The llama.cpp build the MoE refusals were checked against."""
GGUF_FILE = "model.gguf"
"""File name inside the export directory."""
_KIND_SYMBOL = {kind: symbol for symbol, kind in LAYER_SYMBOLS.items()}


# ---- what can be exported -----------------------------------------------------------------------


def check_gguf_exportable(parent: ModelConfig, spec: SubnetSpec) -> None:
    """``ValueError`` (one line: why, and what to do) when llama.cpp's ``nemotron_h`` cannot
    compute ``spec``'s function: Mamba layers of different shapes, or a parent whose norm
    epsilon is not megatron's Mamba-norm epsilon, or MoE layers llama.cpp's ``nemotron_h_moe``
    would route differently (see the module docstring). Needs only the configs, not the
    weights."""
    spec.validate(parent)
    _check_moe(parent, spec)
    mamba = sorted({(c.width, c.head_dim) for c in spec.layers if c.active and c.kind == "mamba"})
    if len(mamba) > 1:
        shapes = ", ".join(f"{h} heads x {d}" for h, d in mamba)
        raise ValueError(
            f"GGUF cannot hold this budget: llama.cpp's nemotron_h has one Mamba shape for all "
            f"layers, but this budget's Mamba layers differ ({shapes}); export it with "
            "--format hf (remote-code model) or --format megatron-lm instead"
        )
    if parent.layernorm_epsilon != MAMBA_NORM_EPSILON:
        raise ValueError(
            f"GGUF cannot hold this model: llama.cpp's nemotron_h uses one norm epsilon for every "
            f"norm, but layernorm_epsilon={parent.layernorm_epsilon} differs from megatron's "
            f"Mamba-norm epsilon {MAMBA_NORM_EPSILON}; export it with --format hf or megatron-lm"
        )


def _refuse_moe(feature: str) -> None:
    raise ValueError(
        f"GGUF cannot hold this MoE model: llama.cpp's {GGUF_MOE_ARCH} ({LLAMA_CPP_VERSION}) "
        f"does not support {feature}; export it with --format hf or megatron-lm instead"
    )


def _check_moe(parent: ModelConfig, spec: SubnetSpec) -> None:
    moe = [c for c in spec.layers if c.active and c.kind == "moe"]
    if not moe:
        return
    if parent.moe_router_score_function != "sigmoid":
        _refuse_moe(f"a {parent.moe_router_score_function} router (its router is sigmoid)")
    if any(c.kind == "mlp" for c in spec.layers if c.active):
        _refuse_moe("plain MLP ('-') layers beside MoE ('E') layers (every FFN layer is MoE)")
    if any(c.size("moe_shared_ffn") == 0 for c in moe):
        _refuse_moe("MoE layers without a shared expert (every MoE layer has one)")
    groups, group_topk = parent.moe_router_num_groups, parent.moe_router_group_topk
    per_group = parent.moe_router_topk // group_topk if group_topk else 2
    if groups and groups > 1 and per_group != 2:
        _refuse_moe(
            f"group-limited routing scoring a group by its top {per_group} "
            "experts (moe_router_topk // moe_router_group_topk; llama.cpp sums the top 2)"
        )
    sizes = {
        (c.size("moe_experts"), c.size("moe_expert_ffn"), c.size("moe_shared_ffn")) for c in moe
    }
    if len(sizes) > 1:
        _refuse_moe(
            "per-layer MoE sizes (one expert count and widths per file); export a "
            "homogeneous MoE budget"
        )


def _check_dtype(dtype: str) -> None:
    if dtype not in GGUF_TYPES:
        raise ValueError(
            f"GGUF type {dtype!r} is not supported; choose one of {', '.join(GGUF_TYPES)}"
        )


# ---- tokenizer ----------------------------------------------------------------------------------


def _byte_level_bpe(tokenizer_json: Mapping[str, Any]) -> str | None:
    """Why llama.cpp's ``gpt2`` tokenizer (pre-tokenizer ``gpt-2``) would NOT reproduce this
    HF tokenizer, or None when it does: byte-level BPE, GPT-2 split regex, no prefix space,
    no normalizer."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')!r}, not byte-level BPE"
    if tokenizer_json.get("normalizer") is not None:
        return "it has a normalizer"
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel":
        return f"its pre-tokenizer is {pre.get('type')!r}, not ByteLevel"
    if pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return "its ByteLevel pre-tokenizer adds a prefix space or skips the GPT-2 split regex"
    return None


def gguf_tokenizer_vocab(
    tokenizer_path: str | Path, vocab_size: int
) -> tuple[dict[str, Any] | None, str]:
    """The GGUF tokenizer fields for ``tokenizer_path`` padded to the model's ``vocab_size``
    (``tokens``, ``types``, ``merges``, ``eos``), or None with the reason when llama.cpp cannot
    reproduce the tokenizer (then the GGUF is written token-ids only). ``ValueError`` for a
    missing file or a tokenizer larger than the model's vocabulary."""
    from gguf import TokenType

    from megatron_elastic.data.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer_path, model_vocab_size=vocab_size)
    if tok.kind != "hf":
        return None, f"llama.cpp has no {tok.kind} tokenizer this export can write"
    source = Path(tokenizer_path)
    if source.is_dir():
        source = source / "tokenizer.json"
    content = json.loads(source.read_text(encoding="utf-8"))
    why = _byte_level_bpe(content)
    if why is not None:
        return None, f"llama.cpp's gpt2 tokenizer would not reproduce it: {why}"
    merges = [m if isinstance(m, str) else " ".join(m) for m in content["model"].get("merges", [])]
    if any(m.count(" ") != 1 for m in merges):
        return None, "a BPE merge holds a space, which GGUF's 'a b' merge strings cannot carry"
    vocab: dict[int, str] = {i: t for t, i in content["model"]["vocab"].items()}
    added_type = {}  # special -> CONTROL, other added tokens -> USER_DEFINED (as the converter)
    for added in content.get("added_tokens", []):
        vocab[added["id"]] = added["content"]
        special = added.get("special", False)
        added_type[added["id"]] = TokenType.CONTROL if special else TokenType.USER_DEFINED
    tokens, types = [], []
    for i in range(vocab_size):
        if i in vocab:
            tokens.append(vocab[i])
            types.append(added_type.get(i, TokenType.NORMAL))
        else:  # the model's rows beyond the tokenizer, as llama.cpp's converter pads them
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    fields = {"tokens": tokens, "types": types, "merges": merges, "eos": tok.eod}
    return fields, "gpt2 byte-level BPE (pre-tokenizer gpt-2)"


def _write_tokenizer(writer, fields: dict[str, Any] | None, vocab_size: int) -> None:
    if fields is None:  # llama.cpp's vocab type NONE: token ids in, logits out
        writer.add_tokenizer_model("none")
        writer.add_vocab_size(vocab_size)
        return
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    writer.add_eos_token_id(fields["eos"])
    writer.add_bos_token_id(fields["eos"])  # GPT-2 style: one end-of-text token
    writer.add_add_bos_token(False)  # the trainer encodes without special tokens
    writer.add_add_eos_token(False)


# ---- tensors ------------------------------------------------------------------------------------


def _tensor_type(name: str, tensor: torch.Tensor, dtype: str):
    """The GGML type llama.cpp's converter gives ``name`` for the requested ``dtype``."""
    from gguf import GGMLQuantizationType as Q

    keep_f32 = (
        tensor.dim() <= 1
        or name.endswith("_norm.weight")
        or ".ffn_gate_inp." in name  # the router, as the converter keeps it
        or ".ssm_conv1d." in name
        or not name.endswith(".weight")
    )
    if keep_f32 or dtype == "f32":
        return Q.F32
    return {"f16": Q.F16, "q8_0": Q.Q8_0}[dtype]


def _add_tensor(writer, name: str, tensor: torch.Tensor, dtype: str) -> str:
    from gguf import GGMLQuantizationType as Q
    from gguf import QuantError, quants

    qtype = _tensor_type(name, tensor, dtype)
    data = tensor.numpy()  # float32 (to_gguf_tensors)
    if qtype == Q.Q8_0:
        try:
            writer.add_tensor(name, quants.quantize(data, Q.Q8_0), raw_dtype=Q.Q8_0)
            return Q.Q8_0.name
        except QuantError:  # row length not a multiple of the block: f16, as the converter
            qtype = Q.F16
    writer.add_tensor(name, data.astype(np.float16) if qtype == Q.F16 else data, raw_dtype=qtype)
    return qtype.name


# ---- the export ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Block:
    """One GGUF layer: its kind, width (FFN / expert neurons, query heads, Mamba heads), KV
    heads."""

    kind: str
    width: int
    kv_heads: int = 0


def _placeholder_attention(hidden: int, head_dim: int) -> dict[str, torch.Tensor]:
    """GGUF tensors of a block 0 that adds exactly 0: one query/key/value head, zero weights."""
    from gguf import MODEL_TENSOR, TENSOR_NAMES

    def name(t: MODEL_TENSOR) -> str:
        return TENSOR_NAMES[t].format(bid=0) + ".weight"

    zeros = torch.zeros(head_dim, hidden)
    return {
        name(MODEL_TENSOR.ATTN_NORM): torch.ones(hidden),
        name(MODEL_TENSOR.ATTN_Q): zeros,
        name(MODEL_TENSOR.ATTN_K): zeros.clone(),
        name(MODEL_TENSOR.ATTN_V): zeros.clone(),
        name(MODEL_TENSOR.ATTN_OUT): torch.zeros(hidden, head_dim),
    }


def _shift_blocks(tensors: Mapping[str, torch.Tensor], by: int) -> dict[str, torch.Tensor]:
    def renamed(n: str) -> str:
        head, bid, rest = n.split(".", 2)
        return f"{head}.{int(bid) + by}.{rest}"

    return {renamed(n) if n.startswith("blk.") else n: t for n, t in tensors.items()}


def _write_gguf(
    file: Path,
    cfg: ModelConfig,
    blocks: list[_Block],
    tensors: Mapping[str, torch.Tensor],
    vocab: dict[str, Any] | None,
    dtype: str,
    name: str,
) -> dict[str, int]:
    from gguf import GGUFWriter, LlamaFileType

    fill_heads = max((b.width for b in blocks if b.kind == "attention"), default=1)
    moe = any(b.kind == "moe" for b in blocks)
    writer = GGUFWriter(str(file), GGUF_MOE_ARCH if moe else GGUF_ARCH)
    writer.add_name(name)
    writer.add_context_length(cfg.max_sequence_length)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(len(blocks))
    writer.add_feed_forward_length([b.width if b.kind in ("mlp", "moe") else 0 for b in blocks])
    if moe:
        _write_moe_keys(writer, cfg)
    writer.add_head_count([b.width if b.kind == "attention" else fill_heads for b in blocks])
    writer.add_head_count_kv([b.kv_heads for b in blocks])
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_eps(cfg.layernorm_epsilon)
    writer.add_layer_norm_rms_eps(cfg.layernorm_epsilon)
    writer.add_ssm_conv_kernel(cfg.mamba_conv_kernel)
    writer.add_ssm_inner_size(cfg.mamba_num_heads * cfg.mamba_head_dim)
    writer.add_ssm_state_size(cfg.mamba_state_dim)
    writer.add_ssm_time_step_rank(cfg.mamba_num_heads)
    writer.add_ssm_group_count(cfg.mamba_num_groups)
    writer.add_rope_scaling_finetuned(False)
    writer.add_file_type(
        {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16}.get(
            dtype, LlamaFileType.MOSTLY_Q8_0
        )
    )
    _write_tokenizer(writer, vocab, cfg.vocab_size)
    types = Counter(_add_tensor(writer, n, t, dtype) for n, t in tensors.items())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dict(sorted(types.items()))


def _write_moe_keys(writer, cfg: ModelConfig) -> None:
    """llama.cpp's MoE keys for megatron's sigmoid router of ``cfg`` (a standalone config)."""
    from gguf import ExpertGatingFuncType

    writer.add_expert_count(cfg.num_moe_experts)
    writer.add_expert_used_count(cfg.moe_router_topk)
    writer.add_expert_feed_forward_length(cfg.moe_ffn_hidden_size)
    writer.add_expert_shared_feed_forward_length(cfg.moe_shared_expert_intermediate_size)
    writer.add_expert_shared_count(1)
    writer.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
    writer.add_expert_weights_norm(cfg.moe_router_topk > 1)  # megatron's sigmoid renormalises
    writer.add_expert_weights_scale(float(cfg.moe_router_topk_scaling_factor or 1.0))
    if cfg.moe_router_group_topk:
        writer.add_expert_group_count(cfg.moe_router_num_groups)
        writer.add_expert_group_used_count(cfg.moe_router_group_topk)


@torch.no_grad()
def export_subnet_to_gguf(
    model: ElasticHybridModel,
    spec: SubnetSpec,
    target: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    dtype: str = "f32",
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Export the sub-network ``spec`` of the (unsplit) elastic ``model`` as ``target/model.gguf``
    for llama.cpp (tensor type ``dtype``, one of :data:`GGUF_TYPES`), with the tokenizer of
    ``tokenizer_path`` when llama.cpp can reproduce it (else token ids only; the manifest says
    which). Writes ``export_manifest.json`` (``metadata`` plus format, file, dims, parameter
    count, tensor types, tokenizer) and returns it. Every refusal (``ValueError``) happens
    before anything is written."""
    from megatron_elastic.elastic.budget import subnet_param_count
    from megatron_elastic.export.gguf_mapping import GGUFLayout, to_gguf_tensors
    from megatron_elastic.export.standalone import standalone_config, standalone_state_dict

    _check_dtype(dtype)
    parent = model.model_config
    spec.validate(parent, model.elastic_config)
    check_gguf_exportable(parent, spec)
    vocab, tokenizer_note = (None, "no tokenizer given: token ids only")
    if tokenizer_path is not None:
        vocab, tokenizer_note = gguf_tokenizer_vocab(tokenizer_path, parent.vocab_size)
    cfg = standalone_config(parent, spec)
    active = [c for c in spec.layers if c.active]
    layout = GGUFLayout(cfg.num_query_groups, cfg.head_dim, cfg.mamba_num_groups)
    state = standalone_state_dict(model, spec)

    blocks = [
        _Block(
            c.kind,
            c.size("moe_expert_ffn") if c.kind == "moe" else c.width,
            cfg.num_query_groups if c.kind == "attention" else 0,
        )
        for c in active
    ]
    placeholder = not any(b.kind == "attention" for b in blocks)
    if placeholder:  # llama.cpp aborts without an attention layer (see the module docstring)
        blocks.insert(0, _Block("attention", 1, 1))
        tensors = {**_placeholder_attention(cfg.hidden_size, cfg.head_dim)}
        tensors.update(_shift_blocks(to_gguf_tensors(state, cfg.layer_kinds(), layout), 1))
    else:
        tensors = to_gguf_tensors(state, cfg.layer_kinds(), layout)

    directory = Path(target)
    directory.mkdir(parents=True, exist_ok=True)
    name = str((metadata or {}).get("budget", "budget"))
    types = _write_gguf(directory / GGUF_FILE, cfg, blocks, tensors, vocab, dtype, name)
    manifest = {
        **(metadata or {}),
        "format": "gguf",
        "file": GGUF_FILE,
        "architecture": GGUF_MOE_ARCH if "moe" in cfg.layer_kinds() else GGUF_ARCH,
        "dtype": dtype,
        "tensor_types": types,
        "params": subnet_param_count(parent, spec),
        "has_attention": any(c.kind == "attention" for c in active),
        "placeholder_attention_layer": placeholder,
        "placeholder_params": 4 * cfg.head_dim * cfg.hidden_size + cfg.hidden_size
        if placeholder
        else 0,
        "tokenizer": {
            "source": None if tokenizer_path is None else str(Path(tokenizer_path).resolve()),
            "in_gguf": vocab is not None,
            "note": tokenizer_note,
        },
        "dims": {
            "hidden": spec.hidden,
            "layers": [dataclasses.asdict(c) for c in spec.layers],
            "pattern": "".join(_KIND_SYMBOL[c.kind] for c in active),
        },
    }
    (directory / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
