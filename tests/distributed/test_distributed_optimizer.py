"""megatron's distributed optimizer, with and without ``overlap_grad_reduce`` /
``overlap_param_gather``, trains as the plain optimizer does: DP 2 under torchrun/gloo, three
optimizer steps of the parent (see dp_optim_worker.py). All of it runs on gloo with CPU tensors
(bucketed async reduce-scatter and all-gather included)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from closeness import assert_close  # (pytest puts this directory on sys.path)

WORKER = Path(__file__).with_name("dp_optim_worker.py")
# The distributed optimizer's gradient norm sums the squares over each rank's shard and
# all-reduces the partial sums, so its last bits depend on the shard boundaries (which the bucket
# size moves) and differ from the plain optimizer's: measured 9.7e-8 relative, for both the
# one-bucket and the 8-bucket (overlap) layout. So does the clip factor, hence Adam's steps
# (lr 1e-2: each element moves ~lr whatever its gradient's size) in their last bits: after 3
# steps the parameters differ by at most 5.4e-7 (2e-5 of the 3e-2 an element can move). The
# losses were bitwise equal. Bounds ~2.5x the measured (deterministic: 3 runs gave the same bits).
RTOL_LOSS = 2e-7
RTOL_NORM = 2.5e-7
ATOL_PARAM = 1.5e-6

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory, torchrun) -> list[dict]:
    work = tmp_path_factory.mktemp("dp_optim")
    torchrun(WORKER, work, 2)
    return [torch.load(work / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("variant", ["distributed", "overlap"])
def test_invariant_distributed_optimizer_matches_plain(ranks, variant: str) -> None:
    for r, run in enumerate(ranks):
        plain, got = run["plain"], run[variant]
        where = f"rank {r} {variant}"
        assert_close(got["losses"], plain["losses"], RTOL_LOSS, f"{where} losses")
        norms = torch.tensor(got["grad_norms"])
        assert_close(norms, torch.tensor(plain["grad_norms"]), RTOL_NORM, f"{where} grad norms")
        for name, p in plain["params"].items():
            diff = (got["params"][name] - p).abs().max().item()
            assert diff <= ATOL_PARAM, f"{where} {name}: max |diff| {diff:.2e}"
            # the replicas hold the same parameters (the all-gather; sync_params after overlap)
            assert torch.equal(got["params"][name], ranks[0][variant]["params"][name]), where


def test_overlap_really_overlaps(ranks) -> None:
    """Several buckets; every step after the first (which records each bucket's gradient
    count, as megatron does) started each bucket's reduction in the backward; every step left
    the parameter all-gather to the next forward. Without the overlap flags, neither."""
    for run in ranks:
        overlap, ref = run["overlap"], run["distributed"]
        assert overlap["buckets"] > 2 and ref["buckets"] == 1
        steps = len(ref["losses"])
        assert overlap["launched_in_backward"][1:] == [True] * (steps - 1)
        assert all(overlap["gather_deferred"])
        assert not any(ref["launched_in_backward"]) and not any(ref["gather_deferred"])
