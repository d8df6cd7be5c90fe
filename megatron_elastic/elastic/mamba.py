"""Elastic Mamba-2 mixer: heads trimmed within each group, channels within each head.

z, x and dt follow the active heads/channels; B and C (per group) are kept; the conv follows x;
the gated group RMSNorm normalises over each group's *active* channels. ``slice`` runs the mixer
on the cut weights (mamba-ssm kernels on CUDA, the torch scan on CPU); ``mask`` runs it in full
and zeroes inactive heads/channels after the conv (masking before it would let the conv bias leak).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_elastic.elastic.layers import (
    ActiveWidth,
    apply_unit_weight,
    column_parallel,
    hidden_mask,
    row_parallel,
    unit_mask,
)
from megatron_elastic.elastic.subnet import MambaIndices, take
from megatron_elastic.model.mamba import TorchScanMambaMixer, mamba_ssm_torch
from megatron_elastic.model.ssd_scan import ssd_chunked_scan

__all__ = ["ElasticMambaMixer"]


class ElasticMambaMixer(TorchScanMambaMixer):
    active: ActiveWidth | None = None

    def forward(self, hidden_states, inference_context=None, **kwargs):
        st = self.active
        if st is None:
            return super().forward(hidden_states, inference_context, **kwargs)
        if inference_context is not None:
            raise NotImplementedError("elastic sub-networks run without an inference cache")
        out = (
            self._slice(hidden_states, st) if st.mode == "slice" else self._mask(hidden_states, st)
        )
        return out, None

    def sliced(self, st: ActiveWidth) -> dict[str, torch.Tensor]:
        """This module's parameters cut to ``st`` (the slice-mode weights; also the export)."""
        idx: MambaIndices = st.indices
        return {
            "in_proj.weight": take(self.in_proj.weight, 0, idx.in_proj_rows)[:, : st.hidden],
            "conv1d_weight": take(self.conv1d_weight, 0, idx.conv_channels),
            "conv1d_bias": take(self.conv1d_bias, 0, idx.conv_channels),
            "dt_bias": take(self.dt_bias, 0, idx.heads),
            "A_log": take(self.A_log, 0, idx.heads),
            "D": take(self.D, 0, idx.heads),
            "norm.weight": take(self.norm.weight, 0, idx.inner),
            "out_proj.weight": take(self.out_proj.weight, 1, idx.inner)[: st.hidden],
        }

    def _slice(self, hidden: torch.Tensor, st: ActiveWidth) -> torch.Tensor:
        idx: MambaIndices = st.indices
        tp = self.in_proj.tp_group
        w = self.sliced(st)
        zxbcdt = column_parallel(hidden, w["in_proj.weight"], tp).transpose(0, 1)  # (b, l, d)
        conv_w, conv_b = w["conv1d_weight"].squeeze(1), w["conv1d_bias"]
        dt_bias, A_log, D, norm_w = w["dt_bias"], w["A_log"], w["D"], w["norm.weight"]
        group_size = idx.heads_per_group * idx.head_dim
        ssm = _mamba_cuda if zxbcdt.is_cuda else mamba_ssm_torch
        y = ssm(
            zxbcdt,
            conv_w,
            conv_b,
            dt_bias,
            A_log,
            D,
            norm_w,
            head_dim=idx.head_dim,
            num_groups=self.ngroups_local_tp,
            state_dim=self.d_state,
            chunk_size=self.chunk_size,
            norm_group_size=group_size,
            norm_eps=self.norm.eps,
        )
        y = apply_unit_weight(y.transpose(0, 1), st.weight)
        return row_parallel(y, w["out_proj.weight"], tp)

    def _mask(self, hidden: torch.Tensor, st: ActiveWidth) -> torch.Tensor:
        idx: MambaIndices = st.indices
        tp = self.in_proj.tp_group
        zxbcdt = column_parallel(hidden, self.in_proj.weight, tp).transpose(0, 1)
        b, length, _ = zxbcdt.shape
        inner, heads = self.d_inner_local_tp, self.nheads_local_tp
        groups, n, p = self.ngroups_local_tp, self.d_state, self.headdim
        z, xbc, dt = torch.split(zxbcdt, [inner, inner + 2 * groups * n, heads], dim=-1)
        w = self.conv1d_weight
        xbc = F.conv1d(
            xbc.transpose(1, 2), w, self.conv1d_bias, padding=w.size(-1) - 1, groups=w.size(0)
        )[..., :length]
        x, B, C = torch.split(F.silu(xbc).transpose(1, 2), [inner, groups * n, groups * n], -1)
        inner_mask = unit_mask(inner, idx.inner, x)
        x, z = x * inner_mask, z * inner_mask
        dt = F.softplus(dt.float() + self.dt_bias.float()) * unit_mask(heads, idx.heads, x).float()
        y = ssd_chunked_scan(
            x.reshape(b, length, heads, p),
            dt,
            -torch.exp(self.A_log.float()),
            B.reshape(b, length, groups, n),
            C.reshape(b, length, groups, n),
            self.chunk_size,
            D=self.D.float(),
        ).reshape(b, length, inner)
        gated = (y.float() * F.silu(z.float())).reshape(b, length, groups, inner // groups)
        active_per_group = idx.heads_per_group * idx.head_dim
        ms = gated.pow(2).sum(-1, keepdim=True) / active_per_group
        y = (gated * torch.rsqrt(ms + self.norm.eps)).reshape(b, length, inner)
        y = (y * self.norm.weight.float()).to(hidden.dtype).transpose(0, 1)
        y = y * unit_mask(inner, idx.inner, y, st.weight)
        out = row_parallel(y, self.out_proj.weight, tp)
        return out * hidden_mask(out.size(-1), st.hidden, out)


def _mamba_cuda(
    zxbcdt,
    conv_weight,
    conv_bias,
    dt_bias,
    A_log,
    D,
    norm_weight,
    *,
    head_dim,
    num_groups,
    state_dim,
    chunk_size,
    norm_group_size,
    norm_eps,
):
    (
        """The sliced mixer on mamba-ssm's fused Triton kernels (as megatron's training path); the
    signature of :func:`mamba_ssm_torch`."""
        ""
    )
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined

    del state_dim  # implied by the shapes for the kernel
    y = mamba_split_conv1d_scan_combined(
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
    return rmsnorm_fn(
        y, norm_weight, None, eps=norm_eps, group_size=norm_group_size, norm_before_gate=False
    )
