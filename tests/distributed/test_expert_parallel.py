"""Expert parallelism (issue 26 step 5): EP 2 under torchrun/gloo gives the loss, the model
gradients and the router-weight gradients of one process, for the MoE parent, the full budget
and a sub-budget with fewer experts (4 of 8: 2 kept on each EP rank), in slice and mask mode,
through megatron's DDP and ``finalize_model_grads`` (expert gradients reduced over the expert-
data-parallel group with megatron's expert scaling) as the trainer runs them, and one step of the
trainer's optimizer (gradient norm over every rank's experts, clipping). Every rank is
checked: its loss, the gradients of the parameters it holds (its own experts, by the parent's
expert numbers) and its router gradients; the EP ranks together hold every gradient."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from closeness import assert_close  # (pytest puts this directory on sys.path)

WORKER = Path(__file__).with_name("ep_worker.py")
MODEL = Path(__file__).parents[1] / "fixtures" / "hybrid_moe_small.yaml"
# Bounds relative to the reference's max |value| per tensor (closeness.assert_close); the issue
# asks <= 1e-5 for each. Each is about 3x the worst measured over both ranks and every case
# (2-core x86 CPU, gloo; CLOSENESS_LOG):
RTOL_LOSS = 3e-7  # loss: measured 9.8e-8 (one float32 ulp of 4.86)
RTOL_GRAD = 1e-6  # model gradients: measured 2.9e-7 (layer 3 expert fc2, max |g| 6.1e-4)
RTOL_ROUTER_GRAD = 3e-7  # router-weight gradients: measured 1.1e-7 (layer 3's, max |g| 2.1e-3)
RTOL_NORM = 1e-6  # the optimizer's gradient norm: measured 0 (bitwise)
RTOL_STEP = 5e-6  # weights after one Adam step: measured 1.7e-6 (output layer; Adam divides
# each gradient by its own magnitude, so a gradient's rounding moves its update relatively more)
CASES = [
    ("parent", "parent"),
    ("full", "slice"),
    ("full", "mask"),
    ("fewer_experts", "slice"),
    ("fewer_experts", "mask"),
]

pytestmark = pytest.mark.distributed


def _ranks(run_dir: Path, world: int) -> list[dict]:
    files = sorted(run_dir.glob("rank*.pt"))
    assert len(files) == world, files
    return [torch.load(f) for f in files]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, torchrun) -> tuple[dict, list[dict]]:
    """(the one-process reference, the EP 2 ranks' results)."""
    work = tmp_path_factory.mktemp("ep")
    launch = partial(torchrun, WORKER, work)
    launch(1, "--model", str(MODEL), "--init")
    launch(2, "--model", str(MODEL), "--ep", "2")
    (ref,) = _ranks(work / "ep1", 1)
    return ref, _ranks(work / "ep2", 2)


def test_expert_parallel_runs_megatrons_allgather_dispatcher_over_two_ranks(runs) -> None:
    ref, ranks = runs
    assert ref["coords"] == {"ep": 1, "ep_rank": 0, "dp": 1}
    assert [r["coords"] for r in ranks] == [{"ep": 2, "ep_rank": i, "dp": 2} for i in range(2)]
    assert {r["dispatcher"] for r in ranks} == {"MoEAllGatherTokenDispatcher"}


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_invariant_expert_parallel_matches_single_process(runs, case) -> None:
    ref, ranks = runs
    want = ref[case]
    for name, g in want["grads"].items():
        assert g.abs().sum() > 0 or "experts" in name, f"{name} got no gradient"
    experts = {}
    for r in ranks:
        where = f"EP rank {r['coords']['ep_rank']} {case}"
        got = r[case]
        assert_close(got["loss"], want["loss"], RTOL_LOSS, f"{where} loss")
        assert got["grads"].keys() <= want["grads"].keys(), where
        for name, g in got["grads"].items():
            assert_close(g, want["grads"][name], RTOL_GRAD, f"{where} {name}")
        held = {n for n in got["grads"] if ".local_experts." in n}
        experts[r["coords"]["ep_rank"]] = held
        if want["router_grads"] is not None:
            assert got["router_grads"].keys() == want["router_grads"].keys(), where
            for name, g in want["router_grads"].items():
                assert g.abs().max() > 0, name
                assert_close(got["router_grads"][name], g, RTOL_ROUTER_GRAD, f"{where} {name}")
    # each rank holds half the experts (the parent's 0-3, then 4-7); together every one
    assert not experts[0] & experts[1]
    assert experts[0] | experts[1] == {n for n in want["grads"] if ".local_experts." in n}
    assert all(_expert(n) < 4 for n in experts[0])
    if case[0] == "fewer_experts":  # 4 kept of 8 with 2 nesting blocks: 2 on each EP rank
        for r in ranks:
            trained = {
                (n.split(".")[2], _expert(n))
                for n, g in r[case]["grads"].items()
                if ".local_experts." in n and g.abs().max() > 0
            }
            first = 4 * r["coords"]["ep_rank"]
            assert trained == {(j, first + i) for j in ("1", "3") for i in (0, 1)}, trained


def _expert(name: str) -> int:
    """The parent's expert number in ``decoder.layers.J.mlp.experts.local_experts.E....``."""
    return int(name.split(".")[6])


def test_invariant_an_optimizer_step_under_expert_parallelism_matches_single_process(runs) -> None:
    """The trainer's optimizer (megatron's, dense and expert parameters in their own groups)
    clips by the global gradient norm, the experts' share summed over the EP ranks: the norm and
    every updated weight are the single process's."""
    ref, ranks = runs
    want = ref["step"]
    for r in ranks:
        where = f"EP rank {r['coords']['ep_rank']} step"
        got = r["step"]
        assert_close(got["grad_norm"], want["grad_norm"], RTOL_NORM, f"{where} grad norm")
        assert want["grad_norm"] > 0.05  # clipping acted
        for name, w in got["weights"].items():
            assert_close(w, want["weights"][name], RTOL_STEP, f"{where} {name}")
