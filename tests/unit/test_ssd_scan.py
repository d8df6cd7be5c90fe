"""The CPU chunked SSD scan equals the exact sequential recurrence (float64)."""

from __future__ import annotations

import pytest
import torch

from megatron_elastic.model.ssd_scan import segment_sum, ssd_chunked_scan, ssd_sequential_scan


def _inputs(length: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    b, h, p, groups, n = 2, 6, 5, 3, 4
    x = torch.randn(b, length, h, p, generator=g, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, length, h, generator=g, dtype=dtype))
    A = -torch.rand(h, generator=g, dtype=dtype) * 2 - 0.1
    B = torch.randn(b, length, groups, n, generator=g, dtype=dtype)
    C = torch.randn(b, length, groups, n, generator=g, dtype=dtype)
    D = torch.randn(h, generator=g, dtype=dtype)
    return x, dt, A, B, C, D


@pytest.mark.parametrize(
    "length,chunk",
    [(32, 8), (37, 8), (37, 16), (5, 16), (64, 64), (50, 1), (41, 7)],
)
def test_invariant_chunked_scan_matches_sequential_float64(length: int, chunk: int) -> None:
    x, dt, A, B, C, D = _inputs(length)
    ref = ssd_sequential_scan(x, dt, A, B, C, D)
    out = ssd_chunked_scan(x, dt, A, B, C, chunk, D=D)
    assert out.shape == ref.shape and out.dtype == torch.float64
    assert (out - ref).abs().max().item() <= 1e-10


def test_invariant_scan_does_not_depend_on_chunk_size() -> None:
    x, dt, A, B, C, D = _inputs(45, seed=3)
    outs = [ssd_chunked_scan(x, dt, A, B, C, c, D=D) for c in (4, 9, 16, 45, 64)]
    for o in outs[1:]:
        assert (o - outs[0]).abs().max().item() <= 1e-10


def test_long_chunk_gradients_are_finite() -> None:
    """Strong decay over a long chunk overflows exp(cumsum)-style scans; ours stays finite."""
    x, dt, A, B, C, D = _inputs(256, seed=1, dtype=torch.float32)
    dt = (dt * 20).requires_grad_()
    A = (A * 10).requires_grad_()
    x = x.requires_grad_()
    y = ssd_chunked_scan(x, dt, A, B, C, 256, D=D)
    y.square().mean().backward()
    for t in (x.grad, dt.grad, A.grad):
        assert torch.isfinite(t).all()
    assert torch.isfinite(y).all()


def test_segment_sum_definition() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    s = segment_sum(x)
    assert s[3, 1].item() == 3.0 + 4.0  # sum of x[2..3]
    assert s[2, 2].item() == 0.0
    assert s[1, 2].item() == float("-inf")
