"""Config of a NemotronH-style hybrid whose layers have their own widths (a heterogeneous budget of
an elastic model). Self-contained Hugging Face remote code: it needs only ``transformers``.

The per-layer lists have one entry per layer of ``hybrid_override_pattern`` (``M`` Mamba-2,
``*`` attention, ``-`` MLP); entries of layers of another kind are 0.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

__all__ = ["ElasticNemotronHConfig"]

_KINDS = {"M": "Mamba", "*": "attention", "-": "MLP"}


class ElasticNemotronHConfig(PretrainedConfig):
    model_type = "elastic_nemotron_h"

    def __init__(
        self,
        vocab_size: int = 131072,
        hidden_size: int = 4096,
        hybrid_override_pattern: str = "M-M*-",
        num_attention_heads_per_layer: list[int] | None = None,
        num_key_value_heads: int = 8,
        head_dim: int = 128,
        mamba_num_heads_per_layer: list[int] | None = None,
        mamba_head_dim_per_layer: list[int] | None = None,
        intermediate_size_per_layer: list[int] | None = None,
        n_groups: int = 8,
        ssm_state_size: int = 128,
        conv_kernel: int = 4,
        chunk_size: int = 128,
        layer_norm_epsilon: float = 1e-5,
        mamba_norm_epsilon: float = 1e-5,
        mlp_hidden_act: str = "relu2",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        use_cache: bool = False,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        n = len(hybrid_override_pattern)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.hybrid_override_pattern = hybrid_override_pattern
        self.num_hidden_layers = n
        self.num_attention_heads_per_layer = list(num_attention_heads_per_layer or [0] * n)
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.mamba_num_heads_per_layer = list(mamba_num_heads_per_layer or [0] * n)
        self.mamba_head_dim_per_layer = list(mamba_head_dim_per_layer or [0] * n)
        self.intermediate_size_per_layer = list(intermediate_size_per_layer or [0] * n)
        self.n_groups = n_groups
        self.ssm_state_size = ssm_state_size
        self.conv_kernel = conv_kernel
        self.chunk_size = chunk_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.mamba_norm_epsilon = mamba_norm_epsilon
        self.mlp_hidden_act = mlp_hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self._check()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _check(self) -> None:
        bad = sorted(set(self.hybrid_override_pattern) - set(_KINDS))
        if bad:
            raise ValueError(
                f"hybrid_override_pattern has unsupported layer symbols {bad}; this model has "
                "only 'M' (Mamba-2), '*' (attention) and '-' (MLP) layers"
            )
        n = self.num_hidden_layers
        lists = {
            "num_attention_heads_per_layer": ("*", self.num_attention_heads_per_layer),
            "mamba_num_heads_per_layer": ("M", self.mamba_num_heads_per_layer),
            "mamba_head_dim_per_layer": ("M", self.mamba_head_dim_per_layer),
            "intermediate_size_per_layer": ("-", self.intermediate_size_per_layer),
        }
        for name, (symbol, values) in lists.items():
            if len(values) != n:
                raise ValueError(f"{name} needs one entry per layer ({n}), got {len(values)}")
            for i, (s, v) in enumerate(zip(self.hybrid_override_pattern, values, strict=True)):
                if s == symbol and v <= 0:
                    raise ValueError(f"{name}[{i}] must be > 0 for the {_KINDS[s]} layer {i}")
        for i, heads in enumerate(self.num_attention_heads_per_layer):
            if heads % self.num_key_value_heads:
                raise ValueError(
                    f"layer {i}: {heads} attention heads is not a multiple of "
                    f"num_key_value_heads={self.num_key_value_heads}"
                )
        for i, heads in enumerate(self.mamba_num_heads_per_layer):
            if heads % self.n_groups:
                raise ValueError(
                    f"layer {i}: {heads} Mamba heads is not a multiple of n_groups={self.n_groups}"
                )
