"""Serving every budget from one checkpoint: cached generation (KV cache + Mamba conv/SSM state
sized to the active sub-network) and self-speculative decoding (a smaller budget of the same
weights drafts, a larger one verifies)."""

from megatron_elastic.serving.forward import forward
from megatron_elastic.serving.generate import (
    SamplingConfig,
    ServingSession,
    cached_generate,
    check_lengths,
    pick,
)
from megatron_elastic.serving.net import ServingLayer, ServingNet, build_serving_net
from megatron_elastic.serving.state import InferenceState

__all__ = [
    "InferenceState",
    "SamplingConfig",
    "ServingLayer",
    "ServingNet",
    "ServingSession",
    "build_serving_net",
    "cached_generate",
    "check_lengths",
    "forward",
    "pick",
]
