"""megatron-core's Mamba-2 mixer with a pure-torch training path for tensors not on CUDA.

On CUDA the mixer is megatron's own (mamba-ssm's fused Triton kernels). On CPU, where those kernels
cannot run, the same computation (causal conv, SSD scan, gated group RMSNorm) is done in torch by
:func:`mamba_ssm_torch` with the stable chunked scan of :mod:`.ssd_scan`. Parameters, names and
shapes are megatron's, so checkpoints are the same on both paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.ssm.mamba_context_parallel import MambaContextParallel
from megatron.core.ssm.mamba_mixer import MambaMixer

from megatron_elastic.model.ssd_scan import ssd_chunked_scan

__all__ = [
    "TorchScanMambaMixer",
    "gated_group_rms_norm",
    "group_rms_norm",
    "mamba_ssm_cuda",
    "mamba_ssm_torch",
    "mixer_ssm",
]


def group_rms_norm(
    gated: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """RMSNorm of the already gated ``gated`` (..., d) within each group of ``group_size``
    channels, times ``weight``, cast to ``dtype`` (the second half of mamba-ssm's
    ``RMSNormGated``; megatron applies it after the context-parallel all-to-all)."""
    shape = gated.shape
    grouped = gated.float().reshape(*shape[:-1], shape[-1] // group_size, group_size)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return (grouped.reshape(shape) * weight.float()).to(dtype)


def gated_group_rms_norm(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float
) -> torch.Tensor:
    """``rmsnorm(y * silu(z))`` normalised within each group of ``group_size`` channels (mamba-ssm's
    ``RMSNormGated`` with ``norm_before_gate=False``). ``y, z``: (..., d)."""
    return group_rms_norm(y.float() * F.silu(z.float()), weight, group_size, eps, y.dtype)


def _gated_ssm_torch(
    zxbcdt: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
    *,
    head_dim: int,
    num_groups: int,
    state_dim: int,
    chunk_size: int,
) -> torch.Tensor:
    """Causal conv, SSD scan and the ``silu(z)`` gate: (b, l, in_proj) -> (b, l, d_inner) float32
    (what mamba-ssm's ``mamba_split_conv1d_scan_combined`` returns without a norm weight)."""
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
    return y.to(zxbcdt.dtype).float() * F.silu(z.float())


def _gated_ssm_cuda(
    zxbcdt: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
    *,
    head_dim: int,
    num_groups: int,
    state_dim: int,
    chunk_size: int,
) -> torch.Tensor:
    """:func:`_gated_ssm_torch` on mamba-ssm's fused Triton kernel (megatron's training path)."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined

    del state_dim  # implied by the shapes for the kernel
    return mamba_split_conv1d_scan_combined(
        zxbcdt,
        conv_weight,
        conv_bias,
        dt_bias.float(),
        -torch.exp(A_log.float()),
        D=D,
        chunk_size=chunk_size,
        activation="silu",
        headdim=head_dim,
        ngroups=num_groups,
        norm_before_gate=False,
    )


def _norm(y, weight, group_size, eps, dtype):
    if y.is_cuda:
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

        return rmsnorm_fn(y, weight, None, eps=eps, group_size=group_size, norm_before_gate=False)
    return group_rms_norm(y, weight, group_size, eps, dtype)


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
    """Everything between the mixer's ``in_proj`` and ``out_proj``, in torch (one CP rank).

    Args:
        zxbcdt: (b, l, 2*d_inner + 2*g*n + h), the in_proj output in [z, x, B, C, dt] order.
        conv_weight: (d_inner + 2*g*n, kernel); conv_bias: (d_inner + 2*g*n,).
        dt_bias, A_log, D: (h,).
        norm_weight: (d_inner,) weight of the gated group RMSNorm.
    Returns:
        (b, l, d_inner)
    """
    gated = _gated_ssm_torch(
        zxbcdt,
        conv_weight,
        conv_bias,
        dt_bias,
        A_log,
        D,
        head_dim=head_dim,
        num_groups=num_groups,
        state_dim=state_dim,
        chunk_size=chunk_size,
    )
    return group_rms_norm(gated, norm_weight, norm_group_size, norm_eps, zxbcdt.dtype)


def mamba_ssm_cuda(
    zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, **sizes
) -> torch.Tensor:
    """:func:`mamba_ssm_torch` on mamba-ssm's Triton kernels (CUDA tensors), same signature."""
    norm_group_size, norm_eps = sizes.pop("norm_group_size"), sizes.pop("norm_eps")
    y = _gated_ssm_cuda(zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, **sizes)
    return _norm(y, norm_weight, norm_group_size, norm_eps, zxbcdt.dtype)


def mixer_ssm(
    zxbcdt: torch.Tensor,
    cp: MambaContextParallel,
    norm_weight: torch.Tensor,
    *,
    head_dim: int,
    chunk_size: int,
    norm_group_size: int,
    norm_eps: float,
) -> torch.Tensor:
    """The mixer between ``cp.pre_conv_ssm`` and ``out_proj``, on either device, as megatron's
    ``_ssm_training`` does it: conv, scan and gate on this CP rank's heads over the whole
    sequence, ``cp.post_conv_ssm`` back to this rank's tokens, then the group norm.

    Args:
        zxbcdt: (l, b, d) after ``cp.pre_conv_ssm``: this CP rank's heads, the whole sequence.
        cp: megatron's ``MambaContextParallel`` for the sizes that run (it slices conv, dt_bias,
            A_log and D to this CP rank; at CP=1 it passes everything through).
    Returns:
        (l / CP, b, d_inner) in ``zxbcdt``'s dtype.
    """
    gated_ssm = _gated_ssm_cuda if zxbcdt.is_cuda else _gated_ssm_torch
    y = gated_ssm(
        zxbcdt.transpose(0, 1).contiguous(),  # (l, b, d) -> (b, l, d)
        cp.get_conv1d_weight().squeeze(1),
        cp.get_conv1d_bias(),
        cp.get_dt_bias(),
        cp.get_A_log(),
        cp.get_D(),
        head_dim=head_dim,
        num_groups=cp.ngroups_local_tpcp,
        state_dim=cp.d_state,
        chunk_size=chunk_size,
    )
    y = cp.post_conv_ssm(y.transpose(0, 1).contiguous())
    return _norm(y, norm_weight, norm_group_size, norm_eps, zxbcdt.dtype)


class TorchScanMambaMixer(MambaMixer):
    """``MambaMixer`` whose training path runs in torch when its inputs are not CUDA tensors."""

    def _ssm_training(self, zxBCdt: torch.Tensor, packed_seq_params=None) -> torch.Tensor:
        if zxBCdt.is_cuda:
            return super()._ssm_training(zxBCdt, packed_seq_params)
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences need the CUDA Mamba kernels")
        # megatron's forward has already run self.cp.pre_conv_ssm (a no-op at CP=1).
        return mixer_ssm(
            zxBCdt,
            self.cp,
            self.norm.weight,
            head_dim=self.headdim,
            chunk_size=self.chunk_size,
            norm_group_size=self.d_inner_local_tp // self.ngroups_local_tp,
            norm_eps=self.norm.eps,
        )
