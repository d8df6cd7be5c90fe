"""Module specs of the NemotronH hybrid stack for megatron-core's ``HybridModel``.

megatron-core 0.19 ships only Transformer-Engine specs for the hybrid model. The local spec here
uses megatron-core's own tensor-parallel linears and core attention, our RMSNorm and the
:class:`TorchScanMambaMixer`; it runs on CPU and GPU. Local parameter names map to the TE names in
distributed checkpoints (``sharded_state_dict_keys_map``, from the table of
:mod:`megatron_elastic.export.te_mapping`), as megatron's local GPT spec does.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.models.hybrid.hybrid_layer_allocation import Symbols
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)
from megatron.core.utils import make_viewless_tensor
from torch.utils.checkpoint import checkpoint

from megatron_elastic.export.te_mapping import FUSED_NORMS
from megatron_elastic.model.attention import CausalCoreAttention
from megatron_elastic.model.mamba import TorchScanMambaMixer
from megatron_elastic.model.norm import RMSNorm

__all__ = [
    "HeterogeneousHybridStack",
    "LocalNormHybridStack",
    "local_hybrid_stack_spec",
    "local_moe_layer_spec",
    "te_hybrid_stack_spec",
]


class LocalNormHybridStack(HybridStack):
    """``HybridStack`` whose final norm comes from the spec (megatron's hard-codes ``TENorm``)."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: HybridStackSubmodules,
        *,
        final_norm: Any,
        post_layer_norm: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(config, submodules, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = final_norm(
                config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
            )

    @property
    def recompute(self) -> bool:
        """Recompute layers' activations in backward (``recompute_granularity="full"``)."""
        return (
            self.config.recompute_granularity == "full"
            and self.training
            and (torch.is_grad_enabled())
        )

    def recomputes(self, index: int) -> bool:
        """Whether this stage's layer ``index`` is recomputed: every layer with megatron's
        ``uniform`` method (chunks of one layer), the first ``recompute_num_layers`` with
        ``block``."""
        if not self.recompute:
            return False
        return self.config.recompute_method != "block" or index < self.config.recompute_num_layers

    def layer_function(
        self, layer: torch.nn.Module, attention_mask, index: int
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """Layer ``index`` of this stage as a function of its input: what :meth:`run_layer` runs,
        and replays when it recomputes. A subclass whose layers hold per-forward state wraps it
        to restore that state for the replay."""

        def run(hidden):
            out = layer(hidden_states=hidden, attention_mask=attention_mask)
            return out[0] if isinstance(out, tuple) else out

        return run

    def run_layer(self, layer: torch.nn.Module, hidden_states, attention_mask, index: int):
        """Layer ``index`` of this stage, its activations recomputed in backward when
        :meth:`recomputes` (torch's non-reentrant checkpoint: it restores the CPU and CUDA RNG
        states, so it also works without CUDA, unlike megatron's ``checkpointed_forward``)."""
        run = self.layer_function(layer, attention_mask, index)
        if not self.recomputes(index):
            return run(hidden_states)
        return checkpoint(run, hidden_states, use_reentrant=False)

    def forward(self, hidden_states, attention_mask, *args: Any, **kwargs: Any):
        if not self.recompute:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        if not self.pre_process:
            hidden_states = self.input_tensor
        for index, layer in enumerate(self.layers):
            hidden_states = self.run_layer(layer, hidden_states, attention_mask, index)
        if self.post_process and self.post_layer_norm:
            hidden_states = self.final_norm(hidden_states)
        return make_viewless_tensor(
            hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True
        )


class HeterogeneousHybridStack(LocalNormHybridStack):
    """A stack whose layers have their own sizes: layer ``i`` (global index) is built from the
    stack's ``TransformerConfig`` with the fields ``layer_overrides[i]`` replaced (e.g.
    ``num_attention_heads``, ``ffn_hidden_size``, ``mamba_num_heads``, ``mamba_head_dim``). Same
    modules and parameter names as :class:`LocalNormHybridStack`; Mamba, attention, MLP layers."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: HybridStackSubmodules,
        *,
        layer_overrides: Sequence[dict[str, int]],
        final_norm: Any,
        pp_layer_offset: int = 0,
        pg_collection: Any = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        # The parent builds placeholders (IdentityOp for every kind); the real layers follow.
        super().__init__(
            config,
            HybridStackSubmodules(),
            final_norm=final_norm,
            pp_layer_offset=pp_layer_offset,
            pg_collection=pg_collection,
            name=name,
            **kwargs,
        )
        layer_kwargs = {
            Symbols.MAMBA: (submodules.mamba_layer, {"pp_layer_offset": pp_layer_offset}),
            Symbols.ATTENTION: (
                submodules.attention_layer,
                {
                    "is_mtp_layer": self.is_mtp_layer,
                    "add_layer_offset": False,
                    "pp_layer_offset": pp_layer_offset,
                },
            ),
            Symbols.MLP: (submodules.mlp_layer, {"add_layer_offset": False}),
        }
        layers = []
        for i, symbol in enumerate(self.layer_type_list):
            if symbol not in layer_kwargs:
                raise ValueError(f"HeterogeneousHybridStack has no layer of kind {symbol!r}")
            spec, extra = layer_kwargs[symbol]
            layers.append(
                build_module(
                    spec,
                    config=dataclasses.replace(config, **layer_overrides[pp_layer_offset + i]),
                    layer_number=pp_layer_offset + i + 1,
                    pg_collection=pg_collection,
                    name=None if name is None else f"{name}.layers.{i}",
                    **extra,
                )
            )
        self.layers = torch.nn.ModuleList(layers)


def local_hybrid_stack_spec(
    mixer_params: dict[str, Any],
    *,
    mamba_mixer: type = TorchScanMambaMixer,
    self_attention: type = SelfAttention,
    mlp: type = MLP,
    norm: Any = RMSNorm,
    stack: type = LocalNormHybridStack,
    moe: type | None = None,
) -> ModuleSpec:
    """The hybrid stack on megatron-core's local modules.

    ``mixer_params`` are constructor arguments of the Mamba mixer that megatron's
    ``TransformerConfig`` does not carry (``d_conv``, ``chunk_size``). The keyword arguments let
    a caller (e.g. the elastic model) swap in subclasses of the mixer, attention, MLP, norm,
    stack or ``MoELayer`` (``moe``) while keeping everything else, including parameter names.
    The core attention is
    :class:`CausalCoreAttention` at every CP size: torch's fused causal kernel, where megatron's
    local ``DotProductAttention`` materialises (b*heads, s, s) scores and refuses CP; it has no
    parameters, so checkpoints are the same as with megatron's.
    """
    return ModuleSpec(
        module=stack,
        params={"final_norm": norm},
        submodules=HybridStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    norm=norm,
                    mixer=ModuleSpec(
                        module=mamba_mixer,
                        params=dict(mixer_params),
                        submodules=MambaMixerSubmodules(
                            in_proj=ColumnParallelLinear, out_proj=RowParallelLinear
                        ),
                    ),
                    mamba_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map=dict(FUSED_NORMS["mamba"]),
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=norm,
                    self_attention=ModuleSpec(
                        module=self_attention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(
                            linear_qkv=ColumnParallelLinear,
                            core_attention=CausalCoreAttention,
                            linear_proj=RowParallelLinear,
                        ),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map=dict(FUSED_NORMS["attention"]),
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=norm,
                    mlp=partial(
                        mlp.as_mlp_submodule,
                        submodules=MLPSubmodules(
                            linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                        ),
                    ),
                    mlp_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map=dict(FUSED_NORMS["mlp"]),
                ),
            ),
            moe_layer=local_moe_layer_spec(norm, moe),
        ),
    )


def local_moe_layer_spec(norm: Any = RMSNorm, moe: type | None = None) -> ModuleSpec:
    """An ``E`` layer on megatron-core's local modules: our pre-norm, then megatron's
    ``MoELayer`` as its local backend builds it (``TopKRouter``, ``SequentialMLP`` experts of
    ``ColumnParallelLinear`` / ``RowParallelLinear``, ``SharedExpertMLP``), the residual added by
    ``MoETransformerLayer``. Runs on CPU and GPU. The pre-norm is not fused into a linear in TE's
    spec either (tokens are permuted between the norm and the experts), so the norm's name is the
    same in both. ``moe``: a subclass of ``MoELayer`` to build instead (the elastic one)."""
    # num_experts only asserts it is set; the layer reads TransformerConfig's.
    mlp = get_moe_module_spec(use_te=False, num_experts=1, moe_grouped_gemm=False)
    if moe is not None:
        mlp = partial(moe, *mlp.args, **mlp.keywords)  # megatron builds it as a partial
    return ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm, mlp=mlp, mlp_bda=get_bias_dropout_add
        ),
    )


def te_hybrid_stack_spec(mixer_params: dict[str, Any]) -> ModuleSpec:
    """megatron-core's own Transformer-Engine hybrid spec (GPU with transformer_engine only), with
    our mixer (identical to megatron's on CUDA tensors) and its constructor arguments. Its ``E``
    layer is megatron's: ``TENorm`` pre-norm and ``MoELayer`` with grouped-GEMM experts
    (``TEGroupedMLP``) and a TE shared expert (``TransformerConfig.moe_grouped_gemm`` is set to
    match by :func:`~megatron_elastic.model.builder.transformer_config`)."""
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

    spec = copy.deepcopy(hybrid_stack_spec)
    mixer = spec.submodules.mamba_layer.submodules.mixer
    mixer.module = TorchScanMambaMixer
    mixer.params = {**mixer.params, **mixer_params}
    return spec
