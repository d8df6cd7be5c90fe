"""The NemotronH-family hybrid parent on megatron-core: specs, Mamba-2 CPU scan, param counts."""

from megatron_elastic import platform

# Before megatron's Mamba mixer is imported: it checks mamba-ssm's importability at import time.
platform.apply()

# ruff: noqa: E402

from megatron_elastic.model.builder import build_hybrid_model, hybrid_stack_spec, transformer_config
from megatron_elastic.model.param_count import count_parameters, layer_parameter_counts

__all__ = [
    "build_hybrid_model",
    "count_parameters",
    "hybrid_stack_spec",
    "layer_parameter_counts",
    "transformer_config",
]
