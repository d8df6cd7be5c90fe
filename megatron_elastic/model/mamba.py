"""megatron-core's Mamba-2 mixer with a pure-torch training path for tensors not on CUDA.

On CUDA the mixer is megatron's own (mamba-ssm's fused Triton kernels). On CPU, where those kernels
cannot run, the same computation (causal conv, SSD scan, gated group RMSNorm) is done in torch by
:func:`mamba_ssm_torch` with the stable chunked scan of :mod:`.ssd_scan`. Parameters, names and
shapes are megatron's, so checkpoints are the same on both paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.ssm.mamba_mixer import MambaMixer

from megatron_elastic.model.ssd_scan import ssd_chunked_scan

__all__ = ["TorchScanMambaMixer", "gated_group_rms_norm", "mamba_ssm_torch"]


def gated_group_rms_norm(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float
) -> torch.Tensor:
    """``rmsnorm(y * silu(z))`` normalised within each group of ``group_size`` channels (mamba-ssm's
    ``RMSNormGated`` with ``norm_before_gate=False``). ``y, z``: (..., d)."""
    gated = y.float() * F.silu(z.float())
    shape = gated.shape
    grouped = gated.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return (grouped.reshape(shape) * weight.float()).to(y.dtype)


def mamba_ssm_torch(
    zxbcdt: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
    norm_weight: torch.Tensor,
    *,
    head_dim: int,
    num_groups: int,
    state_dim: int,
    chunk_size: int,
    norm_group_size: int,
    norm_eps: float,
) -> torch.Tensor:
    """Everything between the mixer's ``in_proj`` and ``out_proj``.

    Args:
        zxbcdt: (b, l, 2*d_inner + 2*g*n + h), the in_proj output in [z, x, B, C, dt] order.
        conv_weight: (d_inner + 2*g*n, kernel); conv_bias: (d_inner + 2*g*n,).
        dt_bias, A_log, D: (h,).
        norm_weight: (d_inner,) weight of the gated group RMSNorm.
    Returns:
        (b, l, d_inner)
    """
    b, length, _ = zxbcdt.shape
    num_heads = dt_bias.numel()
    d_inner = num_heads * head_dim
    gn = num_groups * state_dim
    z, xbc, dt = torch.split(zxbcdt, [d_inner, d_inner + 2 * gn, num_heads], dim=-1)

    channels, kernel = conv_weight.shape
    xbc = F.conv1d(
        xbc.transpose(1, 2), conv_weight[:, None, :], conv_bias, padding=kernel - 1, groups=channels
    )[..., :length]
    xbc = F.silu(xbc).transpose(1, 2)
    x, B, C = torch.split(xbc, [d_inner, gn, gn], dim=-1)

    dt = F.softplus(dt.float() + dt_bias.float())
    A = -torch.exp(A_log.float())
    y = ssd_chunked_scan(
        x.reshape(b, length, num_heads, head_dim),
        dt,
        A,
        B.reshape(b, length, num_groups, state_dim),
        C.reshape(b, length, num_groups, state_dim),
        chunk_size,
        D=D.float(),
    ).reshape(b, length, d_inner)
    return gated_group_rms_norm(y.to(zxbcdt.dtype), z, norm_weight, norm_group_size, norm_eps)


class TorchScanMambaMixer(MambaMixer):
    """``MambaMixer`` whose training path runs in torch when its inputs are not CUDA tensors."""

    def _ssm_training(self, zxBCdt: torch.Tensor, packed_seq_params=None) -> torch.Tensor:
        if zxBCdt.is_cuda:
            return super()._ssm_training(zxBCdt, packed_seq_params)
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences need the CUDA Mamba kernels")
        if self.cp.cp_size != 1:
            raise NotImplementedError("context parallelism needs the CUDA Mamba kernels")
        y = mamba_ssm_torch(
            zxBCdt.transpose(0, 1),  # (l, b, d) -> (b, l, d)
            self.conv1d_weight.squeeze(1),
            self.conv1d_bias,
            self.dt_bias,
            self.A_log,
            self.D,
            self.norm.weight,
            head_dim=self.headdim,
            num_groups=self.ngroups_local_tp,
            state_dim=self.d_state,
            chunk_size=self.chunk_size,
            norm_group_size=self.d_inner_local_tp // self.ngroups_local_tp,
            norm_eps=self.norm.eps,
        )
        return y.transpose(0, 1).contiguous()
