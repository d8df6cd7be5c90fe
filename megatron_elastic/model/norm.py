"""RMSNorm with megatron-core's norm-builder signature, for the local (non-TE) specs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["RMSNorm", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim, accumulated in float32."""
    x32 = x.float()
    out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension (parameter name ``weight``, as megatron's).

    Accepts megatron-core's norm-builder keywords (``config``, ``hidden_size``, ``eps``) so it can
    sit in any ``*Submodules`` norm slot.
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Under sequence parallelism each TP rank normalises its own tokens, so the weight's
        # gradient is partial: megatron's finalize_model_grads all-reduces params marked so.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
