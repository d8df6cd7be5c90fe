"""megatron-core's Mamba-2 mixer with a pure-torch training path for tensors not on CUDA.

On CUDA the mixer runs mamba-ssm's Triton kernels: megatron's fused
``mamba_split_conv1d_scan_combined`` when causal-conv1d is installed, otherwise the conv in torch
and ``mamba_chunk_scan_combined`` (:func:`cuda_conv_route`). On CPU, where those kernels cannot run,
the same computation (causal conv, SSD scan, gated group RMSNorm) is done in torch by
:func:`mamba_ssm_torch` with the stable chunked scan of :mod:`.ssd_scan`. Parameters, names and
shapes are megatron's, so checkpoints are the same on every path.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core.ssm.mamba_context_parallel import MambaContextParallel
from megatron.core.ssm.mamba_mixer import MambaMixer

from megatron_elastic.model.layouts import MambaLayout
from megatron_elastic.model.ssd_scan import ssd_chunked_scan

__all__ = [
    "ConvRoute",
    "SsmKernels",
    "TorchScanMambaMixer",
    "cuda_conv_route",
    "gated_group_rms_norm",
    "group_rms_norm",
    "mamba_ssm_cuda",
    "mamba_ssm_torch",
    "mixer_ssm",
]

ConvRoute = Literal["fused", "fallback"]
"""How the CUDA path does the causal conv (:func:`cuda_conv_route`)."""
FUSED_CONV_CHANNEL_MULTIPLE = 8
"""mamba-ssm's fused kernel needs the conv's channels (d_inner + 2*groups*state) a multiple of this
(its ``ensure_stride`` asserts it, for causal-conv1d's channels-last layout)."""
SsmKernels = Literal["auto", "triton", "torch"]
"""Which kernels run the mixer (:attr:`TorchScanMambaMixer.ssm_kernels`)."""


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


def _causal_conv_silu(xbc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv and silu, as megatron does it without causal-conv1d (its
    ``nn.Conv1d`` fallback): xbc (b, l, c), weight (c, kernel), bias (c,) -> (b, l, c)."""
    channels, kernel = weight.shape
    out = F.conv1d(
        xbc.transpose(1, 2), weight[:, None, :], bias, padding=kernel - 1, groups=channels
    )
    return F.silu(out[..., : xbc.size(1)]).transpose(1, 2)


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
    layout = MambaLayout(dt_bias.numel(), head_dim, num_groups, state_dim)
    num_heads, d_inner = layout.num_heads, layout.inner
    z, xbc, dt = layout.split_in_proj(zxbcdt)
    x, B, C = layout.split_conv(_causal_conv_silu(xbc, conv_weight, conv_bias))

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


def cuda_conv_route() -> tuple[ConvRoute, str]:
    """Which route the CUDA path takes for the causal conv, and why (said once per run).

    ``"fused"``: mamba-ssm's ``mamba_split_conv1d_scan_combined`` (conv, scan and gate in one
    autograd function; megatron's training kernel), which calls causal-conv1d's compiled
    ``causal_conv1d_fwd/bwd_function``. ``"fallback"`` where those are missing: the conv in torch
    (:func:`_causal_conv_silu`), then mamba-ssm's ``mamba_chunk_scan_combined``, which needs no
    compiled extension. Read from where mamba-ssm itself looks them up.
    """
    from mamba_ssm.ops.triton import ssd_combined

    if None not in (
        ssd_combined.causal_conv1d_fwd_function,
        ssd_combined.causal_conv1d_bwd_function,
    ):
        return "fused", (
            "causal-conv1d is installed: mamba-ssm's mamba_split_conv1d_scan_combined (the "
            "fallback for convs whose channel count is not a multiple of 8)"
        )
    return "fallback", (
        "causal-conv1d is not installed: a depthwise F.conv1d, then mamba-ssm's "
        "mamba_chunk_scan_combined (same results; install causal-conv1d for the fused kernel)"
    )


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
    route: ConvRoute | None = None,
) -> torch.Tensor:
    """:func:`_gated_ssm_torch` on mamba-ssm's Triton kernels, by ``route`` (default: what
    :func:`cuda_conv_route` finds; ``"fused"`` becomes ``"fallback"`` for a conv whose channel
    count is not a multiple of 8, which the fused kernel refuses). Both return the silu(z)-gated,
    un-normed y, D included."""
    from mamba_ssm.ops.triton.ssd_combined import (
        mamba_chunk_scan_combined,
        mamba_split_conv1d_scan_combined,
    )

    route = route or cuda_conv_route()[0]
    if route == "fused" and conv_weight.size(0) % FUSED_CONV_CHANNEL_MULTIPLE:
        route = "fallback"  # mamba-ssm asserts it (ensure_stride): e.g. a head_dim-10 sub-network
    A = -torch.exp(A_log.float())
    if route == "fused":  # megatron's _ssm_training call (mamba-ssm 2.3.2)
        return mamba_split_conv1d_scan_combined(
            zxbcdt,
            conv_weight,
            conv_bias,
            dt_bias.float(),
            A,
            D=D,
            chunk_size=chunk_size,
            activation="silu",
            headdim=head_dim,
            ngroups=num_groups,
            norm_before_gate=False,
        )
    if route != "fallback":
        raise ValueError(f"route must be 'fused' or 'fallback', not {route!r}")
    b, length, _ = zxbcdt.shape
    layout = MambaLayout(dt_bias.numel(), head_dim, num_groups, state_dim)
    num_heads, d_inner = layout.num_heads, layout.inner
    z, xbc, dt = layout.split_in_proj(zxbcdt)
    x, B, C = layout.split_conv(_causal_conv_silu(xbc, conv_weight, conv_bias))
    y = mamba_chunk_scan_combined(  # dt_bias and softplus inside, as in the fused kernel
        x.reshape(b, length, num_heads, head_dim),
        dt,
        A,
        B.reshape(b, length, num_groups, state_dim),
        C.reshape(b, length, num_groups, state_dim),
        chunk_size,
        D=D,
        z=z.reshape(b, length, num_heads, head_dim),
        dt_bias=dt_bias.float(),
        dt_softplus=True,
    )
    return y.reshape(b, length, d_inner)


def _use_triton(t: torch.Tensor, kernels: SsmKernels) -> bool:
    if kernels not in ("auto", "triton", "torch"):
        raise ValueError(f"ssm kernels must be 'auto', 'triton' or 'torch', not {kernels!r}")
    return t.is_cuda if kernels == "auto" else kernels == "triton"


def _norm(y, weight, group_size, eps, dtype, kernels: SsmKernels = "auto"):
    if _use_triton(y, kernels):
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
    zxbcdt: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
    norm_weight: torch.Tensor,
    *,
    route: ConvRoute | None = None,
    **sizes: int | float,
) -> torch.Tensor:
    """:func:`mamba_ssm_torch` on mamba-ssm's Triton kernels (CUDA tensors), same signature;
    ``route`` as in :func:`_gated_ssm_cuda`."""
    norm_group_size, norm_eps = sizes.pop("norm_group_size"), sizes.pop("norm_eps")
    y = _gated_ssm_cuda(zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, route=route, **sizes)
    return _norm(y, norm_weight, norm_group_size, norm_eps, zxbcdt.dtype, "triton")


def mixer_ssm(
    zxbcdt: torch.Tensor,
    cp: MambaContextParallel,
    norm_weight: torch.Tensor,
    *,
    head_dim: int,
    chunk_size: int,
    norm_group_size: int,
    norm_eps: float,
    kernels: SsmKernels = "auto",
) -> torch.Tensor:
    """The mixer between ``cp.pre_conv_ssm`` and ``out_proj``, on either device, as megatron's
    ``_ssm_training`` does it: conv, scan and gate on this CP rank's heads over the whole
    sequence, ``cp.post_conv_ssm`` back to this rank's tokens, then the group norm.

    Args:
        zxbcdt: (l, b, d) after ``cp.pre_conv_ssm``: this CP rank's heads, the whole sequence.
        cp: megatron's ``MambaContextParallel`` for the sizes that run (it slices conv, dt_bias,
            A_log and D to this CP rank; at CP=1 it passes everything through).
        kernels: ``"auto"`` (mamba-ssm's Triton kernels for CUDA tensors, torch otherwise),
            ``"triton"`` or ``"torch"`` whatever the device (see :class:`TorchScanMambaMixer`).
    Returns:
        (l / CP, b, d_inner) in ``zxbcdt``'s dtype.
    """
    gated_ssm = _gated_ssm_cuda if _use_triton(zxbcdt, kernels) else _gated_ssm_torch
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
    return _norm(y, norm_weight, norm_group_size, norm_eps, zxbcdt.dtype, kernels)


class TorchScanMambaMixer(MambaMixer):
    """``MambaMixer`` whose training path is :func:`mixer_ssm` on every device.

    On CUDA that is megatron's own kernel call when causal-conv1d is installed (the same
    ``mamba_split_conv1d_scan_combined`` arguments as ``MambaMixer._ssm_training``, then the same
    ``rmsnorm_fn``), and the no-extension fallback of :func:`cuda_conv_route` when it is not, where
    megatron's ``_ssm_training`` would fail. Parent and elastic sub-networks thus share one path.
    Packed sequences (``seq_idx``) stay megatron's: they need causal-conv1d anyway.
    """

    ssm_kernels: SsmKernels = "auto"
    """``"auto"``: mamba-ssm's Triton kernels for CUDA tensors, the torch scan otherwise.
    ``"triton"`` forces the CUDA path on any tensors: CPU tensors then need Triton's interpreter
    (``TRITON_INTERPRET=1``; how the tests run the CUDA path without a GPU). ``"torch"`` forces the
    torch scan. Set it on an instance (elastic sub-networks read their mixer's)."""

    def _ssm_training(self, zxBCdt: torch.Tensor, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None:
            if zxBCdt.is_cuda:
                return super()._ssm_training(zxBCdt, packed_seq_params)
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
            kernels=self.ssm_kernels,
        )
