"""Elastic Mamba-2 mixer: heads trimmed within each group, channels within each head.

z, x and dt follow the active heads/channels; B and C (per group) are kept; the conv follows x;
the gated group RMSNorm normalises over each group's *active* channels. ``slice`` runs the mixer
on the cut weights (mamba-ssm kernels on CUDA, the torch scan on CPU); ``mask`` runs it in full
and zeroes inactive heads/channels after the conv (masking before it would let the conv bias leak),
always in torch (the chunked scan of :mod:`..model.ssd_scan`, also on CUDA tensors).
Context parallelism follows megatron's ``MambaContextParallel``: an all-to-all from this rank's
tokens to this rank's heads over the whole sequence before the conv, and back after the scan.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.ssm.mamba_context_parallel import MambaContextParallel

from megatron_elastic.elastic.layers import (
    ActiveWidth,
    apply_unit_weight,
    column_parallel,
    hidden_mask,
    row_parallel,
    unit_mask,
)
from megatron_elastic.elastic.subnet import MambaIndices, take
from megatron_elastic.model.layouts import MambaLayout
from megatron_elastic.model.mamba import TorchScanMambaMixer, mixer_ssm
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

    def _context_parallel(self, w: dict[str, torch.Tensor], idx: MambaIndices):
        """megatron's ``MambaContextParallel`` for the sliced mixer: its sizes are the active
        heads/channels of this TP rank, its parameters the sliced ones (it cuts them per CP rank
        in the forward pass, so gradients reach the full parameters)."""
        heads = idx.heads_per_group * self.ngroups_local_tp
        return MambaContextParallel(
            cp_group=self.cp.cp_group,
            d_inner_local_tp=heads * idx.head_dim,
            nheads_local_tp=heads,
            ngroups_local_tp=self.ngroups_local_tp,
            d_state=self.d_state,
            conv1d_weight_cp1=w["conv1d_weight"],
            conv1d_bias_cp1=w["conv1d_bias"],
            conv1d_padding=self.d_conv - 1,
            dt_bias_cp1=w["dt_bias"],
            A_log_cp1=w["A_log"],
            D_cp1=w["D"],
            D_has_hdim=False,
        )

    def _slice(self, hidden: torch.Tensor, st: ActiveWidth) -> torch.Tensor:
        idx: MambaIndices = st.indices
        w = self.sliced(st)
        cp = self._context_parallel(w, idx)
        zxbcdt = cp.pre_conv_ssm(column_parallel(hidden, w["in_proj.weight"], self.in_proj))
        y = mixer_ssm(
            zxbcdt,
            cp,
            w["norm.weight"],
            head_dim=idx.head_dim,
            chunk_size=self.chunk_size,
            norm_group_size=idx.heads_per_group * idx.head_dim,
            norm_eps=self.norm.eps,
            kernels=self.ssm_kernels,
        )
        y = apply_unit_weight(y, st.weight)
        return row_parallel(y, w["out_proj.weight"], self.out_proj)

    def _mask(self, hidden: torch.Tensor, st: ActiveWidth) -> torch.Tensor:
        idx: MambaIndices = st.indices
        cp = self.cp  # the full mixer's: this CP rank's heads after pre_conv_ssm
        zxbcdt = cp.pre_conv_ssm(column_parallel(hidden, self.in_proj.weight, self.in_proj))
        zxbcdt = zxbcdt.transpose(0, 1)  # (b, l, d): the whole sequence
        b, length, _ = zxbcdt.shape
        layout = MambaLayout(
            cp.nheads_local_tpcp, self.headdim, cp.ngroups_local_tpcp, self.d_state
        )
        inner, heads = layout.inner, layout.num_heads
        groups, n, p = layout.num_groups, layout.state_dim, layout.head_dim
        z, xbc, dt = layout.split_in_proj(zxbcdt)
        w = cp.get_conv1d_weight()
        xbc = F.conv1d(
            xbc.transpose(1, 2), w, cp.get_conv1d_bias(), padding=w.size(-1) - 1, groups=w.size(0)
        )[..., :length]
        x, B, C = layout.split_conv(F.silu(xbc).transpose(1, 2))
        inner_mask = _cp_share(unit_mask(self.d_inner_local_tp, idx.inner, x), cp)
        x, z = x * inner_mask, z * inner_mask
        head_mask = _cp_share(unit_mask(self.nheads_local_tp, idx.heads, x), cp)
        dt = F.softplus(dt.float() + cp.get_dt_bias().float()) * head_mask.float()
        y = ssd_chunked_scan(
            x.reshape(b, length, heads, p),
            dt,
            -torch.exp(cp.get_A_log().float()),
            B.reshape(b, length, groups, n),
            C.reshape(b, length, groups, n),
            self.chunk_size,
            D=cp.get_D().float(),
        ).reshape(b, length, inner)
        gated = y.float() * F.silu(z.float())
        gated = cp.post_conv_ssm(gated.transpose(0, 1).contiguous())  # (l/CP, b, d_inner_local_tp)
        groups, inner = self.ngroups_local_tp, self.d_inner_local_tp
        gated = gated.reshape(*gated.shape[:2], groups, inner // groups)
        active_per_group = idx.heads_per_group * idx.head_dim
        ms = gated.pow(2).sum(-1, keepdim=True) / active_per_group
        y = (gated * torch.rsqrt(ms + self.norm.eps)).reshape(*gated.shape[:2], inner)
        y = (y * self.norm.weight.float()).to(hidden.dtype)
        y = y * unit_mask(inner, idx.inner, y, st.weight)
        out = row_parallel(y, self.out_proj.weight, self.out_proj)
        return out * hidden_mask(out.size(-1), st.hidden, out)


def _cp_share(mask: torch.Tensor, cp) -> torch.Tensor:
    """This CP rank's contiguous share of a per-channel (or per-head) mask of the TP rank."""
    return mask if cp.cp_size == 1 else mask.chunk(cp.cp_size)[cp.cp_rank]
