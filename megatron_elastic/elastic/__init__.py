"""Elastic (nested) sub-networks of the hybrid parent: configs, specs, layers and budgets."""

from megatron_elastic import platform

platform.apply()  # before megatron's Mamba mixer is imported

# ruff: noqa: E402
from megatron_elastic.elastic.axes import Axis, LayerKind, register
from megatron_elastic.elastic.config import ElasticConfig, load_elastic_recipe
from megatron_elastic.elastic.model import (
    ElasticHybridModel,
    SubnetWeights,
    build_elastic_model,
)
from megatron_elastic.elastic.subnet import LayerChoice, SubnetSpec

__all__ = [
    "Axis",
    "ElasticConfig",
    "ElasticHybridModel",
    "LayerChoice",
    "LayerKind",
    "SubnetSpec",
    "SubnetWeights",
    "build_elastic_model",
    "load_elastic_recipe",
    "register",
]
