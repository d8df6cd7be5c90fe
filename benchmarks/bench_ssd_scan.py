#!/usr/bin/env python
"""CPU SSD scan: the chunked form against the token-by-token recurrence, same inputs, one run.

Prints forward+backward times for the tiny recipe's mixer shape at several sequence lengths and the
speed-up of the chunked scan; its last line is ``worst chunked/sequential time ratio: <float>``.
"""

from __future__ import annotations

import time

import torch

from megatron_elastic.model.ssd_scan import ssd_chunked_scan, ssd_sequential_scan


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    torch.manual_seed(0)
    b, h, p, g, n, chunk = 4, 8, 32, 2, 16, 64  # examples/tiny/model.yaml mixer
    worst = 0.0
    print(f"{'seq':>6} {'chunked ms':>11} {'sequential ms':>14} {'ratio':>7}")
    for length in (128, 512, 1024):
        x = torch.randn(b, length, h, p, requires_grad=True)
        dt = torch.rand(b, length, h).requires_grad_()
        A = -torch.rand(h).requires_grad_()
        B, C = torch.randn(b, length, g, n), torch.randn(b, length, g, n)

        def chunked(x=x, dt=dt, A=A, B=B, C=C):
            ssd_chunked_scan(x, dt, A, B, C, chunk).sum().backward()

        def sequential(x=x, dt=dt, A=A, B=B, C=C):
            ssd_sequential_scan(x, dt, A, B, C).sum().backward()

        t_chunk, t_seq = _time(chunked, 5), _time(sequential, 2)
        ratio = t_chunk / t_seq
        worst = max(worst, ratio)
        print(f"{length:>6} {t_chunk * 1e3:>11.1f} {t_seq * 1e3:>14.1f} {ratio:>7.3f}")
    print(f"worst chunked/sequential time ratio: {worst:.3f}")


if __name__ == "__main__":
    main()
