"""The trainer as users run it (``python -m megatron_elastic.train``, real processes): exact
resume after SIGKILL, clean save on SIGTERM, NaN stop that keeps the last good checkpoint, a TP=2
checkpoint resumed at TP=1, and distillation that lowers the small budget's KD loss."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training_workspace import write_training_workspace

from megatron_elastic.checkpoint import load_extra, read_manifest

ROOT = Path(__file__).parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "train_small"
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, pgs):
    """Tokenizer + indexed dataset of generated reasoning text, and a saved (random) parent of
    the small trainer-test model."""
    root = tmp_path_factory.mktemp("trainer")
    return write_training_workspace(root, FIXTURE / "model.yaml", pgs, records=300, seed=3)


def _args(workspace, save: Path, *extra: str) -> list[str]:
    root, prefix = workspace
    return [
        "--config",
        str(FIXTURE / "stage.yaml"),
        f"data.blend={prefix}",
        f"data.tokenizer={root / 'tokenizer.json'}",
        f"distill.teacher_checkpoint={root / 'parent'}",
        f"checkpoint.init={root / 'parent'}",
        f"checkpoint.save={save}",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(workspace, save: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_elastic.train", *_args(workspace, save, *extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=_env())


def _torchrun(workspace, save: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--standalone",  # (a free port: other tests may run torchrun beside it)
        "-m",
        "megatron_elastic.train",
        *_args(workspace, save, *extra),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=_env())


def _start(workspace, save: Path, log: Path, *extra: str) -> subprocess.Popen:
    """The trainer in its own process group, output to ``log`` (a pipe would stay open in the
    checkpoint writer processes it spawns)."""
    return subprocess.Popen(
        [sys.executable, "-m", "megatron_elastic.train", *_args(workspace, save, *extra)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=_env(),
        start_new_session=True,
    )


def _losses(save: Path) -> dict[int, dict[str, float]]:
    """Per step, the logged per-budget losses (the last record of a step wins: a resumed run
    re-logs the steps after its checkpoint)."""
    out: dict[int, dict[str, float]] = {}
    for line in (save / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses = {k: v for k, v in record.items() if k.startswith("loss/")}
        if losses:
            out[record["step"]] = losses
    return out


def _wait_for_step(save: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early with status {proc.returncode}")
        metrics = save / "metrics.jsonl"
        if metrics.is_file() and step in _losses(save):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} never logged")


@pytest.fixture(scope="module")
def uninterrupted(workspace, tmp_path_factory) -> tuple[Path, dict[int, dict[str, float]]]:
    """12 steps without interruption (checkpoints every 2): the save directory and its losses."""
    whole = tmp_path_factory.mktemp("uninterrupted") / "whole"
    done = _train(workspace, whole, "train.steps=12")
    assert done.returncode == 0, done.stderr[-3000:]
    reference = _losses(whole)
    assert sorted(reference) == list(range(1, 13))
    return whole, reference


def test_invariant_resume_after_sigkill_reproduces_the_uninterrupted_run(
    workspace, uninterrupted, tmp_path
) -> None:
    steps = "train.steps=12"
    whole, reference = uninterrupted

    killed = tmp_path / "killed"
    proc = _start(workspace, killed, tmp_path / "killed.log", steps)
    _wait_for_step(killed, 3, proc)  # step 2 is saved; the kill lands mid-run
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, like SLURM's kill of a step
    proc.wait()
    saved = json.loads((killed / "latest.json").read_text())["step"]
    assert 2 <= saved < 12 and not (killed / "step_0000012").exists()

    resumed = _train(workspace, killed, steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed / f'step_{saved:07d}'}" in resumed.stdout
    got = _losses(killed)
    for step in range(saved + 1, 13):
        assert got[step] == reference[step], (step, got[step], reference[step])
    final, ref_final = load_extra(killed / "step_0000012"), load_extra(whole / "step_0000012")
    for name, tensor in ref_final["state_dict"].items():  # the router too, bit for bit
        assert (final["state_dict"][name] == tensor).all(), name


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_tensors", "before_manifest", "before_latest"])
def test_invariant_kill_inside_save_resumes_from_the_last_complete_checkpoint(
    workspace, uninterrupted, tmp_path, point
) -> None:
    """SIGKILL at several points inside the second save (step 4): ``latest.json`` still names
    step 2, complete and verified; the resumed run logs the uninterrupted run's losses (it stops
    at step 6; the LR schedule keeps the 12-step horizon it was saved with)."""
    _, reference = uninterrupted
    save = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "tests/unit/kill_in_save.py"), point, "2"]
    proc = subprocess.run(
        [*cmd, *_args(workspace, save, "train.steps=12")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=_env(),
        start_new_session=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    latest = json.loads((save / "latest.json").read_text())
    assert (latest["checkpoint"], latest["history"]) == ("step_0000002", ["step_0000002"])
    assert (save / "step_0000004").is_dir() == (point == "before_latest")
    assert list(save.glob(".step_0000004*")) or point == "before_latest"  # the partial save

    resumed = _train(workspace, save, "train.steps=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {save / 'step_0000002'}" in resumed.stdout
    got = _losses(save)
    for step in range(3, 7):
        assert got[step] == reference[step], (step, got[step], reference[step])
    latest = json.loads((save / "latest.json").read_text())
    assert latest["history"] == ["step_0000006", "step_0000004"]  # keep_last 2
    assert sorted(p.name for p in save.iterdir() if p.name.startswith((".step", "step"))) == [
        "step_0000004",
        "step_0000006",
    ]  # older checkpoints and the interrupted save's leftovers are gone


def test_invariant_damaged_latest_checkpoint_names_the_file_and_the_previous_one(
    workspace, uninterrupted, tmp_path
) -> None:
    """A flipped byte in the newest checkpoint's shard stops the resume before training with
    the file named and the way back: delete it, and the run resumes from the previous one."""
    whole, _ = uninterrupted
    save = tmp_path / "run"
    shutil.copytree(whole, save)
    shard = sorted((save / "step_0000012" / "weights").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    done = _train(workspace, save, "train.steps=12")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    error = done.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: "), done.stderr[-2000:]
    assert f"weights/{shard.name}" in error[0] and "checksum" in error[0]
    assert f"training resumes from {save / 'step_0000010'}" in error[0]
    shutil.rmtree(save / "step_0000012")
    resumed = _train(workspace, save, "train.steps=11")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {save / 'step_0000010'}" in resumed.stdout


def test_sigterm_saves_a_loadable_checkpoint_and_exits_0(workspace, tmp_path) -> None:
    save, log = tmp_path / "run", tmp_path / "run.log"
    proc = _start(workspace, save, log, "train.steps=40", "checkpoint.save_interval=100")
    _wait_for_step(save, 2, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=TIMEOUT_S)
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "preemption signal" in out
    latest = json.loads((save / "latest.json").read_text())
    manifest = read_manifest(save / latest["checkpoint"])
    step = manifest["metadata"]["progress"]["step"]
    assert 2 <= step < 40 and manifest["kind"] == "elastic" and manifest["has_optimizer"]
    assert "router_optimizer" in load_extra(save / latest["checkpoint"])
    # ...and training continues from it.
    resumed = _train(workspace, save, f"train.steps={step + 1}", "checkpoint.save_interval=100")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {save / latest['checkpoint']}" in resumed.stdout
    assert "the LR schedule keeps the horizon of 40 steps" in resumed.stdout


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(workspace, tmp_path) -> None:
    first = tmp_path / "first"
    done = _train(workspace, first, "train.steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    # Resuming with other optimizer settings is refused before any compute...
    done = _train(workspace, first, "train.steps=4", "optim.lr=1.0e-2")
    assert done.returncode == 2 and "other optimizer settings" in done.stderr, done.stderr[-2000:]
    # ...a new stage from it may change them: an absurd learning rate blows the weights up.
    save = tmp_path / "run"
    done = _train(
        workspace,
        save,
        f"checkpoint.init={first}",
        "checkpoint.save_interval=1",
        "train.steps=20",
        "optim.lr=1.0e+30",
        "optim.min_lr=1.0e+29",
    )
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert "non-finite" in done.stdout and "last good checkpoint" in done.stdout
    bad_step = int(done.stdout.split("non-finite loss or gradient at step ")[1].split()[0])
    latest = json.loads((save / "latest.json").read_text())
    assert latest["step"] == bad_step - 1 >= 1
    manifest = read_manifest(save / latest["checkpoint"])
    assert manifest["metadata"]["progress"]["step"] == latest["step"]


@pytest.mark.distributed
def test_invariant_tp2_checkpoint_resumes_at_tp1_with_the_same_loss(workspace, tmp_path) -> None:
    tp2 = tmp_path / "tp2"
    done = _torchrun(workspace, tp2, "parallel.tensor_parallel_size=2", "train.steps=3")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    reference = _losses(tp2)
    tp1 = tmp_path / "tp1"
    tp1.mkdir()
    shutil.copytree(tp2 / "step_0000002", tp1 / "step_0000002")
    (tp1 / "latest.json").write_text(json.dumps({"checkpoint": "step_0000002", "step": 2}))
    resumed = _train(workspace, tp1, "train.steps=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "RNG not restored" in resumed.stdout  # another world size: said, not hidden
    got = _losses(tp1)[3]
    for name, value in reference[3].items():
        assert math.isclose(got[name], value, rel_tol=1e-5, abs_tol=1e-6), (name, got, reference)


def test_distillation_lowers_the_small_budget_kd_loss(workspace, tmp_path) -> None:
    save = tmp_path / "kd"
    done = _train(
        workspace,
        save,
        "train.steps=30",
        "checkpoint.save_interval=100",
        "budget_sampling={full: 0.25, half: 0.75}",
        "optim.warmup_steps=3",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    half = [v["loss/half"] for _, v in sorted(_losses(save).items()) if "loss/half" in v]
    assert len(half) >= 15
    first, last = sum(half[:5]) / 5, sum(half[-5:]) / 5
    assert last < 0.7 * first, half
    assert list((save / "tensorboard").rglob("events.out.tfevents.*"))


@pytest.mark.distributed
def test_invariant_pp2_distillation_matches_one_process(workspace, tmp_path) -> None:
    """Student and teacher cross the pipeline stages as one tensor: PP=2 trains exactly like one
    process (losses of every step, including after optimizer and router updates)."""
    one = tmp_path / "one"
    done = _train(workspace, one, "train.steps=3")
    assert done.returncode == 0, done.stderr[-3000:]
    pp2 = tmp_path / "pp2"
    done = _torchrun(workspace, pp2, "parallel.pipeline_parallel_size=2", "train.steps=3")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    reference, got = _losses(one), _losses(pp2)
    assert sorted(got) == [1, 2, 3]
    for step, losses in reference.items():
        assert got[step].keys() == losses.keys(), step
        for name, value in losses.items():
            assert math.isclose(got[step][name], value, rel_tol=1e-5, abs_tol=1e-6), (step, name)


@pytest.mark.distributed
@pytest.mark.slow
def test_invariant_sequence_and_context_parallel_distillation_matches_one_process(
    workspace, tmp_path
) -> None:
    """TP 2 with sequence parallelism x CP 2 x PP 2 (8 processes): the distillation run (frozen
    teacher, router, optimizer) logs the per-budget losses of one process at every step.

    A small model LR: Adam turns gradient components at fp32-noise level into full-size updates,
    so at the fixture's LR 3e-3 even plain TP 2 (no SP/CP) drifts 3e-4 (relative) from one
    process in the tiny KD loss by step 3 (measured); at 1e-5 TP 2 stays within 6e-6."""
    cp_elastic = (
        "elastic=elastic_cp.yaml",
        "train.steps=3",
        "optim.lr=1.0e-5",
        "optim.min_lr=1.0e-6",
    )
    one = tmp_path / "one"
    done = _train(workspace, one, *cp_elastic)
    assert done.returncode == 0, done.stderr[-3000:]
    par = tmp_path / "sp_cp_pp"
    done = _torchrun(
        workspace,
        par,
        *cp_elastic,
        "parallel.tensor_parallel_size=2",
        "parallel.sequence_parallel=true",
        "parallel.context_parallel_size=2",
        "parallel.pipeline_parallel_size=2",
        nproc=8,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "TP 2 PP 2 CP 2 DP 1 SP" in done.stdout
    reference, got = _losses(one), _losses(par)
    assert sorted(got) == [1, 2, 3] and len({k for v in got.values() for k in v}) >= 2
    for step, losses in reference.items():
        assert got[step].keys() == losses.keys(), step
        for name, value in losses.items():
            assert math.isclose(got[step][name], value, rel_tol=1e-5, abs_tol=1e-6), (step, name)


def test_self_teacher_distils_from_the_full_budget(workspace, pgs, tmp_path) -> None:
    """``distill.teacher: self``: the full budget of the shared weights teaches (no gradient), and
    the student's sub-network is restored after the teacher's forward."""
    import torch

    from megatron_elastic.distill import kd_kl_loss
    from megatron_elastic.distill.pair import DistillationPair
    from megatron_elastic.elastic import SubnetSpec, build_elastic_model, load_elastic_recipe
    from megatron_elastic.training.lm_step import position_ids_like

    cfg, elastic = load_elastic_recipe(FIXTURE / "elastic.yaml")
    torch.manual_seed(0)
    model = build_elastic_model(cfg, elastic, pgs)
    pair = DistillationPair(model, None, temperature=2.0, ce_weight=0.0, tp_group=pgs.tp)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    pos, mask = position_ids_like(tokens), torch.ones(2, 24)
    half = SubnetSpec.homogeneous(cfg, hidden=48, attention_heads=2, mamba_heads=2, ffn=64)
    with torch.no_grad():
        model.set_subnet(None)
        full_logits = model(tokens, pos, None)
        model.set_subnet(half)
        half_logits = model(tokens, pos, None)
    pair.set_student(half, None)
    kd = pair(tokens, pos, None, labels=tokens, loss_mask=mask)
    expected = kd_kl_loss(half_logits, full_logits, 2.0)
    # (fp32 noise: the pair runs with autograd, the reference without)
    assert torch.allclose(kd, expected, rtol=1e-3, atol=1e-5), (kd - expected).abs().max()
    assert expected.min().item() > 1e-4  # the half network really differs from its teacher
    assert model.subnet is half  # restored after the teacher ran at full size
    kd.sum().backward()  # gradients reach the shared weights through the student only
    assert model.embedding.word_embeddings.weight.grad is not None
    pair.set_student(None, None)
    assert pair(tokens, pos, None, labels=tokens, loss_mask=mask).abs().max().item() < 1e-6

    # ...and the trainer runs with it (no teacher checkpoint loaded).
    save = tmp_path / "self"
    done = _train(workspace, save, "train.steps=2", "distill.teacher=self")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "teacher:" not in done.stdout
    assert all(math.isfinite(v) for r in _losses(save).values() for v in r.values())


def test_elastic_without_a_teacher_trains_and_validates_every_budget(workspace, tmp_path) -> None:
    """``distill.teacher: none``: one cross-entropy loss for the mix of budgets (``loss/all``),
    and the final validation still reports every trained budget at the router's choice."""
    save = tmp_path / "no_teacher"
    done = _train(workspace, save, "train.steps=2", "distill.teacher=none")
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(set(v) == {"loss/all"} for v in _losses(save).values())
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    valid = {k for r in records for k in r if k.startswith("valid/")}
    assert valid == {"valid/full", "valid/half"}, valid


def test_fixed_architecture_distils_one_size_with_a_frozen_router(workspace, tmp_path) -> None:
    """``router.fixed`` (Minitron-style: one pruned size distilled alone): every step trains the
    recipe's fixed architecture, the router stays at its initial weights with no optimizer, and
    the saved router serves that architecture."""
    import torch

    from megatron_elastic.checkpoint import manifest_model
    from megatron_elastic.elastic import load_elastic_recipe
    from megatron_elastic.elastic.architectures import budget_specs
    from megatron_elastic.router import ElasticRouter, router_from_state

    save = tmp_path / "fixed"
    done = _train(
        workspace,
        save,
        "train.steps=10",
        "router.fixed=true",
        "budget_sampling={half: 1.0}",
        "checkpoint.save_interval=100",
        "optim.warmup_steps=2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    losses = _losses(save)
    assert all(set(v) == {"loss/half"} for v in losses.values()), losses
    half = [losses[s]["loss/half"] for s in sorted(losses)]
    assert sum(half[-3:]) / 3 < sum(half[:3]) / 3, half
    path = save / json.loads((save / "latest.json").read_text())["checkpoint"]
    extra = load_extra(path)
    assert "router_optimizer" not in extra and extra["router_config"]["fixed"] is True
    model = manifest_model(read_manifest(path))
    router = router_from_state(model, extra)
    _, elastic = load_elastic_recipe(FIXTURE / "elastic.yaml")
    assert router.elastic_config.budgets == elastic.budgets
    fresh = ElasticRouter(model, router.elastic_config, router.config)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, router.state_dict()[key]), key  # never stepped
    spec = budget_specs(model, router.elastic_config)["half"][0]
    assert router.decide("half", 0, None, deterministic=True).spec == spec
    metrics = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    ratios = [m["router/target_ratio/half"] for m in metrics if "router/target_ratio/half" in m]
    assert ratios and len(set(ratios)) == 1  # one architecture all run long
