"""Sequence parallelism (TP 2, TP 2 x PP 2) and context parallelism (CP 2 x TP 2 with SP,
CP 2 x DP 2) under torchrun/gloo give the loss, every model gradient and the router weights'
gradients of one process, for the parent, a homogeneous budget with a skipped layer and
heterogeneous budgets, in slice and mask mode, with and without activation recomputation
(sp_cp_worker.py runs them all in one launch per layout); and the CPU context-parallel attention
equals full causal attention."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("sp_cp_worker.py")
TOL = 1e-5

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def launch(torchrun):
    return partial(torchrun, WORKER)


def _collect(run_dir: Path) -> dict:
    """Per case, the loss (last stage), the model gradients of all stages and the router
    weights' gradients (every stage holds the same after reduction)."""
    out: dict = {}
    for stage in sorted(run_dir.glob("stage*.pt")):
        for case, data in torch.load(stage).items():
            if case == "attention":
                out[case] = data
                continue
            merged = out.setdefault(case, {"loss": None, "grads": {}, "router_grads": []})
            merged["grads"].update(data["grads"])
            if data["loss"] is not None:
                merged["loss"] = data["loss"]
            if data["router_grads"] is not None:
                merged["router_grads"].append(data["router_grads"])
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, launch) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("sp_cp")
    launch(work, 1, "--init")
    ref = _collect(work / "tp1_pp1_cp1")
    losses = {case: r["loss"].item() for case, r in ref.items()}
    # the sub-networks really differ from the parent and from each other
    assert len({round(v, 5) for case, v in losses.items() if case[2] is False}) >= 4, losses
    return work, ref


def _assert_same(got: dict, ref: dict) -> None:
    assert got.keys() <= ref.keys() and len(got) >= 10, sorted(got)
    for case, run in got.items():
        want = ref[case]
        assert run["loss"] is not None and torch.isfinite(run["loss"]), case
        assert abs(run["loss"].item() - want["loss"].item()) <= TOL, case
        assert run["grads"].keys() == want["grads"].keys(), case
        nonzero = [n for n, g in want["grads"].items() if g.abs().sum() > 0]
        assert len(nonzero) >= 25, case  # every layer kind and the embedding/output took part
        for name, g in want["grads"].items():
            diff = (run["grads"][name] - g).abs().max().item()
            assert diff <= TOL, f"{case} {name}: max |grad diff| {diff:.3e}"
        if case[0] == "parent":
            continue
        (router_ref,) = want["router_grads"]
        assert sum(g.abs().sum() > 0 for g in router_ref.values()) >= 8, case
        for stage_grads in run["router_grads"]:
            for name, g in router_ref.items():
                diff = (stage_grads[name] - g).abs().max().item()
                assert diff <= TOL, f"{case} router {name}: {diff:.3e}"


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)])
def test_sequence_parallel_matches_single_process(reference, launch, tp: int, pp: int) -> None:
    work, ref = reference
    launch(work, tp * pp, "--tp", str(tp), "--pp", str(pp), "--sp")
    got = _collect(work / f"tp{tp}_pp{pp}_cp1_sp")
    assert {case[0] for case in got} >= {"parent", "homogeneous", "heterogeneous_heads"}
    _assert_same(got, ref)


@pytest.mark.parametrize("tp,sp,dp", [(2, True, 1), (1, False, 2)])
def test_context_parallel_matches_single_process(
    reference, launch, tp: int, sp: bool, dp: int
) -> None:
    """CP 2 x TP 2 with SP, and CP 2 x DP 2 (each replica a CP 2 run; gradients averaged over
    DP x CP by megatron's DDP and by the router's reduction)."""
    work, ref = reference
    launch(work, 2 * tp * dp, "--cp", "2", "--tp", str(tp), *(["--sp"] if sp else []))
    tag = f"tp{tp}_pp1_cp2" + ("_sp" if sp else "") + (f"_dp{dp}" if dp > 1 else "")
    got = _collect(work / tag)
    attention = got.pop("attention")
    assert set(attention) == {"out", "grad_q", "grad_k", "grad_v"}
    assert max(attention.values()) <= TOL, attention
    assert {case[0] for case in got} >= {"parent", "homogeneous", "heterogeneous"}
    _assert_same(got, ref)
