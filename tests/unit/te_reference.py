"""megatron-core's own Transformer-Engine hybrid model, buildable without Transformer Engine.

The reference for what a Megatron-LM / Megatron-Bridge checkpoint must hold is the model those tools
build by default: ``HybridModel`` with ``megatron.core.models.hybrid.hybrid_layer_specs.
hybrid_stack_spec``. Without CUDA, Transformer Engine cannot be imported and megatron-core's TE
wrappers are placeholders, so each TE class in that spec is replaced here by a stand-in with the
parameters and checkpoint entries of the TE module (read from transformer_engine's source:
``LayerNormLinear`` registers ``weight`` and ``layer_norm_weight``, ``Linear`` ``weight``, the
``RMSNorm`` op ``weight``, ``GroupedLinear`` one ``weight{i}`` per GEMM; every one has
``_extra_state``, an empty uint8 tensor without FP8) and the TE wrapper's sharding (the same axis
maps as megatron's tensor-parallel linears, which the stand-ins inherit; the grouped linears'
per-expert shards as megatron's ``TEGroupedLinear`` writes them). The ``E`` layer is built by
megatron's own ``TESpecProvider`` with the grouped-linear stand-ins in place (``TEGroupedMLP``
experts, as on a GPU; without TE megatron would fall back to ``SequentialMLP``). Everything else
(which modules exist, where norms are fused, the layer classes, the Mamba mixer's checkpoint layout,
the model's prefixes) is megatron-core's own.

The stand-in fused norm also computes (RMS norm, then the linear), and the grouped linears run each
expert's rows through its weight, so the reference model runs forward on CPU; its Mamba mixer is
ours (megatron's mixer with a CPU scan, same parameters).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any
from unittest import mock

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_elastic import platform
from megatron_elastic.config import ModelConfig
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.model.builder import mixer_params
from megatron_elastic.model.mamba import TorchScanMambaMixer
from megatron_elastic.model.norm import RMSNorm, rms_norm

__all__ = ["build_te_reference_model", "sharding_signature"]


class _TEExtraState:
    """TE's ``_extra_state``: an empty uint8 tensor when no FP8 state exists."""

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        pass


def _drop_te_only(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs.pop("name", None)  # TE wrappers take the module name; megatron's linears do not
    return kwargs


class LayerNormColumnParallelLinear(_TEExtraState, ColumnParallelLinear):
    """Stands in for ``TELayerNormColumnParallelLinear``: RMS norm fused into the linear."""

    def __init__(self, input_size: int, output_size: int, **kwargs: Any) -> None:
        super().__init__(input_size, output_size, **_drop_te_only(kwargs))
        config = kwargs["config"]
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(
            torch.ones(input_size, dtype=config.params_dtype)
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        return super().forward(rms_norm(x, self.layer_norm_weight, self.eps), *args, **kwargs)


class TEColumnParallelLinear(_TEExtraState, ColumnParallelLinear):
    """Stands in for ``TEColumnParallelLinear`` (the shared expert's ``linear_fc1``: no fused
    norm, the MoE layer's pre-norm is a separate ``TENorm``)."""

    def __init__(self, input_size: int, output_size: int, **kwargs: Any) -> None:
        super().__init__(input_size, output_size, **_drop_te_only(kwargs))


class TERowParallelLinear(_TEExtraState, RowParallelLinear):
    """Stands in for ``TERowParallelLinear``."""

    def __init__(self, input_size: int, output_size: int, **kwargs: Any) -> None:
        super().__init__(input_size, output_size, **_drop_te_only(kwargs))


class TEDotProductAttention(DotProductAttention):
    """Stands in for ``TEDotProductAttention`` (no checkpoint entries without a learnable
    softmax offset, as megatron's TE wrapper)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("cp_comm_type", None)
        kwargs.pop("pg_collection", None)
        super().__init__(*args, **kwargs)


class TENorm(_TEExtraState, RMSNorm):
    """Stands in for ``TENorm`` (TE's RMSNorm op)."""


class _GroupedLinear(_TEExtraState, torch.nn.Module):
    """Stands in for megatron's ``TEGroupedLinear`` wrapper of TE's ``GroupedLinear``: one
    weight per GEMM (expert), registered as ``weight0`` ... ``weight{n-1}`` as TE registers
    them, the input's rows split among the GEMMs by ``m_splits`` (tokens arrive sorted by
    expert), each run through its own weight. Its checkpoint entries are per expert under one
    key with the expert axis prepended, the layout megatron's wrapper writes (and
    ``SequentialMLP`` too): ``<prefix>weight`` and ``<prefix>_extra_state``, the state-dict
    names ``weight{i}`` and ``_extra_state`` / ``_extra_state{i}``. TP 1 and EP 1 here."""

    tp_axis: int
    """The weight's tensor-parallel axis (0 column-parallel, 1 row-parallel)."""

    def __init__(self, num_gemms: int, input_size: int, output_size: int, **kwargs: Any) -> None:
        super().__init__()
        config = kwargs["config"]
        assert not kwargs.get("bias"), "NemotronH experts have no biases"
        self.num_gemms = num_gemms
        self._pg_collection = kwargs["pg_collection"]
        for i in range(num_gemms):
            weight = torch.empty(output_size, input_size, dtype=config.params_dtype)
            kwargs["init_method"](weight)
            self.register_parameter(f"weight{i}", torch.nn.Parameter(weight))

    def forward(self, x: torch.Tensor, m_splits: list[int]) -> tuple[torch.Tensor, None]:
        chunks = torch.split(x, m_splits)
        out = [c @ getattr(self, f"weight{i}").t() for i, c in enumerate(chunks)]
        return torch.cat(out), None

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict[str, Any]:
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        ep = self._pg_collection.ep
        assert ep.size() == 1, "the stand-in holds every expert (EP 1)"
        out: dict[str, Any] = {}
        for i in range(self.num_gemms):
            expert = {
                f"{i}.weight": getattr(self, f"weight{i}"),
                f"{i}._extra_state": self.get_extra_state(),
            }
            sharded = make_sharded_tensors_for_checkpoint(
                expert,
                "",
                {f"{i}.weight": self.tp_axis},
                (*sharded_offsets, (len(sharded_offsets), i, self.num_gemms)),
                tp_group=self._pg_collection.expt_tp,
                dp_cp_group=metadata["dp_cp_group"],
            )
            replace_prefix_for_sharding(sharded, f"{i}.", prefix)
            out[f"{prefix}weight{i}"] = sharded[f"{i}.weight"]
            out[f"{prefix}_extra_state{i or ''}"] = sharded[f"{i}._extra_state"]
        return out


class TEColumnParallelGroupedLinear(_GroupedLinear):
    """Stands in for ``TEColumnParallelGroupedLinear`` (experts' ``linear_fc1``)."""

    tp_axis = 0


class TERowParallelGroupedLinear(_GroupedLinear):
    """Stands in for ``TERowParallelGroupedLinear`` (experts' ``linear_fc2``)."""

    tp_axis = 1


def _stand_ins() -> tuple[tuple[Any, type], ...]:
    from megatron.core.extensions import transformer_engine as te_ext

    return (
        (te_ext.TELayerNormColumnParallelLinear, LayerNormColumnParallelLinear),
        (te_ext.TEColumnParallelLinear, TEColumnParallelLinear),
        (te_ext.TERowParallelLinear, TERowParallelLinear),
        (te_ext.TEDotProductAttention, TEDotProductAttention),
        (te_ext.TENorm, TENorm),
    )


def _replace(value: Any) -> Any:
    """A copy of ``value`` with every TE class of megatron's spec swapped for its stand-in
    (through module specs, submodule dataclasses and partials; megatron's spec is untouched)."""
    for te_class, stand_in in _stand_ins():
        if value is te_class:
            return stand_in
    if isinstance(value, functools.partial):
        keywords = {k: _replace(v) for k, v in value.keywords.items()}
        return functools.partial(value.func, *value.args, **keywords)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _replace(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init
        }
        return dataclasses.replace(value, **changes)
    if isinstance(value, dict):
        return {k: _replace(v) for k, v in value.items()}
    return value


def _te_moe_layer(moe_layer: ModuleSpec) -> ModuleSpec:
    """The spec's ``E`` layer as megatron builds it where Transformer Engine is installed.

    ``hybrid_layer_specs`` resolves its MoE module when imported (``get_moe_module_spec(use_te=
    True, moe_grouped_gemm=True)``); without TE the grouped linears are ``None`` and megatron
    falls back to ``SequentialMLP``. Here megatron's own ``TESpecProvider`` runs again with the
    grouped-linear stand-ins in place of TE's classes, which gives ``TEGroupedMLP`` experts and
    a shared expert of TE linears, as on a GPU."""
    from megatron.core.extensions import transformer_engine_spec_provider as provider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    with (
        mock.patch.object(provider, "TEColumnParallelGroupedLinear", TEColumnParallelGroupedLinear),
        mock.patch.object(provider, "TERowParallelGroupedLinear", TERowParallelGroupedLinear),
    ):
        moe = get_moe_module_spec(use_te=True, num_experts=1, moe_grouped_gemm=True)
    submodules = dataclasses.replace(moe_layer.submodules, mlp=moe)
    return _replace(dataclasses.replace(moe_layer, submodules=submodules))


def te_reference_spec(cfg: ModelConfig) -> ModuleSpec:
    """megatron-core's TE hybrid stack spec with the stand-ins, Mamba, attention, MLP and MoE
    layers, our CPU-capable Mamba mixer."""
    platform.apply()  # registers mamba_ssm's Python parts before megatron's mixer is imported
    from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

    layers = hybrid_stack_spec.submodules
    sub = HybridStackSubmodules(
        mamba_layer=_replace(layers.mamba_layer),
        attention_layer=_replace(layers.attention_layer),
        mlp_layer=_replace(layers.mlp_layer),
        moe_layer=_te_moe_layer(layers.moe_layer),
    )
    spec = dataclasses.replace(hybrid_stack_spec, submodules=sub)
    mixer = sub.mamba_layer.submodules.mixer
    mixer.module = TorchScanMambaMixer
    mixer.params = {**mixer.params, **mixer_params(cfg)}
    return spec


def build_te_reference_model(cfg: ModelConfig, pgs: Any) -> torch.nn.Module:
    """The model Megatron-LM's ``pretrain_hybrid.py`` builds for ``cfg`` (TP=1, PP=1), TE
    modules stood in for. ``HybridStack`` builds its final norm with ``TENorm`` directly, so
    that name is patched while the model is built."""
    spec = te_reference_spec(cfg)
    from megatron.core.models.hybrid import hybrid_block

    with mock.patch.object(hybrid_block, "TENorm", TENorm):
        return build_hybrid_model(cfg, pgs, stack_spec=spec)


def sharding_signature(sharded_state_dict: dict[str, Any]) -> dict[str, tuple]:
    """Per checkpoint key, everything that decides where its shards land in a distributed
    checkpoint (factories built first), shard by shard in offset order (an expert key has one
    shard per expert): kind, dtype, shapes, offsets, fragmentation, replica; for an object
    (``_extra_state``) also what it holds (a tensor's dtype and shape)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        apply_factories,
    )

    state = copy.copy(sharded_state_dict)
    apply_factories(state)
    shards: dict[str, list[tuple]] = {}
    for item in nested_values(state):
        if isinstance(item, ShardedTensor):
            shards.setdefault(item.key, []).append(
                (
                    "tensor",
                    item.dtype,
                    item.local_shape,
                    item.global_shape,
                    item.global_offset,
                    item.axis_fragmentations,
                    item.replica_id,
                    item.prepend_axis_num,
                    item.flattened_range,
                )
            )
        elif isinstance(item, ShardedObject):
            data = item.data
            value = (data.dtype, tuple(data.shape)) if torch.is_tensor(data) else repr(data)
            shards.setdefault(item.key, []).append(
                ("object", item.global_shape, item.global_offset, item.replica_id, value)
            )
    offset = {"tensor": 4, "object": 2}
    return {
        key: tuple(sorted(found, key=lambda s: s[offset[s[0]]])) for key, found in shards.items()
    }
