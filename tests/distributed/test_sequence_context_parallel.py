"""Sequence parallelism (TP 2, TP 2 x PP 2) and context parallelism (CP 2 x TP 2 with SP,
CP 2 x DP 2) under torchrun/gloo give the loss, every model gradient and the router weights'
gradients of one process, for the parent, a homogeneous budget with a skipped layer and
heterogeneous budgets, in slice and mask mode, with and without activation recomputation
(sp_cp_worker.py runs them all in one launch per layout); and the CPU context-parallel attention
equals full causal attention. Every rank's results are checked; data-parallel replicas see
different micro-batches and the reference sees them all."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from closeness import assert_close, assert_stage_matches  # (pytest puts this directory on sys.path)

WORKER = Path(__file__).with_name("sp_cp_worker.py")
# Bounds relative to the reference's max |value| per tensor (closeness.assert_close), each about
# 2.5x the worst relative error measured over every rank, case and layout (2-core x86 CPU, gloo):
RTOL_LOSS = 5e-7  # measured 1.7e-7 (2 float32 ulps of a loss of 5.56; CP 2 x DP 2)
RTOL_GRAD = 8e-6  # model gradients: measured 3.0e-6 (layer 0 dt_bias, max |g| 1.2e-6, TP rank 1)
# router weights' gradients: measured 9.4e-5, on layer 5's depth gate, a scalar gradient of
# 1.3e-6 summed from cancelling terms (TP 2 x PP 2 with SP); every other one 2.8e-5 or less
RTOL_ROUTER_GRAD = 2.5e-4
RTOL_ATTENTION = 7e-7  # CP attention outputs and q/k/v gradients: measured 2.7e-7 (grad_k)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def launch(torchrun):
    return partial(torchrun, WORKER)


def _ranks(run_dir: Path, world: int) -> list[dict]:
    """Every rank's saved results (its cases, ``attention`` under CP, and ``coords``)."""
    files = sorted(run_dir.glob("rank*.pt"))
    assert len(files) == world, files
    return [torch.load(f) for f in files]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, launch) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("sp_cp")
    launch(work, 1, "--init")
    (ref,) = _ranks(work / "tp1_pp1_cp1", 1)
    del ref["coords"]
    losses = {case: r["loss"].item() for case, r in ref.items()}
    # the sub-networks really differ from the parent and from each other
    assert len({round(v, 5) for case, v in losses.items() if case[2] is False}) >= 4, losses
    for case, r in ref.items():
        nonzero = [n for n, g in r["grads"].items() if g.abs().sum() > 0]
        assert len(nonzero) >= 25, case  # every layer kind and the embedding/output took part
        if case[0] != "parent":
            assert sum(g.abs().sum() > 0 for g in r["router_grads"].values()) >= 8, case
    return work, ref


def _assert_same(ranks: list[dict], ref: dict, pp: int) -> None:
    """Every rank against the reference: the loss on every last-stage rank, its stage's model
    gradients and the router weights' gradients (after reduction, complete on every rank)."""
    cases = [c for c in ranks[0] if c not in ("coords", "attention")]
    assert set(cases) <= ref.keys() and len(cases) >= 10, sorted(cases)
    for r in ranks:  # every rank ran every case
        assert {c for c in r if c not in ("coords", "attention")} == set(cases), r["coords"]
    for case in cases:
        want = ref[case]
        covered: set[str] = set()
        for r in ranks:
            run, where = r[case], f"{case} rank {r['coords']}"
            covered |= assert_stage_matches(
                run,
                want,
                last_stage=r["coords"]["pp"] == pp - 1,
                rtol_loss=RTOL_LOSS,
                rtol_grad=RTOL_GRAD,
                where=where,
            )
            if case[0] == "parent":
                assert run["router_grads"] is None, where
                continue
            assert run["router_grads"].keys() == want["router_grads"].keys(), where
            for name, g in run["router_grads"].items():
                assert_close(
                    g, want["router_grads"][name], RTOL_ROUTER_GRAD, f"{where} router {name}"
                )
        assert covered == want["grads"].keys(), case  # the stages hold every gradient


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)])
def test_invariant_sequence_parallel_matches_single_process(
    reference, launch, tp: int, pp: int
) -> None:
    work, ref = reference
    launch(work, tp * pp, "--tp", str(tp), "--pp", str(pp), "--sp")
    ranks = _ranks(work / f"tp{tp}_pp{pp}_cp1_sp", tp * pp)
    assert {case[0] for case in ranks[0] if case != "coords"} >= {
        "parent",
        "homogeneous",
        "heterogeneous_heads",
    }
    _assert_same(ranks, ref, pp)


@pytest.mark.parametrize("tp,sp,dp", [(2, True, 1), (1, False, 2)])
def test_invariant_context_parallel_matches_single_process(
    reference, launch, tp: int, sp: bool, dp: int
) -> None:
    """CP 2 x TP 2 with SP, and CP 2 x DP 2 (each replica a CP 2 run on its own micro-batches;
    gradients averaged over DP x CP by megatron's DDP and by the router's reduction, the loss
    reduced over DP as the trainer logs it)."""
    work, ref = reference
    launch(work, 2 * tp * dp, "--cp", "2", "--tp", str(tp), *(["--sp"] if sp else []))
    tag = f"tp{tp}_pp1_cp2" + ("_sp" if sp else "") + (f"_dp{dp}" if dp > 1 else "")
    ranks = _ranks(work / tag, 2 * tp * dp)
    assert {r["coords"]["dp"] for r in ranks} == set(range(dp))
    for r in ranks:  # every CP rank's share of attention against full causal attention
        attention = r.pop("attention")
        assert set(attention) == {"out", "grad_q", "grad_k", "grad_v"}
        for name, (got, want) in attention.items():
            assert_close(got, want, RTOL_ATTENTION, f"attention {name} rank {r['coords']}")
    assert {case[0] for case in ranks[0] if case != "coords"} >= {
        "parent",
        "homogeneous",
        "heterogeneous",
    }
    _assert_same(ranks, ref, 1)
