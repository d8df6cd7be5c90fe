"""The elastic hybrid model: megatron-core's ``HybridModel`` whose every layer can run a nested
sub-network, chosen per forward pass with :meth:`ElasticHybridModel.set_subnet`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.utils import make_viewless_tensor

from megatron_elastic.config import ModelConfig, ParallelConfig
from megatron_elastic.elastic.config import ElasticConfig
from megatron_elastic.elastic.layers import (
    ActiveWidth,
    ElasticMLP,
    ElasticRMSNorm,
    ElasticSelfAttention,
    apply_unit_weight,
    column_parallel,
    hidden_mask,
)
from megatron_elastic.elastic.mamba import ElasticMambaMixer
from megatron_elastic.elastic.moe import ElasticMoELayer
from megatron_elastic.elastic.moe_axes import expert_groups, moe_indices
from megatron_elastic.elastic.subnet import (
    SubnetSpec,
    attention_indices,
    ffn_indices,
    mamba_indices,
)
from megatron_elastic.model.builder import Recompute, build_hybrid_model, mixer_params
from megatron_elastic.model.specs import LocalNormHybridStack, local_hybrid_stack_spec

__all__ = [
    "SubnetWeights",
    "ElasticHybridStack",
    "ElasticHybridModel",
    "elastic_stack_spec",
    "build_elastic_model",
]


_WIDTH_MODULE = {"mamba": "mixer", "attention": "self_attention", "mlp": "mlp", "moe": "mlp"}
"""The module of each layer kind whose width is elastic."""


@dataclass(frozen=True)
class SubnetWeights:
    """Router weights that ride on a forward pass (straight-through: 1.0 in value, with grads).

    Vectors are in logical order over all TP ranks: attention heads group-major, Mamba channels
    head-major within group-major heads, FFN neurons block-major; each rank takes its share.
    """

    hidden: torch.Tensor | None = None
    """Scalar, or one weight per active embedding channel."""
    layers: tuple[torch.Tensor | None, ...] | None = None
    """Per layer: scalar, or one weight per active head (attention), channel (Mamba), neuron."""
    gates: tuple[torch.Tensor | None, ...] | None = None
    """Per layer: scalar depth gate ``g`` (output = x + g * (layer(x) - x))."""


class ElasticHybridStack(LocalNormHybridStack):
    """The layer stack; skips inactive layers (their input passes through the residual)."""

    run_layers: tuple[bool, ...] | None = None
    gates: tuple[torch.Tensor | None, ...] | None = None
    active_hidden: int | None = None
    mode: str = "slice"

    def layer_function(self, layer: torch.nn.Module, attention_mask, index: int):
        """The layer with its elastic modules' sub-network (``active``) captured now and put back
        for the recomputation, which under 1F1B runs after later micro-batches have set other
        sub-networks (and restored afterwards)."""
        run = super().layer_function(layer, attention_mask, index)
        if not self.recomputes(index):
            return run
        states = [(m, m.active) for m in layer.modules() if hasattr(m, "active")]

        def replay(hidden):
            saved = [(module, module.active) for module, _ in states]
            for module, active in states:
                module.active = active
            try:
                return run(hidden)
            finally:
                for module, active in saved:
                    module.active = active

        return replay

    def forward(
        self,
        hidden_states,
        attention_mask,
        inference_context=None,
        rotary_pos_emb=None,
        *,
        inference_params=None,
        packed_seq_params=None,
        padding_mask=None,
    ):
        if self.run_layers is None:
            return super().forward(
                hidden_states,
                attention_mask,
                inference_context,
                rotary_pos_emb,
                inference_params=inference_params,
                packed_seq_params=packed_seq_params,
                padding_mask=padding_mask,
            )
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("elastic sub-networks run without an inference cache")
        if not self.pre_process:
            hidden_states = self.input_tensor
            if self.mode == "slice":  # stages exchange full-width tensors (see below)
                hidden_states = hidden_states[..., : self.active_hidden]
        for index, (layer, run, gate) in enumerate(
            zip(self.layers, self.run_layers, self.gates, strict=True)
        ):
            if not run:
                continue
            out = self.run_layer(layer, hidden_states, attention_mask, index)
            hidden_states = out if gate is None else hidden_states + gate * (out - hidden_states)
        if self.post_process and self.post_layer_norm:
            hidden_states = self.final_norm(hidden_states)
        elif self.mode == "slice":
            # megatron's p2p sizes receive buffers from config.hidden_size: pad to full width.
            pad = self.config.hidden_size - hidden_states.size(-1)
            hidden_states = F.pad(hidden_states, (0, pad))
        return make_viewless_tensor(
            hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True
        )


class ElasticHybridModel(HybridModel):
    """``HybridModel`` that runs the sub-network last given to :meth:`set_subnet`."""

    model_config: ModelConfig
    elastic_config: ElasticConfig
    subnet: SubnetSpec | None = None
    _hidden_weight: torch.Tensor | None = None

    def set_subnet(
        self, spec: SubnetSpec | None, weights: SubnetWeights | None = None, mode: str | None = None
    ) -> None:
        """Run ``spec`` from now on (``None`` or the full spec without weights: the parent, via
        megatron's own forward, bit for bit). ``mode`` defaults to the elastic config's."""
        model, elastic = self.model_config, self.elastic_config
        mode = mode or elastic.mode
        if mode not in ("slice", "mask"):
            raise ValueError(f"mode must be 'slice' or 'mask', got {mode!r}")
        if spec is not None:
            spec.validate(model, elastic)
        if spec is None or (spec.is_full(model) and weights is None):
            self._clear()
            return
        weights = _sequence_parallel_weights(
            weights or SubnetWeights(), self.config, self.pg_collection
        )
        self.subnet, self._mode = spec, mode
        self._hidden_weight = weights.hidden
        for module in self.modules():
            if isinstance(module, ElasticRMSNorm):
                module.active = ActiveWidth(mode, spec.hidden)
        stack: ElasticHybridStack = self.decoder
        for layer, j in zip(stack.layers, self._global_layer_ids(), strict=True):
            getattr(layer, _WIDTH_MODULE[spec.layers[j].kind]).active = self._layer_active(
                spec, j, mode, weights.layers[j] if weights.layers is not None else None
            )
        stack.run_layers = tuple(spec.layers[j].active for j in self._global_layer_ids())
        stack.gates = tuple(
            weights.gates[j] if weights.gates is not None else None
            for j in self._global_layer_ids()
        )
        stack.active_hidden, stack.mode = spec.hidden, mode

    def _global_layer_ids(self) -> list[int]:
        return [layer.layer_number - 1 for layer in self.decoder.layers]

    def _layer_active(
        self, spec: SubnetSpec, j: int, mode: str, weight: torch.Tensor | None
    ) -> ActiveWidth:
        """What layer ``j``'s elastic module runs on this rank."""
        model, choice = self.model_config, spec.layers[j]
        tp_size, tp_rank = self.pg_collection.tp.size(), self.pg_collection.tp.rank()
        if weight is not None and tp_size > 1:
            # The weight multiplies this rank's shard of the activations, so its gradient here is
            # partial; all-reducing it in backward makes the router's gradient complete (and
            # identical) on every TP rank, like the replicated hidden weight and depth gates.
            weight = copy_to_tensor_model_parallel_region(weight, group=self.pg_collection.tp)
            if weight.dim() > 0 and choice.kind != "moe":  # this rank's share (an E layer
                weight = weight.chunk(tp_size)[tp_rank]  # takes its own: per expert, shared)
        if choice.kind == "mamba":
            idx = mamba_indices(
                model.mamba_num_heads,
                model.mamba_num_groups,
                model.mamba_head_dim,
                model.mamba_state_dim,
                choice.width,
                choice.head_dim,
                tp_size,
            )
        elif choice.kind == "attention":
            idx = attention_indices(
                model.num_attention_heads,
                model.num_query_groups,
                model.head_dim,
                choice.width,
                tp_size,
            )
        elif choice.kind == "moe":
            idx = moe_indices(
                model.num_moe_experts,
                expert_groups(model, self.elastic_config),
                choice.size("moe_experts"),
                (model.moe_ffn_hidden_size, choice.size("moe_expert_ffn")),
                (model.moe_shared_expert_intermediate_size or 0, choice.size("moe_shared_ffn")),
                self.elastic_config.ffn_nesting_blocks,
                tp_size,
            )
        else:
            idx = ffn_indices(
                model.ffn_hidden_size, self.elastic_config.ffn_nesting_blocks, choice.width, tp_size
            )
        return ActiveWidth(mode, spec.hidden, idx, weight)

    @torch.no_grad()
    def sliced_state_dict(self, spec: SubnetSpec, copy: bool = True) -> dict[str, torch.Tensor]:
        """This rank's parameters physically cut to ``spec``: exactly the tensors slice mode
        computes with (copies; ``copy=False``: views of the parameters wherever the active part
        is a contiguous prefix, copies only where it is not). Skipped layers are left out; names
        are the parent's."""
        spec.validate(self.model_config, self.elastic_config)
        h, out = spec.hidden, {}
        hidden_only = ActiveWidth("slice", h)
        if self.pre_process:
            out["embedding.word_embeddings.weight"] = self.embedding.word_embeddings.weight[:, :h]
        if self.post_process:
            out["output_layer.weight"] = self.output_layer.weight[:, :h]
            out["decoder.final_norm.weight"] = self.decoder.final_norm.sliced(hidden_only)["weight"]
        for layer, j in zip(self.decoder.layers, self._global_layer_ids(), strict=True):
            choice = spec.layers[j]
            if not choice.active:
                continue
            name = _WIDTH_MODULE[choice.kind]
            module = getattr(layer, name)
            for key, t in module.sliced(self._layer_active(spec, j, "slice", None)).items():
                out[f"decoder.layers.{j}.{name}.{key}"] = t
            for child, norm in layer.named_children():
                if isinstance(norm, ElasticRMSNorm):
                    out[f"decoder.layers.{j}.{child}.weight"] = norm.sliced(hidden_only)["weight"]
        return {k: v.detach().clone() if copy else v.detach() for k, v in out.items()}

    def _clear(self) -> None:
        self.subnet, self._hidden_weight = None, None
        for module in self.modules():
            if hasattr(module, "active"):
                module.active = None
        self.decoder.run_layers = self.decoder.gates = self.decoder.active_hidden = None

    def forward(
        self,
        input_ids,
        position_ids,
        attention_mask,
        decoder_input=None,
        labels=None,
        inference_context=None,
        runtime_gather_output=None,
        **kwargs,
    ):
        if self.subnet is None:
            return super().forward(
                input_ids,
                position_ids,
                attention_mask,
                decoder_input,
                labels,
                inference_context,
                runtime_gather_output,
                **kwargs,
            )
        h, mode = self.subnet.hidden, self._mode
        if decoder_input is None and self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
            if mode == "slice":
                decoder_input = apply_unit_weight(decoder_input[..., :h], self._hidden_weight)
            else:
                mask = hidden_mask(decoder_input.size(-1), h, decoder_input)
                weight = self._hidden_weight
                if weight is not None and weight.dim() > 0:
                    weight = F.pad(weight, (0, decoder_input.size(-1) - h))
                decoder_input = apply_unit_weight(decoder_input * mask, weight)
        hidden = self.decoder(hidden_states=decoder_input, attention_mask=attention_mask)
        if not self.post_process:
            return hidden
        if mode == "slice":  # (ColumnParallelLinear.forward insists on the full weight shape)
            tp = self.pg_collection.tp
            logits = column_parallel(hidden, self.output_layer.weight[:, :h], self.output_layer)
            gather = (
                self.output_layer.gather_output
                if runtime_gather_output is None
                else (runtime_gather_output)
            )
            if gather:
                logits = gather_from_tensor_model_parallel_region(logits, group=tp)
        else:
            logits, _ = self.output_layer(hidden, runtime_gather_output=runtime_gather_output)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)


def _sequence_parallel_weights(
    weights: SubnetWeights, config, pgs: ProcessGroupCollection
) -> SubnetWeights:
    """Under sequence parallelism the hidden weight and the depth gates multiply this TP rank's
    tokens only, so their gradients are partial over TP: all-reduce them in backward (what
    megatron does for norm weights), so the router's gradient is complete on every TP rank."""
    if not config.sequence_parallel:
        return weights

    def reduced(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else copy_to_tensor_model_parallel_region(t, group=pgs.tp)

    gates = None if weights.gates is None else tuple(reduced(g) for g in weights.gates)
    return SubnetWeights(hidden=reduced(weights.hidden), layers=weights.layers, gates=gates)


def elastic_stack_spec(model: ModelConfig) -> ModuleSpec:
    """The local hybrid spec with every module swapped for its elastic subclass."""
    return local_hybrid_stack_spec(
        mixer_params(model),
        mamba_mixer=ElasticMambaMixer,
        self_attention=ElasticSelfAttention,
        mlp=ElasticMLP,
        norm=ElasticRMSNorm,
        stack=ElasticHybridStack,
        moe=ElasticMoELayer,
    )


def build_elastic_model(
    model: ModelConfig,
    elastic: ElasticConfig,
    pgs: ProcessGroupCollection,
    parallel: ParallelConfig | None = None,
    *,
    params_dtype: torch.dtype = torch.float32,
    recompute: Recompute | bool = False,
) -> ElasticHybridModel:
    """This rank's part of the elastic parent. Its parameters (names, shapes, TP layout) are those
    of :func:`build_hybrid_model`, so a parent checkpoint loads unchanged."""
    parallel = parallel or ParallelConfig()
    elastic.validate_for(model, parallel)
    if Recompute.of(recompute).granularity == "selective":
        raise ValueError(
            "train.recompute_granularity=selective: the elastic attention computes a "
            "sub-network's core attention itself, out of reach of megatron's selective "
            "recomputation; use full (recompute_method=block to recompute fewer layers)"
        )
    net = build_hybrid_model(
        model,
        pgs,
        parallel,
        params_dtype=params_dtype,
        stack_spec=elastic_stack_spec(model),
        model_class=ElasticHybridModel,
        recompute=recompute,
    )
    net.model_config, net.elastic_config = model, elastic
    return net
