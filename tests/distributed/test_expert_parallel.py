"""Expert and tensor parallelism of MoE layers (issue 26 step 5): EP 2, TP 2 and EP 2 x TP 2,
each on 4 ranks (the rest data parallel; one torchrun/gloo launch runs the three), give the
loss, the model gradients and the router-weight gradients of one process, for the MoE parent,
the full budget and a sub-budget with fewer experts (4 of 8: 2 kept on each EP rank) and
narrower experts, shared expert and hidden width, in slice and mask mode, through megatron's DDP
and ``finalize_model_grads`` (expert gradients reduced over the expert-data-parallel group with
megatron's expert scaling) as the trainer runs them, and one step of the trainer's optimizer
(gradient norm over every rank's experts, clipping). Under TP (sequence parallel, expert TP =
TP) every expert's and the shared expert's neurons are split over the TP ranks and nest per FFN
nesting block (4 blocks: each TP rank keeps a prefix of each of its 2), and each rank takes its
share of the router's per-neuron weights. Every rank is checked: its loss, the gradients of the
parameters it holds (its own experts, by the parent's expert numbers, TP-gathered) and its
router gradients; the EP ranks together hold every gradient."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from closeness import assert_close  # (pytest puts this directory on sys.path)

WORKER = Path(__file__).with_name("ep_worker.py")
MODEL = Path(__file__).parents[1] / "fixtures" / "hybrid_moe_small.yaml"
# Bounds relative to the reference's max |value| per tensor (closeness.assert_close); the issue
# asks <= 1e-5 for the loss and the gradients. Each is about 3x the worst measured over every rank
# and case of its layouts (2-core x86 CPU, gloo; CLOSENESS_LOG), without TP (EP 2) and with TP
# (TP 2, EP 2 x TP 2: sequence parallel, reductions in another order):
RTOL_LOSS = 3e-7  # loss: measured 9.8e-8 (one float32 ulp of 4.85)
RTOL_GRAD = {False: 1.5e-6, True: 1e-5}  # model gradients: measured 4.5e-7 (EP 2: layer 0's
# Mamba D, max |g| 1.0e-3; the MoE layers' 2.3e-7); with TP 3.1e-6 (the same D, as in
# test_tp_pp_equivalence.py; the MoE layers' experts, shared experts and gates at most 1.6e-6)
RTOL_ROUTER_GRAD = {False: 6e-7, True: 3.5e-6}  # router-weight gradients: measured 2.1e-7 (EP 2:
# layer 1's); with TP 1.1e-6 (layer 1's per-neuron weights, max |g| 2.7e-3)
RTOL_NORM = 4e-7  # the optimizer's gradient norm: measured 6.4e-8 (EP 2), 1.3e-7 (TP 2)
RTOL_STEP = 3e-6  # weights after one Adam step (EP 2): measured 8.8e-7 (layer 1 expert fc2;
# Adam divides each gradient by its own magnitude, so a gradient's rounding moves its update
# relatively more). Not compared with TP: there the Adam step of the Mamba in_proj and the word
# embeddings (entries whose gradients are near Adam's eps) differed by 2.2e-5 to 7.2e-5 relative
# from run to run, above the 1e-5, while their gradients are held to RTOL_GRAD.
CASES = [
    ("parent", "parent"),
    ("full", "slice"),
    ("full", "mask"),
    ("fewer_experts", "slice"),
    ("fewer_experts", "mask"),
]
# EP x TP, the rest of 4 ranks data parallel (EP 2 with 4 data-parallel replicas: 2 expert-DP)
LAYOUTS = {"2x1": 4, "1x2": 4, "2x2": 4}

pytestmark = pytest.mark.distributed


def _ranks(run_dir: Path, world: int) -> list[dict]:
    files = sorted(run_dir.glob("rank*.pt"))
    assert len(files) == world, files
    return [torch.load(f) for f in files]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, torchrun) -> tuple[dict, dict[str, list]]:
    """(the one-process reference, each layout's ranks' results); one launch per world size."""
    work = tmp_path_factory.mktemp("ep")
    launch = partial(torchrun, WORKER, work)
    launch(1, "--model", str(MODEL), "--init")
    launch(4, "--model", str(MODEL), "--layouts", *LAYOUTS)
    (ref,) = _ranks(work / "1x1", 1)
    return ref, {name: _ranks(work / name, world) for name, world in LAYOUTS.items()}


def _where(r: dict, what) -> str:
    c = r["coords"]
    return f"EP {c['ep']} x TP {c['tp']}, EP rank {c['ep_rank']} TP rank {c['tp_rank']} {what}"


def test_moe_parallel_layouts_run_megatrons_allgather_dispatcher(runs) -> None:
    ref, layouts = runs
    assert ref["coords"] == {
        "ep": 1,
        "ep_rank": 0,
        "tp": 1,
        "tp_rank": 0,
        "dp": 1,
        "sequence_parallel": False,
    }
    for name, world in LAYOUTS.items():
        ep, tp = (int(n) for n in name.split("x"))
        coords = [r["coords"] for r in layouts[name]]
        assert [(c["ep"], c["tp"], c["dp"]) for c in coords] == [(ep, tp, world // tp)] * world
        assert {(c["ep_rank"], c["tp_rank"]) for c in coords} == {
            (e, t) for e in range(ep) for t in range(tp)
        }
        assert {c["sequence_parallel"] for c in coords} == {tp > 1}
        assert {r["dispatcher"] for r in layouts[name]} == {"MoEAllGatherTokenDispatcher"}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_invariant_expert_and_tensor_parallel_match_single_process(runs, layout, case) -> None:
    ref, layouts = runs
    ranks, tp = layouts[layout], layout.endswith("x2")
    want = ref[case]
    for name, g in want["grads"].items():
        assert g.abs().sum() > 0 or "experts" in name, f"{name} got no gradient"
    experts: dict[int, set[str]] = {}
    for r in ranks:
        where = _where(r, case)
        got = r[case]
        assert_close(got["loss"], want["loss"], RTOL_LOSS, f"{where} loss")
        assert got["grads"].keys() <= want["grads"].keys(), where
        for name, g in got["grads"].items():
            assert_close(g, want["grads"][name], RTOL_GRAD[tp], f"{where} {name}")
        held = {n for n in got["grads"] if ".local_experts." in n}
        experts.setdefault(r["coords"]["ep_rank"], held)
        assert experts[r["coords"]["ep_rank"]] == held, where  # the TP ranks of one EP rank
        if want["router_grads"] is not None:
            assert got["router_grads"].keys() == want["router_grads"].keys(), where
            for name, g in want["router_grads"].items():
                assert g.abs().max() > 0, name
                assert_close(got["router_grads"][name], g, RTOL_ROUTER_GRAD[tp], f"{where} {name}")
    # each EP rank holds its share of the experts (EP 2: the parent's 0-3, then 4-7); together
    # every one
    ep = len(experts)
    assert set().union(*experts.values()) == {n for n in want["grads"] if ".local_experts." in n}
    for e, held in experts.items():
        assert {_expert(n) // (8 // ep) for n in held} == {e}
    if case[0] == "fewer_experts":  # 4 kept of 8 with 2 nesting blocks: 0, 1 and 4, 5
        for r in ranks:
            trained = {
                (n.split(".")[2], _expert(n))
                for n, g in r[case]["grads"].items()
                if ".local_experts." in n and g.abs().max() > 0
            }
            kept = {e for e in (0, 1, 4, 5) if e // (8 // ep) == r["coords"]["ep_rank"]}
            assert trained == {(j, e) for j in ("1", "3") for e in kept}, trained


def _expert(name: str) -> int:
    """The parent's expert number in ``decoder.layers.J.mlp.experts.local_experts.E....``."""
    return int(name.split(".")[6])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_invariant_an_optimizer_step_under_expert_and_tensor_parallelism_matches_single_process(
    runs, layout
) -> None:
    """The trainer's optimizer (megatron's, dense and expert parameters in their own groups)
    clips by the global gradient norm, the experts' share summed over the EP ranks (and over the
    TP shards): the norm is the single process's at every layout, and without TP every updated
    weight (see RTOL_STEP)."""
    ref, layouts = runs
    want, tp = ref["step"], layout.endswith("x2")
    for r in layouts[layout]:
        where = _where(r, "step")
        got = r["step"]
        assert_close(got["grad_norm"], want["grad_norm"], RTOL_NORM, f"{where} grad norm")
        assert want["grad_norm"] > 0.05  # clipping acted
        if tp:
            continue
        for name, w in got["weights"].items():
            assert_close(w, want["weights"][name], RTOL_STEP, f"{where} {name}")
