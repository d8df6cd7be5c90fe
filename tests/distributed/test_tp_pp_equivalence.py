"""TP=2, PP=2 and TP2xPP2 under torchrun/gloo give the loss and gradients of one process, for the
parent and for the elastic model running a heterogeneous sub-network (slice and mask modes)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("tp_pp_worker.py")

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def launch(torchrun):
    return partial(torchrun, WORKER)


def _collect(run_dir: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss, grads = None, {}
    for stage in sorted(run_dir.glob("stage*.pt")):
        data = torch.load(stage)
        grads.update(data["grads"])
        if data["loss"] is not None:
            loss = data["loss"]
    return loss, grads


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, launch) -> tuple[Path, torch.Tensor, dict]:
    work = tmp_path_factory.mktemp("tp_pp")
    launch(work, 1, "--init")
    loss, grads = _collect(work / "tp1_pp1")
    return work, loss, grads


def _assert_same(loss, grads, ref_loss, ref_grads, kinds=("mixer", "self_attention", "mlp")):
    assert loss is not None and torch.isfinite(loss)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5, (loss.item(), ref_loss.item())
    assert set(grads) == set(ref_grads)
    present = {name.split(".")[3] for name in grads if name.startswith("decoder.layers.")}
    assert set(kinds) <= present  # every layer kind took part
    for name, ref in ref_grads.items():
        assert grads[name].shape == ref.shape, name
        assert ref.abs().sum() > 0, f"{name} got no gradient"
        diff = (grads[name] - ref).abs().max().item()
        assert diff <= 1e-5, f"{name}: max |grad diff| {diff:.3e}"


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_matches_single_process(reference, launch, tp: int, pp: int) -> None:
    work, ref_loss, ref_grads = reference
    launch(work, tp * pp, "--tp", str(tp), "--pp", str(pp))
    _assert_same(*_collect(work / f"tp{tp}_pp{pp}"), ref_loss, ref_grads)


@pytest.fixture(scope="module")
def elastic_reference(reference, launch) -> tuple[Path, torch.Tensor, dict]:
    work, parent_loss, _ = reference
    launch(work, 1, "--elastic", "slice")
    loss, grads = _collect(work / "tp1_pp1_slice")
    assert abs(loss.item() - parent_loss.item()) > 1e-3  # the sub-network is not the parent
    assert not any(n.startswith("decoder.layers.4.") for n in grads)  # the skipped layer
    return work, loss, grads


@pytest.mark.parametrize(
    "tp,pp,mode", [(2, 1, "slice"), (1, 2, "slice"), (2, 2, "slice"), (2, 2, "mask")]
)
def test_elastic_parallel_matches_single_process(elastic_reference, launch, tp, pp, mode) -> None:
    work, ref_loss, ref_grads = elastic_reference
    launch(work, tp * pp, "--tp", str(tp), "--pp", str(pp), "--elastic", mode)
    _assert_same(*_collect(work / f"tp{tp}_pp{pp}_{mode}"), ref_loss, ref_grads)


@pytest.fixture(scope="module")
def ranked_reference(reference, launch):
    work, parent_loss, _ = reference
    launch(work, 1, "--importance")
    data = torch.load(work / "tp1_pp1_ranked" / "stage0.pt")
    # ranking permutes weights but keeps the function: the parent's loss, unchanged
    assert abs(data["loss"].item() - parent_loss.item()) <= 1e-5
    return work, data


def test_importance_under_tp_matches_single_process(ranked_reference, launch) -> None:
    work, ref = ranked_reference
    launch(work, 2, "--tp", "2", "--importance")
    data = torch.load(work / "tp2_pp1_ranked" / "stage0.pt")
    assert abs(data["loss"].item() - ref["loss"].item()) <= 1e-5
    ours, theirs = data["ranking"], ref["ranking"]
    for axis in (
        "hidden",
        "ffn",
        "mamba_channels",
        "mamba_heads",
        "attention_heads",
        "layer_ranking",
    ):
        assert ours[axis] == theirs[axis], axis
    for name, g in ref["grads"].items():  # the ranked parents train identically too
        assert (data["grads"][name] - g).abs().max().item() <= 1e-5, name


@pytest.fixture(scope="module")
def router_reference(reference, launch):
    work, _, _ = reference
    launch(work, 1, "--router")
    return work, torch.load(work / "tp1_pp1_router" / "stage0.pt")


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_router_decisions_and_grads_match_single_process(router_reference, launch, tp, pp) -> None:
    work, ref = router_reference
    assert len(ref["decisions"]) == 3 and ref["router_grads"]
    assert any(g.abs().sum() > 0 for g in ref["router_grads"].values())
    launch(work, tp * pp, "--tp", str(tp), "--pp", str(pp), "--router")
    stages = sorted((work / f"tp{tp}_pp{pp}_router").glob("stage*.pt"))
    assert len(stages) == pp
    for stage in stages:  # every stage (after reduction) holds the same, full router gradient
        data = torch.load(stage)
        assert data["decisions"] == ref["decisions"]  # identical decisions on every rank
        for name, g in ref["router_grads"].items():
            diff = (data["router_grads"][name] - g).abs().max().item()
            assert diff <= 1e-5, f"{name}: {diff:.3e}"
    _assert_same(*_collect(work / f"tp{tp}_pp{pp}_router"), ref["loss"], ref["grads"])
