"""NVIDIA ModelOpt's Minitron importance (``mcore_minitron``) as a second importance backend.

``mtp.prune(model, mode="mcore_minitron", ...)`` is ``mtn.convert`` (the model becomes a ModelOpt
search space whose hparams carry importance estimators), ``MCoreMinitronSearcher.search`` (forward
hooks over a calibration ``forward_loop``, then sorting and trimming) and ``mtn.export`` (which
bakes the trimmed weights and drops the hparams, and with them the importance). We run the first
two steps, with a constraint that prunes nothing, and read every hparam's importance *before*
export: :func:`collect_minitron_scores`. :func:`ranking_from_modelopt` (pure) turns those into our
:class:`Ranking`; the weights are then permuted by our own :func:`rank_model`, as for the native
backend.

What ModelOpt 0.47 computes (``modelopt/torch/prune/plugins/mcore_minitron.py``), per
calibration batch, in float32, then summed over batches:

- ``hidden_size``: for every fused norm (before QKV, fc1, Mamba ``in_proj``; not the final norm)
  ``sqrt(sum_batch (mean_seq |LN(X)|)^2)`` per channel, summed over norms;
- ``ffn_hidden_size``: the same statistic of the fc2 *input* (after squared ReLU);
- ``num_attention_heads``: the statistic of the ``linear_proj`` input per head channel, L2 over the
  head's channels, heads ranked *within their query group* (query groups are never pruned since
  0.41). ModelOpt returns an *order* here, not an importance: global head ids, group by group;
- ``mamba_head_dim``: the statistic of the ``x`` segment of ``in_proj``'s output, L2 over heads,
  returned as an order; ``mamba_num_heads``: L2 over the best ``mamba_head_dim`` channels (all of
  them at full width), ranked within each Mamba group, returned as a group-aware order;
- depth: per layer ``1 - cos(layer input, layer output)`` (mean over tokens), summed over batches,
  one shot; higher is more important.

ModelOpt's Megatron plugin imports ``transformer_engine`` and converts only Transformer-Engine
modules (fused-norm linears, ``TEDotProductAttention``), and its language-model conversion
asserts tensor-parallel size 1: this backend needs a CUDA GPU with Transformer Engine, one process,
TP=1 and PP=1. :func:`modelopt_available` says why it cannot run where it cannot. ModelOpt is
imported only inside the functions that call it.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import nn

from megatron_elastic import platform
from megatron_elastic.config import ModelConfig
from megatron_elastic.importance.scores import Ranking
from megatron_elastic.training.lm_step import position_ids_like

__all__ = [
    "MinitronScores",
    "collect_minitron_scores",
    "minitron_scores_from_model",
    "modelopt_available",
    "ranking_from_modelopt",
    "run_minitron_importance",
    "te_state_dict",
]

MinitronScores = dict[str, Any]
"""ModelOpt's per-hparam results, keyed by its hparam names (layer indices are ours: 0-based):

- ``"hidden_size"``: (hidden,) importance, higher is more important;
- ``"ffn_hidden_size"``: ``{layer: (ffn,) importance}`` for every MLP layer;
- ``"num_attention_heads"``: ``{layer: (heads,) order}`` for every attention layer: global head
  ids, query group by query group, each group's heads best first (ModelOpt's group-aware order);
- ``"mamba_num_heads"``: ``{layer: (heads,) order}`` for every Mamba layer, the same layout over
  Mamba groups;
- ``"mamba_head_dim"``: ``{layer: (head_dim,) order}`` for every Mamba layer;
- ``"num_layers"`` (optional): ``{layer_number (1-based): score}``, the summed one-shot
  ``1 - cos(input, output)``; higher is more important.
"""

_NEEDS = (
    "--backend modelopt needs a CUDA GPU with Transformer Engine (ModelOpt's Megatron plugin "
    "imports transformer_engine); use --backend native, which runs everywhere"
)

# Our local spec names the pre-norms after the layer; Transformer Engine fuses them into the
# linear that follows (megatron's own sharded_state_dict_keys_map, see model/specs.py).
_LOCAL_TO_TE = (
    (re.compile(r"^(decoder\.layers\.\d+\.)norm\."), r"\1mixer.in_proj.layer_norm_"),
    (
        re.compile(r"^(decoder\.layers\.\d+\.)input_layernorm\."),
        r"\1self_attention.linear_qkv.layer_norm_",
    ),
    (re.compile(r"^(decoder\.layers\.\d+\.)pre_mlp_layernorm\."), r"\1mlp.linear_fc1.layer_norm_"),
)


def modelopt_available() -> str | None:
    """``None`` when the ModelOpt backend can run in this process, else why it cannot."""
    if not platform.cuda_available():
        return f"no CUDA device: {_NEEDS}"
    if importlib.util.find_spec("transformer_engine") is None:
        return f"transformer_engine is not installed: {_NEEDS}"
    if importlib.util.find_spec("modelopt") is None:
        return "nvidia-modelopt is not installed (it also needs requests and huggingface_hub)"
    platform.apply()  # registers mamba_ssm without its CUDA extension, before ModelOpt imports it
    try:
        importlib.import_module("modelopt.torch.prune.plugins.mcore_minitron")
        megatron_plugin = importlib.import_module("modelopt.torch.nas.plugins.megatron")
    except Exception as exc:  # any import failure is the reason we report, verbatim
        return f"ModelOpt's mcore_minitron plugin failed to import: {type(exc).__name__}: {exc}"
    if not megatron_plugin.HAS_MAMBA:
        return "ModelOpt could not import mamba_ssm, so it cannot convert Mamba layers"
    return None


def te_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A HybridModel state dict under Transformer-Engine parameter names (local-spec norms renamed
    to the fused ``layer_norm_weight``; TE names unchanged), without ``_extra_state`` entries."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("_extra_state"):
            continue
        for pattern, repl in _LOCAL_TO_TE:
            name = pattern.sub(repl, name)
        out[name] = tensor
    return out


def _load_into_te_model(te_model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    missing, unexpected = te_model.load_state_dict(te_state_dict(state), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(
            "the parent's weights do not map onto megatron's TE hybrid model: "
            f"missing {missing[:8]}, unexpected {list(unexpected)[:8]}"
        )


def _hparam_value(hp: Any, name: str, *, is_order: bool) -> torch.Tensor:
    """An hparam's importance (or ModelOpt's order), on the CPU. A head hparam with a single
    choice (one head per group) is not configurable and has nothing to rank: identity order. A
    fixed width hparam would have no importance at all, which is an error."""
    if not hp.is_configurable:
        if is_order or hp.max == 1:
            return torch.arange(hp.max) if is_order else torch.zeros(hp.max)
        raise RuntimeError(f"ModelOpt left {name} fixed at {hp.max}: it computed no importance")
    value = hp.importance.detach().cpu()
    return value if is_order else value.float()  # an order stays integer (checked on conversion)


def minitron_scores_from_model(
    model: nn.Module, model_cfg: ModelConfig, layer_scores: Mapping[int, float]
) -> MinitronScores:
    """Read every hparam's importance from a model converted by ``mcore_minitron`` whose
    calibration forward loop has run, plus the searcher's ``layer_scores``."""
    kinds = model_cfg.layer_kinds()
    scores: MinitronScores = {
        "hidden_size": _hparam_value(
            model.get_hparam("hidden_size"), "hidden_size", is_order=False
        ),
        "ffn_hidden_size": {},
        "num_attention_heads": {},
        "mamba_num_heads": {},
        "mamba_head_dim": {},
        "num_layers": {int(k): float(v) for k, v in layer_scores.items()},
    }
    for layer in model.decoder.layers:
        j = layer.layer_number - 1
        if kinds[j] == "mlp":
            hp = layer.mlp.get_hparam("ffn_hidden_size")
            scores["ffn_hidden_size"][j] = _hparam_value(hp, "ffn_hidden_size", is_order=False)
        elif kinds[j] == "attention":
            hp = layer.self_attention.get_hparam("num_attention_heads")
            scores["num_attention_heads"][j] = _hparam_value(
                hp, "num_attention_heads", is_order=True
            )
        else:
            for name in ("mamba_num_heads", "mamba_head_dim"):
                scores[name][j] = _hparam_value(layer.mixer.get_hparam(name), name, is_order=True)
    return scores


def collect_minitron_scores(
    model: nn.Module, model_cfg: ModelConfig, batches: Sequence[dict[str, torch.Tensor]]
) -> MinitronScores:
    """Run ModelOpt's ``mcore_minitron`` importance collection on ``model`` (a megatron
    ``HybridModel`` built with the TE hybrid spec, TP=1, on GPU; converted in place and spent
    afterwards) over ``batches`` (each with ``tokens`` (b, s)) and return its per-hparam scores."""
    import modelopt.torch.nas as mtn
    from modelopt.torch.prune.plugins.mcore_minitron import (
        MCoreMinitronSearcher,
        get_mcore_minitron_config,
    )

    # Divisor 1 everywhere: every width is a choice, so every hparam is configurable and carries
    # its importance (the defaults, e.g. hidden_size_divisor=256, freeze small models' hparams).
    config = get_mcore_minitron_config(
        hidden_size_divisor=1,
        ffn_hidden_size_divisor=1,
        mamba_head_dim_divisor=1,
        num_moe_experts_divisor=1,
        num_layers_divisor=1,
    )
    model = mtn.convert(model, [("mcore_minitron", config)])
    device = next(model.parameters()).device

    def forward_loop(m: nn.Module) -> None:
        for batch in batches:
            ids = batch["tokens"].to(device)
            m(ids, position_ids_like(ids), None)

    searcher = MCoreMinitronSearcher()
    # Keeping all layers prunes nothing; only num_layers is "sorted" (it has no importance), so
    # the weights stay as they are. Importance and layer scores come from the forward loop.
    searcher.search(
        model,
        {"export_config": {"num_layers": model_cfg.num_layers}},
        dummy_input=None,
        config={"forward_loop": forward_loop},
    )
    return minitron_scores_from_model(model, model_cfg, searcher.state_dict()["layer_scores"])


def _source_state(
    model_cfg: ModelConfig, source: str | Path | nn.Module, pgs: ProcessGroupCollection
) -> dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return dict(source.state_dict())
    from megatron_elastic.checkpoint import load_checkpoint
    from megatron_elastic.model.builder import build_hybrid_model, mixer_params
    from megatron_elastic.model.specs import local_hybrid_stack_spec

    # Checkpoints store megatron's TE names; the local spec maps its own names onto them, so it
    # loads any parent checkpoint on any machine, and te_state_dict maps back.
    local = build_hybrid_model(
        model_cfg, pgs, stack_spec=local_hybrid_stack_spec(mixer_params(model_cfg))
    )
    load_checkpoint(source, local, model_cfg, kinds=("parent", "ranked"))
    return dict(local.state_dict())


def run_minitron_importance(
    model_cfg: ModelConfig,
    source: str | Path | nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    pgs: ProcessGroupCollection,
    *,
    params_dtype: torch.dtype = torch.float32,
) -> Ranking:
    """Rank ``source`` (a parent checkpoint directory, or a full TP=1 ``HybridModel`` /
    ``ElasticHybridModel``) with ModelOpt's Minitron importance on calibration ``batches``.

    Builds megatron's TE hybrid model, loads the parent's weights into it, runs
    :func:`collect_minitron_scores` and converts with :func:`ranking_from_modelopt`. ``source`` is
    left untouched. Needs :func:`modelopt_available` to return ``None``.
    """
    reason = modelopt_available()
    if reason is not None:
        raise RuntimeError(reason)
    if pgs.tp.size() != 1 or pgs.pp.size() != 1 or dist.get_world_size() != 1:
        raise ValueError(
            "ModelOpt's Minitron importance runs in one process with tensor and pipeline "
            f"parallel size 1 (got world {dist.get_world_size()}, tp {pgs.tp.size()}, "
            f"pp {pgs.pp.size()})"
        )
    from megatron_elastic.model.builder import build_hybrid_model, mixer_params
    from megatron_elastic.model.specs import te_hybrid_stack_spec

    state = _source_state(model_cfg, source, pgs)
    te_model = build_hybrid_model(
        model_cfg,
        pgs,
        params_dtype=params_dtype,
        stack_spec=te_hybrid_stack_spec(mixer_params(model_cfg)),
    )
    _load_into_te_model(te_model, state)
    del state
    try:
        scores = collect_minitron_scores(te_model, model_cfg, batches)
    finally:
        del te_model
        torch.cuda.empty_cache()
    return ranking_from_modelopt(model_cfg, scores)


# The pure conversion ------------------------------------------------------------------------


def _vector(value: Any, size: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(value).detach().float().cpu().flatten()
    if t.numel() != size:
        raise ValueError(f"ModelOpt {what}: {t.numel()} entries, expected {size}")
    return t


def _permutation(value: Any, size: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(value).detach().cpu().flatten()
    if t.is_floating_point() or not torch.equal(t.sort().values, torch.arange(size)):
        raise ValueError(
            f"ModelOpt {what} is not an order of {size} units (ModelOpt 0.47 returns a "
            "permutation for num_attention_heads, mamba_num_heads and mamba_head_dim)"
        )
    return t.long()


def _group_local(value: Any, units: int, groups: int, what: str) -> list[list[int]]:
    """ModelOpt's group-aware order (global ids, group by group) as per-group local orders."""
    order = _permutation(value, units, what).view(groups, units // groups)
    per_group = units // groups
    local = order - torch.arange(groups).unsqueeze(1) * per_group
    if local.min() < 0 or local.max() >= per_group:
        raise ValueError(
            f"ModelOpt {what} moves units across groups; each of the {groups} groups must rank "
            f"only its own {per_group} units"
        )
    return local.tolist()


def _argsort(importance: torch.Tensor) -> list[int]:
    return torch.argsort(importance, descending=True, stable=True).tolist()


def _per_layer(scores: MinitronScores, key: str, layers: list[int]) -> dict[int, Any]:
    values = scores.get(key, {})
    if set(values) != set(layers):
        raise ValueError(
            f"ModelOpt {key}: scores for layers {sorted(values)}, expected layers {layers}"
        )
    return values


def ranking_from_modelopt(model: ModelConfig, scores: MinitronScores) -> Ranking:
    """Our :class:`Ranking` from ModelOpt's per-hparam results (see :data:`MinitronScores`).

    Importances are sorted best first (stable: ties keep index order); ModelOpt's group-aware head
    orders become per-group local orders, and an order that mixes groups is rejected. The layer
    order sorts ModelOpt's one-shot cosine scores, best first (ties: lower layer first, as
    ModelOpt's stable sort does). ``scores`` of the result hold ModelOpt's importances (``hidden``,
    ``ffn``) and layer scores (``layer_cosine``); heads and head channels come as orders only.
    """
    kinds = model.layer_kinds()
    layers_of = {k: [j for j, kind in enumerate(kinds) if kind == k] for k in set(kinds)}
    hidden = _vector(scores["hidden_size"], model.hidden_size, "hidden_size")
    ranking = Ranking(
        hidden=_argsort(hidden),
        orders={"attention_heads": {}, "mamba_heads": {}, "mamba_head_dim": {}, "ffn": {}},
        layers=None,
        scores={"backend": "modelopt", "hidden": hidden.tolist(), "ffn": {}},
    )
    ffn = _per_layer(scores, "ffn_hidden_size", layers_of.get("mlp", []))
    for j in sorted(ffn):
        imp = _vector(ffn[j], model.ffn_hidden_size, f"ffn_hidden_size of layer {j}")
        ranking.orders["ffn"][j] = _argsort(imp)
        ranking.scores["ffn"][str(j)] = imp.tolist()
    attention = _per_layer(scores, "num_attention_heads", layers_of.get("attention", []))
    for j in sorted(attention):
        ranking.orders["attention_heads"][j] = _group_local(
            attention[j],
            model.num_attention_heads,
            model.num_query_groups,
            f"num_attention_heads of layer {j}",
        )
    mamba = layers_of.get("mamba", [])
    heads = _per_layer(scores, "mamba_num_heads", mamba)
    channels = _per_layer(scores, "mamba_head_dim", mamba)
    for j in mamba:
        ranking.orders["mamba_heads"][j] = _group_local(
            heads[j], model.mamba_num_heads, model.mamba_num_groups, f"mamba_num_heads of layer {j}"
        )
        ranking.orders["mamba_head_dim"][j] = _permutation(
            channels[j], model.mamba_head_dim, f"mamba_head_dim of layer {j}"
        ).tolist()
    depth = scores.get("num_layers")
    if depth is not None:
        numbers = sorted(int(k) for k in depth)
        if numbers != list(range(1, model.num_layers + 1)):
            raise ValueError(
                f"ModelOpt layer scores for layer numbers {numbers}, expected 1..{model.num_layers}"
            )
        score = {int(k): float(v) for k, v in depth.items()}
        ranking.layers = [n - 1 for n in sorted(numbers, key=lambda n: (-score[n], n))]
        ranking.scores["layer_cosine"] = {str(n - 1): score[n] for n in numbers}
    return ranking
