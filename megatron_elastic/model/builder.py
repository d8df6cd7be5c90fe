"""Build the NemotronH-family parent as a megatron-core ``HybridModel``."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from megatron.core.activations import squared_relu
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_elastic import platform
from megatron_elastic.config import ModelConfig, ParallelConfig, check_parallel_fit
from megatron_elastic.model.specs import (
    HeterogeneousHybridStack,
    local_hybrid_stack_spec,
    te_hybrid_stack_spec,
)

__all__ = [
    "RECOMPUTE_GRANULARITIES",
    "Recompute",
    "build_hybrid_model",
    "hybrid_stack_spec",
    "layer_overrides",
    "mixer_params",
    "moe_fields",
    "transformer_config",
    "use_te",
]


def use_te() -> bool:
    """Transformer-Engine specs need CUDA and an importable transformer_engine."""
    return platform.cuda_available() and importlib.util.find_spec("transformer_engine") is not None


RECOMPUTE_GRANULARITIES = (None, "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass(frozen=True)
class Recompute:
    """Activation recomputation as megatron's ``TransformerConfig.recompute_*`` fields
    (``train.recompute_granularity`` / ``_method`` / ``_num_layers`` in a recipe).

    ``full``: a layer keeps only its input and runs its forward again in backward. ``uniform``
    recomputes every layer (each on its own: our stacks checkpoint per layer, so a uniform
    chunk of more than one layer is refused); ``block`` only the first ``num_layers`` layers of
    each pipeline stage (the others keep their activations: less memory saved, less compute).
    ``selective``: megatron's core-attention recomputation (``recompute_modules=["core_attn"]``):
    the attention layers' softmax inputs are recomputed, nothing else (no Mamba or MLP layer;
    megatron has no selective recomputation for them)."""

    granularity: str | None = None
    """``None`` (store everything), ``full`` or ``selective``."""
    method: str | None = None
    """With ``full``: ``uniform`` (default) or ``block``."""
    num_layers: int | None = None
    """With ``full``: layers per uniform chunk (1, the default) or recomputed layers per stage
    (``block``)."""

    def __post_init__(self) -> None:
        if self.granularity not in RECOMPUTE_GRANULARITIES:
            raise ValueError(
                f"train.recompute_granularity={self.granularity!r}; choose full, selective or null"
            )
        if self.granularity != "full":
            if self.method is not None or self.num_layers is not None:
                raise ValueError(
                    "train.recompute_method / recompute_num_layers apply to "
                    f"recompute_granularity=full only (it is {self.granularity!r}); remove them"
                )
            return
        if self.method is None:
            object.__setattr__(self, "method", "uniform")
        if self.num_layers is None:
            object.__setattr__(self, "num_layers", 1)
        if self.method not in RECOMPUTE_METHODS:
            raise ValueError(
                f"train.recompute_method={self.method!r}; choose one of {RECOMPUTE_METHODS}"
            )
        n = self.num_layers
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"train.recompute_num_layers must be a positive integer, got {n!r}")
        if self.method == "uniform" and n != 1:
            raise ValueError(
                f"train.recompute_num_layers={n} with recompute_method=uniform: our stacks "
                "recompute layer by layer (uniform chunks of 1); use 1, or recompute_method=block "
                "to recompute only the first N layers of each stage"
            )

    @classmethod
    def of(cls, value: Recompute | bool | None) -> Recompute:
        """``True``: every layer (full, uniform, 1); ``False``/``None``: none."""
        if isinstance(value, Recompute):
            return value
        return cls("full") if value else cls()

    def layers(self, stage_layers: int) -> int:
        """How many of a stage's ``stage_layers`` layers are recomputed in full."""
        if self.granularity != "full":
            return 0
        return stage_layers if self.method == "uniform" else min(self.num_layers, stage_layers)


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    recompute: Recompute | bool = False,
) -> TransformerConfig:
    """megatron-core's ``TransformerConfig`` for ``model`` split as ``parallel``; ``recompute``:
    activation recomputation in backward (``True``: every layer, see :class:`Recompute`)."""
    recompute = Recompute.of(recompute)
    check_parallel_fit(model, parallel)
    on_gpu = platform.cuda_available()
    if recompute.granularity == "selective" and not on_gpu:
        raise ValueError(
            "train.recompute_granularity=selective runs megatron's CUDA-RNG checkpoint "
            "(tensor_parallel.checkpoint), which needs CUDA; use full on CPU"
        )
    return TransformerConfig(
        **moe_fields(model),
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        mamba_num_heads=model.mamba_num_heads,
        mamba_head_dim=model.mamba_head_dim,
        mamba_num_groups=model.mamba_num_groups,
        mamba_state_dim=model.mamba_state_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.layernorm_epsilon,
        activation_func=squared_relu,
        gated_linear_unit=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel_active,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        # Fusions below need CUDA kernels (apex / TE / custom); the unfused paths are exact.
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        attention_backend=AttnBackend.auto if use_te() else AttnBackend.local,
        # train.deterministic on a GPU (training.determinism): megatron's deterministic choices
        # too (embedding backward by indexing; TE attention with deterministic kernels only).
        deterministic_mode=on_gpu and torch.are_deterministic_algorithms_enabled(),
        recompute_granularity=recompute.granularity,
        recompute_method=recompute.method,
        recompute_num_layers=recompute.num_layers,
    )


_MOE_FIELDS = (
    "num_moe_experts",
    "moe_ffn_hidden_size",
    "moe_router_topk",
    "moe_shared_expert_intermediate_size",
    "moe_router_score_function",
    "moe_router_pre_softmax",
    "moe_router_topk_scaling_factor",
    "moe_router_enable_expert_bias",
    "moe_router_bias_update_rate",
    "moe_router_num_groups",
    "moe_router_group_topk",
    "moe_router_load_balancing_type",
    "moe_aux_loss_coeff",
    "moe_z_loss_coeff",
)


def moe_fields(model: ModelConfig) -> dict[str, object]:
    """megatron's ``TransformerConfig`` MoE fields of ``model`` (none without ``E`` layers): the
    ``ModelConfig`` fields of the same names, an fp32 router (as Nemotron 3's), megatron's
    all-gather token dispatcher, and grouped-GEMM experts exactly when the TE spec is used."""
    if "E" not in model.hybrid_pattern:
        return {}
    fields: dict[str, object] = {name: getattr(model, name) for name in _MOE_FIELDS}
    return {
        **fields,
        "moe_router_dtype": "fp32",
        "moe_token_dispatcher_type": "allgather",
        "moe_grouped_gemm": use_te(),
    }


def mixer_params(model: ModelConfig) -> dict[str, int]:
    """Mamba mixer constructor arguments not carried by ``TransformerConfig``."""
    return {"d_conv": model.mamba_conv_kernel, "chunk_size": model.mamba_chunk_size}


_WIDTH_FIELD = {
    "attention": "num_attention_heads",
    "mamba": "mamba_num_heads",
    "mlp": "ffn_hidden_size",
}


def layer_overrides(
    model: ModelConfig, parallel: ParallelConfig | None = None
) -> list[dict[str, int]]:
    """Per layer, the ``TransformerConfig`` fields that differ from the global sizes in a
    heterogeneous ``model`` (its ``layer_widths`` / ``layer_mamba_head_dims``)."""
    tp = (parallel or ParallelConfig()).tensor_parallel_size
    out = []
    for i, (kind, (width, head_dim)) in enumerate(
        zip(model.layer_kinds(), model.layer_sizes(), strict=True)
    ):
        if width % tp:
            raise ValueError(
                f"ModelConfig.layer_widths[{i}]={width} is not divisible by "
                f"tensor_parallel_size={tp}"
            )
        fields = {_WIDTH_FIELD[kind]: width}
        if kind == "mamba":
            fields["mamba_head_dim"] = head_dim
        out.append(fields)
    return out


def hybrid_stack_spec(model: ModelConfig, parallel: ParallelConfig | None = None) -> ModuleSpec:
    """TE spec on GPU with transformer_engine, local spec otherwise. A heterogeneous ``model``
    always gets the local spec with a :class:`HeterogeneousHybridStack` (per-layer sizes)."""
    params = mixer_params(model)
    if model.is_heterogeneous:
        spec = local_hybrid_stack_spec(params, stack=HeterogeneousHybridStack)
        spec.params["layer_overrides"] = layer_overrides(model, parallel)
        return spec
    if use_te():
        return te_hybrid_stack_spec(params)
    return local_hybrid_stack_spec(params)


def build_hybrid_model(
    model: ModelConfig,
    pgs: ProcessGroupCollection,
    parallel: ParallelConfig | None = None,
    *,
    params_dtype: torch.dtype = torch.float32,
    stack_spec: ModuleSpec | None = None,
    model_class: type[HybridModel] = HybridModel,
    recompute: Recompute | bool = False,
) -> HybridModel:
    """This rank's part of the parent model: its pipeline stage, its tensor-parallel shard.

    ``stack_spec`` overrides the layer spec (the elastic model passes its own); the default is
    :func:`hybrid_stack_spec`; ``model_class`` may be a ``HybridModel`` subclass. The model is
    placed on :func:`platform.default_device`. ``recompute``: activations recomputed in
    backward (memory for long contexts; ``True``: every layer, see :class:`Recompute`). A
    heterogeneous ``model`` (per-layer widths) is built by its own stack spec, so it takes no
    ``stack_spec``.
    """
    platform.apply()
    parallel = parallel or ParallelConfig()
    if model.is_heterogeneous and stack_spec is not None:
        raise ValueError(
            "a heterogeneous ModelConfig (layer_widths / layer_mamba_head_dims) is built by its "
            "own stack spec; pass no stack_spec (e.g. build an elastic model from a homogeneous "
            "parent)"
        )
    sizes = (pgs.tp.size(), pgs.pp.size(), pgs.cp.size())
    wanted = (
        parallel.tensor_parallel_size,
        parallel.pipeline_parallel_size,
        parallel.context_parallel_size,
    )
    if sizes != wanted:
        raise ValueError(
            f"process groups (tp, pp, cp)={sizes} do not match ParallelConfig (tp, pp, cp)={wanted}"
        )
    config = transformer_config(model, parallel, params_dtype=params_dtype, recompute=recompute)
    pp_rank, pp_size = pgs.pp.rank(), pgs.pp.size()
    hybrid = model_class(
        config=config,
        hybrid_stack_spec=stack_spec or hybrid_stack_spec(model, parallel),
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_sequence_length,
        hybrid_layer_pattern=parallel.pipelined_pattern(model.hybrid_pattern),
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp_size - 1,
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",
        pg_collection=pgs,
    )
    return hybrid.to(platform.default_device())
