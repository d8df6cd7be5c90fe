"""TP=2, PP=2 (an even and an uneven layer split) and TP2xPP2 under torchrun/gloo give the loss
and gradients of one process, for the parent, for the elastic model running a heterogeneous
sub-network (slice and mask modes), for an importance-ranked parent and for router-chosen
sub-networks. Every rank's results are checked: its loss (last stage), its stage's gradients, its
ranking, its router decisions and gradients."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from closeness import assert_close, assert_stage_matches  # (pytest puts this directory on sys.path)

WORKER = Path(__file__).with_name("tp_pp_worker.py")
# Bounds relative to the reference's max |value| per tensor (closeness.assert_close), each about
# 2.5x the worst relative error measured over every rank and layout (2-core x86 CPU, gloo):
RTOL_LOSS = 2e-7  # measured 0 (every loss bitwise equal); 2e-7 of 5.57 is about 2 float32 ulps
RTOL_GRAD = 2e-5  # model gradients: measured 8.2e-6 (layer 0 A_log, max |g| 8.3e-7, TP rank 1)
RTOL_ROUTER_GRAD = 1.5e-5  # router gradients: measured 6.0e-6 (routers.hidden.2.bias, PP 2)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def launch(torchrun):
    return partial(torchrun, WORKER)


def _ranks(run_dir: Path, world: int) -> list[dict]:
    """Every rank's saved results, in rank order."""
    files = sorted(run_dir.glob("rank*.pt"))
    assert len(files) == world, files
    return [torch.load(f) for f in files]


def _reference(run_dir: Path) -> dict:
    (ref,) = _ranks(run_dir, 1)
    for name, g in ref["grads"].items():
        assert g.abs().sum() > 0, f"{name} got no gradient"
    return ref


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, launch) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("tp_pp")
    launch(work, 1, "--init")
    return work, _reference(work / "tp1_pp1")


def _assert_same(ranks: list[dict], ref: dict, pp: int) -> None:
    """Every rank against the reference: the loss on every last-stage rank, the gradients of its
    stage; together the stages hold every gradient, of every layer kind."""
    covered: set[str] = set()
    for r in ranks:
        covered |= assert_stage_matches(
            r,
            ref,
            last_stage=r["coords"]["pp"] == pp - 1,
            rtol_loss=RTOL_LOSS,
            rtol_grad=RTOL_GRAD,
            where=f"rank {r['coords']}",
        )
    assert covered == ref["grads"].keys()
    present = {name.split(".")[3] for name in covered if name.startswith("decoder.layers.")}
    assert {"mixer", "self_attention", "mlp"} <= present  # every layer kind took part


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_invariant_parallel_matches_single_process(reference, launch, tp: int, pp: int) -> None:
    work, ref = reference
    launch(work, tp * pp, "--tp", str(tp), "--pp", str(pp))
    _assert_same(_ranks(work / f"tp{tp}_pp{pp}", tp * pp), ref, pp)


def test_invariant_uneven_pipeline_layout_matches_single_process(reference, launch) -> None:
    """``parallel.pipeline_layout`` [4, 2]: the last stage, which holds the output layer and the
    loss, gets fewer layers; the loss and every gradient (by global name: the stages' layer
    offsets follow the layout) are the single process's, as the even split's are above."""
    work, ref = reference
    launch(work, 2, "--pp", "2", "--layout", "4", "2")
    ranks = _ranks(work / "tp1_pp2_layout4-2", 2)
    _assert_same(ranks, ref, 2)
    prefix = "decoder.layers."
    layers = [{n.split(".")[2] for n in r["grads"] if n.startswith(prefix)} for r in ranks]
    assert layers == [{"0", "1", "2", "3"}, {"4", "5"}]  # 4 layers, then 2


@pytest.fixture(scope="module")
def elastic_reference(reference, launch) -> tuple[Path, dict]:
    work, parent = reference
    launch(work, 1, "--elastic", "slice")
    ref = _reference(work / "tp1_pp1_slice")
    assert abs(ref["loss"].item() - parent["loss"].item()) > 1e-3  # not the parent
    assert not any(n.startswith("decoder.layers.4.") for n in ref["grads"])  # the skipped layer
    return work, ref


@pytest.mark.parametrize(
    "tp,pp,mode", [(2, 1, "slice"), (1, 2, "slice"), (2, 2, "slice"), (2, 2, "mask")]
)
def test_invariant_elastic_parallel_matches_single_process(
    elastic_reference, launch, tp, pp, mode
) -> None:
    work, ref = elastic_reference
    launch(work, tp * pp, "--tp", str(tp), "--pp", str(pp), "--elastic", mode)
    _assert_same(_ranks(work / f"tp{tp}_pp{pp}_{mode}", tp * pp), ref, pp)


@pytest.fixture(scope="module")
def ranked_reference(reference, launch) -> tuple[Path, dict]:
    work, parent = reference
    launch(work, 1, "--importance")
    ref = _reference(work / "tp1_pp1_ranked")
    # ranking permutes weights but keeps the function: the parent's loss, unchanged
    assert_close(ref["loss"], parent["loss"], RTOL_LOSS, "ranked parent's loss")
    return work, ref


def test_invariant_importance_under_tp_matches_single_process(ranked_reference, launch) -> None:
    """Every TP rank ranks as one process does, and the ranked parents train identically."""
    work, ref = ranked_reference
    launch(work, 2, "--tp", "2", "--importance")
    ranks = _ranks(work / "tp2_pp1_ranked", 2)
    axes = ("hidden", "ffn", "mamba_channels", "mamba_heads", "attention_heads", "layer_ranking")
    for r in ranks:
        for axis in axes:
            assert r["ranking"][axis] == ref["ranking"][axis], f"rank {r['coords']} {axis}"
    _assert_same(ranks, ref, 1)


@pytest.fixture(scope="module")
def router_reference(reference, launch) -> tuple[Path, dict]:
    work, _ = reference
    launch(work, 1, "--router")
    ref = _reference(work / "tp1_pp1_router")
    assert len(ref["decisions"]) == 3 and ref["router_grads"]
    assert any(g.abs().sum() > 0 for g in ref["router_grads"].values())
    return work, ref


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_invariant_router_decisions_and_grads_match_single_process(
    router_reference, launch, tp, pp
) -> None:
    """Every rank draws the reference's decisions and holds (after reduction) the full router
    gradient; the routed model's loss and gradients are the reference's."""
    work, ref = router_reference
    launch(work, tp * pp, "--tp", str(tp), "--pp", str(pp), "--router")
    ranks = _ranks(work / f"tp{tp}_pp{pp}_router", tp * pp)
    for r in ranks:  # the same sub-networks everywhere, first: else every other check differs
        assert r["decisions"] == ref["decisions"], f"rank {r['coords']}: {r['decisions']}"
    for r in ranks:
        where = f"rank {r['coords']}"
        assert r["router_grads"].keys() == ref["router_grads"].keys(), where
        for name, g in ref["router_grads"].items():
            assert_close(r["router_grads"][name], g, RTOL_ROUTER_GRAD, f"{where} router {name}")
    _assert_same(ranks, ref, pp)
