"""How the distributed tests compare a parallel run with the single-process reference: relative
to the reference tensor's scale, so a small gradient is held as tightly as a large one.

The bounds in the tests were measured: with ``CLOSENESS_LOG=FILE`` set, every comparison appends
its max |diff| and max |ref| to FILE as a JSON line (the workers' processes do not compare)."""

from __future__ import annotations

import json
import os

import torch

__all__ = ["FLOOR", "assert_close", "assert_stage_matches"]

FLOOR = 1e-15
"""Absolute slack added to every bound, for all-zero reference tensors (the gradients of masked or
skipped units, exactly zero in every parallel run measured); the smallest nonzero reference here
(max |g| 8e-7) gets a relative bound above 1e-11, so the floor adds nothing there."""


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    """``max |got - want| <= rtol * max |want| + FLOOR``, with both numbers in the message."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().item() if want.numel() else 0.0
    diff = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    log = os.environ.get("CLOSENESS_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"what": what, "diff": diff, "scale": scale}) + "\n")
    assert diff <= rtol * scale + FLOOR, (
        f"{what}: max |diff| {diff:.3e} > {rtol:.2g} x max |ref| {scale:.3e}"
        f" (relative {diff / scale if scale else float('inf'):.2e})"
    )


def assert_stage_matches(
    run: dict, want: dict, *, last_stage: bool, rtol_loss: float, rtol_grad: float, where: str
) -> set[str]:
    """One rank's ``loss`` and ``grads`` against the reference's: the loss on last-stage ranks
    only, each gradient of this rank's stage. Returns the names of the gradients it held (the
    stages together must hold every one)."""
    assert (run["loss"] is not None) == last_stage, where
    if last_stage:
        assert torch.isfinite(run["loss"]), where
        assert_close(run["loss"], want["loss"], rtol_loss, f"{where} loss")
    assert run["grads"].keys() <= want["grads"].keys(), where
    for name, g in run["grads"].items():
        assert_close(g, want["grads"][name], rtol_grad, f"{where} {name}")
    return set(run["grads"])
