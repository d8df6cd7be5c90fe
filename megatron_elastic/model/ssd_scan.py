"""Mamba-2 state-space-duality (SSD) scan in pure torch.

The chunked scan is the CPU training path (mamba-ssm's Triton kernels need CUDA tensors). It is
numerically stable: decays are formed as ``exp(segment_sum)`` with ``-inf`` outside the causal
triangle, never as ``exp(cumsum)`` differences that overflow on long chunks. The sequential
recurrence is the exact reference it is tested against (in float64).

Shapes: ``b`` batch, ``l`` sequence, ``h`` heads, ``p`` head dim, ``g`` groups, ``n`` state size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["segment_sum", "ssd_chunked_scan", "ssd_sequential_scan"]


def segment_sum(x: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum(x[..., j+1 : i+1])`` for ``j <= i`` and ``-inf`` above the diagonal.

    Built by masking before the cumulative sum, so no large positive partial sums are formed.
    """
    length = x.size(-1)
    x = x[..., None].expand(*x.shape, length)  # (..., i, j) = x[..., i]
    strict_lower = torch.ones(length, length, dtype=torch.bool, device=x.device).tril(-1)
    x = x.masked_fill(~strict_lower, 0.0)
    out = torch.cumsum(x, dim=-2)
    lower = torch.ones(length, length, dtype=torch.bool, device=x.device).tril(0)
    return out.masked_fill(~lower, float("-inf"))


def _heads_view(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Expand per-group B or C (b, l, g, n) to per-head (b, l, h, n); a group's heads are
    contiguous."""
    groups = t.size(2)
    return t.repeat_interleave(num_heads // groups, dim=2)


def ssd_chunked_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunked SSD scan.

    Args:
        x: (b, l, h, p) inputs.
        dt: (b, l, h) step sizes, already through softplus (and bias).
        A: (h,) negative decay rates.
        B, C: (b, l, g, n) input and output projections per group.
        chunk_size: tokens per chunk; the sequence is zero-padded to a multiple of it.
        D: optional (h,) skip connection.
    Returns:
        y: (b, l, h, p), in x's dtype; accumulation is done in float32 (or float64 if given).
    """
    in_dtype = x.dtype
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, length, h, p = x.shape
    pad = (-length) % chunk_size
    if pad:
        # Zero dt on padded tokens: no decay and no input, so real outputs are unaffected.
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    c = x.size(1) // chunk_size
    L = chunk_size

    x = x.to(acc).reshape(b, c, L, h, p)
    dt = dt.to(acc).reshape(b, c, L, h)
    Bh = _heads_view(B.to(acc), h).reshape(b, c, L, h, -1)
    Ch = _heads_view(C.to(acc), h).reshape(b, c, L, h, -1)
    a = (dt * A.to(acc)).permute(0, 3, 1, 2)  # (b, h, c, L)
    a_cumsum = torch.cumsum(a, dim=-1)
    xdt = x * dt[..., None]  # (b, c, L, h, p)

    # 1. Outputs within each chunk (the quadratic, attention-like form).
    decay = torch.exp(segment_sum(a))  # (b, h, c, L, L)
    scores = torch.einsum("bclhn,bcshn->bhcls", Ch, Bh) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # 2. State at the end of each chunk from its own inputs.
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # (b, h, c, L), exponents <= 0
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, decay_to_end, xdt)

    # 3. Carry states across chunks (a scan over chunk totals, same stable form).
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    chunk_decay = torch.exp(segment_sum(F.pad(a_cumsum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)[:, :-1]

    # 4. Contribution of the carried-in state to each position of the chunk.
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, states, torch.exp(a_cumsum))

    y = y.reshape(b, c * L, h, p)[:, :length]
    if D is not None:
        y = y + x.reshape(b, c * L, h, p)[:, :length] * D.to(acc)[:, None]
    return y.to(in_dtype)


def ssd_sequential_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """The SSD recurrence one token at a time: ``s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T``,
    ``y_t = s_t C_t + D x_t``. Slow and exact; a reference for tests."""
    b, length, h, p = x.shape
    Bh, Ch = _heads_view(B, h), _heads_view(C, h)
    state = x.new_zeros(b, h, p, B.size(-1))
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (b, h, 1, 1)
        inp = (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        state = decay * state + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * D[:, None]
    return y
