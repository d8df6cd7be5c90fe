"""The stage launch scripts (slurm/stage1_8k.sh, slurm/stage2_49k.sh) on a real local SLURM
cluster, pointed at the tiny recipe: 2 tasks per job on CPU with gloo.

Once per module: a small corpus, tokenizer and datasets, a freshly initialised tiny parent ranked
by tools/estimate_importance.py (one Python process running the tools' own `main`s). Then stage 1
(data parallel 2) is preempted with SIGUSR1 as SLURM's `--signal=B:USR1@300` would do: the script
passes it to the trainer, which saves and exits 0, and the job requeues itself; the stage is then
submitted again and resumes from the same save directory. Stage 2 (tensor parallel 2) starts from
stage 1's save directory. Every job's exit status, log lines, checkpoints and metrics are checked.

Failures: a stage-1 job whose task is killed (kill -9) while it steps requeues itself, resumes
from its newest checkpoint and ends with the losses of the uninterrupted run; a trainer that
diverges (exit 3) or gets bad input (exit 2) is never requeued; MAX_RESTARTS used up ends the job
with the failure's status (that one test runs a stand-in for the trainer: see its docstring).

The dry-run tests at the end check the scripts' input validation and the srun line (container
options, SRUN_ARGS, a data blend) without a cluster (fast).
"""

from __future__ import annotations

import getpass
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STAGE1 = REPO / "slurm" / "stage1_8k.sh"
STAGE2 = REPO / "slurm" / "stage2_49k.sh"
BUDGETS = {"full", "75%", "50%"}  # examples/tiny/elastic.yaml
STAGE1_STEPS = 6
STAGE2_STEPS = 4
TRAIN_TIMEOUT_S = 300
# Job states after which a job runs no more.
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}

# Very small runs: seq 64, 4 sequences per step, one sequence per micro-batch.
TINY_OVERRIDES = (
    "train.seq_length=64 train.micro_batch_size=1 train.global_batch_size=4 "
    "optim.warmup_steps=1 router.warmup_steps=1 data.valid_samples=4 logging.log_interval=1"
)
# 2 tasks on one node without GPUs: override the scripts' 16-node 8-GPU #SBATCH lines.
TINY_SBATCH = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1")

PREPARE = textwrap.dedent(
    """\
    # Inputs of the stage jobs, made by the tools' own entry points in one process (one import of
    # megatron instead of five): corpora, tokenizer + datasets, a fresh tiny parent, its ranking.
    import runpy
    import sys
    from pathlib import Path


    def tool(repo, name, *args):
        main = runpy.run_path(str(repo / "tools" / f"{name}.py"))["main"]
        status = main([str(a) for a in args])
        if status:
            sys.exit(f"tools/{name}.py {' '.join(map(str, args))} exited {status}")


    def prepare(repo, work):
        data = work / "data"
        tool(repo, "make_tiny_corpus", "--output", work / "corpus", "--num-train", 160,
             "--num-valid", 8)
        tool(repo, "make_tiny_corpus", "--output", work / "corpus_long", "--num-train", 60,
             "--num-valid", 4, "--problem-size", "long")
        tool(repo, "prepare_data", "--input", work / "corpus" / "train.jsonl",
             "--train-tokenizer", 512, "--append-eod", "--output", data / "train")
        tool(repo, "prepare_data", "--input", work / "corpus_long" / "train.jsonl",
             "--tokenizer", data / "tokenizer.json", "--append-eod", "--output",
             data / "train_long")

        import torch

        from megatron_elastic.checkpoint import save_checkpoint
        from megatron_elastic.config import ParallelConfig, load_model_config
        from megatron_elastic.model import build_hybrid_model
        from megatron_elastic.parallel import init_process_groups

        cfg = load_model_config(repo / "examples" / "tiny" / "model.yaml")
        pgs = init_process_groups(ParallelConfig(), seed=1)
        torch.manual_seed(1)
        save_checkpoint(work / "parent", build_hybrid_model(cfg, pgs), cfg, kind="parent")
        tool(repo, "estimate_importance", "--elastic-config",
             repo / "examples" / "tiny" / "elastic.yaml", "--checkpoint", work / "parent",
             "--data", data / "train", "--output", work / "ranked", "--num-samples", 4,
             "--batch-size", 4, "--seq-length", 64)


    # Guarded: checkpoint saving starts helper processes that import this file again.
    if __name__ == "__main__":
        prepare(Path(sys.argv[1]), Path(sys.argv[2]))
    """
)


@dataclass
class Job:
    job_id: str
    fields: dict[str, str]  # `scontrol show job`, read as soon as the job ended
    output: str  # the job's output file


@dataclass
class Pipeline:
    work: Path
    preempted: Job  # stage 1, signalled after it started stepping (record: once requeued)
    stage1: Job  # stage 1 submitted again: resumes and finishes
    stage2: Job


def _output(work: Path, job_id: str) -> str:
    path = work / "logs" / f"job-{job_id}.out"
    return path.read_text() if path.exists() else "<no output file>"


def _job_env(work: Path, **env: str) -> dict[str, str]:
    return {
        "PYTHON": sys.executable,
        "TP": "1",
        "PP": "1",
        "TOKENIZER": str(work / "data" / "tokenizer.json"),
        "PARENT": str(work / "ranked"),
        "PYTHONWARNINGS": "ignore",
        **env,
    }


def _sbatch_args(work: Path) -> tuple[str, ...]:
    # 20 minutes: more than stage 2's SIGUSR1 lead (--signal=B:USR1@600), which a 10-minute limit
    # would send at once.
    return (*TINY_SBATCH, "--time=20", f"--output={work}/logs/job-%j.out")


def _run_stage(cluster, work: Path, script: Path, env: dict[str, str]) -> Job:
    job_id, _ = cluster.sbatch_wait(
        *_sbatch_args(work), script, cwd=work, env=env, timeout=TRAIN_TIMEOUT_S
    )
    fields = cluster.wait_ended(job_id)
    return Job(job_id, fields, _output(work, job_id))


@pytest.fixture(scope="module")
def pipeline(cluster, tmp_path_factory) -> Pipeline:
    work = tmp_path_factory.mktemp("slurm_training")
    (work / "logs").mkdir()
    prepare = work / "prepare.py"
    prepare.write_text(PREPARE)
    done = subprocess.run(
        [sys.executable, str(prepare), str(REPO), str(work)],
        capture_output=True,
        text=True,
        timeout=TRAIN_TIMEOUT_S,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    stage1_env = _job_env(
        work,
        RECIPE=str(REPO / "examples" / "tiny" / "stage1.yaml"),
        DATA_PREFIX=str(work / "data" / "train"),
        SAVE_DIR="stage1",  # relative to the job's working directory
        EXTRA_OVERRIDES=f"train.steps={STAGE1_STEPS} {TINY_OVERRIDES}",
    )
    # Stage 1, preempted: SIGUSR1 to the batch shell (as --signal=B:USR1@300 sends it) once the
    # trainer runs (every rank has installed its handler before the rendezvous this line follows).
    job_id = cluster.submit(*_sbatch_args(work), STAGE1, cwd=work, env=stage1_env)
    started = "[train] stage stage1 (elastic)"
    fields = cluster.wait_job(
        job_id, lambda f: started in _output(work, job_id) or f.get("JobState") in FINAL_STATES
    )
    assert started in _output(work, job_id), (fields, _output(work, job_id)[-4000:])
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    # The script requeues the job after the trainer saved. slurmctld then holds it for the
    # credential lifetime (cred_expire, 120 s by default) before it may run again: rather than
    # wait, cancel it and submit the stage again, which resumes from the same save directory.
    requeued = cluster.wait_job(
        job_id,
        lambda f: (f.get("Restarts") == "1" and f.get("JobState") == "PENDING")
        or f.get("JobState") in FINAL_STATES,
    )
    assert requeued.get("JobState") == "PENDING", (requeued, _output(work, job_id)[-4000:])
    preempted = Job(job_id, requeued, _output(work, job_id))
    cluster.run("scancel", job_id)
    cluster.wait_ended(job_id)
    stage1 = _run_stage(cluster, work, STAGE1, stage1_env)

    stage2_env = _job_env(
        work,
        RECIPE=str(REPO / "examples" / "tiny" / "stage2.yaml"),
        TP="2",
        DATA_PREFIX=str(work / "data" / "train_long"),
        STAGE1_DIR="stage1",
        SAVE_DIR="stage2",
        EXTRA_OVERRIDES=f"train.steps={STAGE2_STEPS} {TINY_OVERRIDES}",
    )
    stage2 = _run_stage(cluster, work, STAGE2, stage2_env)
    return Pipeline(work, preempted, stage1, stage2)


def _completed(job: Job) -> None:
    assert job.fields.get("JobState") == "COMPLETED", (job.fields, job.output[-4000:])
    assert job.fields.get("ExitCode") == "0:0", (job.fields, job.output[-4000:])


def _loss_lines(job: Job, stage: str, steps: int) -> list[str]:
    return re.findall(rf"^\[train\] {stage} step \d+/{steps} loss .*$", job.output, re.M)


def _check_checkpoint(save: Path, steps: int) -> Path:
    from megatron_elastic.checkpoint import read_manifest

    latest = json.loads((save / "latest.json").read_text())
    assert latest["step"] == steps, latest
    path = save / latest["checkpoint"]
    manifest = read_manifest(path)
    assert manifest["kind"] == "elastic", manifest
    assert manifest["metadata"]["progress"]["step"] == steps, manifest["metadata"]
    assert manifest["world_size"] == 2, manifest
    return path


def _check_metrics(save: Path, steps: int) -> None:
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    losses = {k: v for row in rows for k, v in row.items() if k.startswith("loss/")}
    assert {k.removeprefix("loss/") for k in losses} == BUDGETS, rows
    for row in rows:
        for key, value in row.items():
            if key.startswith("loss/"):
                assert math.isfinite(value) and value >= 0, row
    assert max(row["step"] for row in rows) == steps, rows
    assert list((save / "tensorboard").rglob("events.out.tfevents.*")), "no tensorboard events"


@pytest.mark.slow
@pytest.mark.distributed
def test_stage1_preempted_saves_and_requeues(pipeline: Pipeline) -> None:
    out = pipeline.preempted.output
    assert "received SIGUSR1" in out, out[-4000:]
    match = re.search(r"preemption signal: saved step (\d+), exiting cleanly", out)
    assert match, out[-4000:]
    assert int(match.group(1)) < STAGE1_STEPS, "the signal came too late to test a resume"
    assert "trainer exited with status 0" in out, out[-4000:]
    assert f"requeueing job {pipeline.preempted.job_id}" in out, out[-4000:]
    assert pipeline.preempted.fields.get("Requeue") == "1", pipeline.preempted.fields


@pytest.mark.slow
@pytest.mark.distributed
def test_stage1_resumes_and_completes(pipeline: Pipeline) -> None:
    job, save = pipeline.stage1, pipeline.work / "stage1"
    _completed(job)
    saved = re.search(r"preemption signal: saved step (\d+)", pipeline.preempted.output)
    assert saved, pipeline.preempted.output[-4000:]
    step = int(saved.group(1))
    assert f"resumed from stage1/step_{step:07d} at step {step}" in job.output, job.output[-4000:]
    assert "TP 1 PP 1 DP 2" in job.output, job.output[-4000:]
    lines = _loss_lines(job, "stage1", STAGE1_STEPS)
    assert lines and lines[-1].startswith(f"[train] stage1 step {STAGE1_STEPS}/"), job.output
    _check_checkpoint(save, STAGE1_STEPS)
    _check_metrics(save, STAGE1_STEPS)


@pytest.mark.slow
@pytest.mark.distributed
def test_stage2_starts_from_stage1_and_completes(pipeline: Pipeline) -> None:
    from megatron_elastic.checkpoint import load_extra

    job, save = pipeline.stage2, pipeline.work / "stage2"
    _completed(job)
    assert f"initialised from stage1/step_{STAGE1_STEPS:07d} (elastic)" in job.output, job.output
    assert "TP 2 PP 1 DP 1" in job.output, job.output[-4000:]
    lines = _loss_lines(job, "stage2", STAGE2_STEPS)
    assert len(lines) == STAGE2_STEPS, job.output[-4000:]
    for line in lines:  # per-budget losses: "loss 50% 0.0052 75% 0.0047 full 0.0045"
        assert re.search(r" loss ((full|75%|50%) \d+\.\d+ )+", line), line
    path = _check_checkpoint(save, STAGE2_STEPS)
    extra = load_extra(path)
    assert {"state_dict", "router_config", "elastic_config", "router_optimizer"} <= set(extra)
    assert set(extra["elastic_config"]["budgets"]) == BUDGETS
    # The router's schedules continue across the curriculum: stage 1's steps plus stage 2's.
    from megatron_elastic.checkpoint import read_manifest

    progress = read_manifest(path)["metadata"]["progress"]
    assert progress["router_step"] == STAGE1_STEPS + STAGE2_STEPS, progress
    _check_metrics(save, STAGE2_STEPS)


@pytest.mark.slow
@pytest.mark.distributed
def test_trainer_bad_input_is_the_jobs_exit_status(cluster, pipeline: Pipeline) -> None:
    # A typo in an override passes the script's checks; the trainer rejects it on every task
    # (exit 2, before any compute) and the job fails with that status, without a requeue.
    env = _job_env(
        pipeline.work,
        RECIPE=str(REPO / "examples" / "tiny" / "stage1.yaml"),
        DATA_PREFIX=str(pipeline.work / "data" / "train"),
        SAVE_DIR="bad",
        EXTRA_OVERRIDES="train.stpes=3",
        MAX_RESTARTS="2",
    )
    job = _run_stage(cluster, pipeline.work, STAGE1, env)
    assert job.fields.get("JobState") == "FAILED", (job.fields, job.output[-4000:])
    assert job.fields.get("ExitCode") == "2:0", (job.fields, job.output[-4000:])
    assert job.fields.get("Restarts") == "0", job.fields
    assert "did you mean 'steps'" in job.output, job.output[-4000:]
    assert "Traceback" not in job.output, job.output[-4000:]
    assert "trainer exited with status 2" in job.output, job.output[-4000:]
    assert "not requeued: status 2 (bad input)" in job.output, job.output[-4000:]
    assert not (pipeline.work / "bad").exists()


# --- failures: requeue after a crash, never after exit 2 or 3 ------------------------------------


def _task_trainer_pid(job_id: str, task: int) -> int | None:
    """The pid of the trainer process of task ``task`` of job ``job_id`` (the process the task's
    shell exec'd: SLURM's variables in its environment, ``-m megatron_elastic.train`` in its
    command line), or None while there is none."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = set((proc / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if (
            b"megatron_elastic.train" in cmdline
            and f"SLURM_JOB_ID={job_id}".encode() in environ
            and f"SLURM_PROCID={task}".encode() in environ
        ):
            return int(proc.name)
    return None


def _metrics_by_step(save: Path) -> dict[int, list[dict[str, float]]]:
    """Each step's logged losses and gradient norm, every row of it (a resumed run logs again
    the steps after its checkpoint)."""
    rows: dict[int, list[dict[str, float]]] = {}
    for line in (save / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        kept = {k: v for k, v in row.items() if k.startswith("loss/") or k == "grad_norm"}
        if kept:
            rows.setdefault(row["step"], []).append(kept)
    return rows


@dataclass
class Crash:
    job: Job
    killed_pid: int
    save: Path


@pytest.fixture(scope="module")
def crash(cluster, pipeline: Pipeline) -> Crash:
    """Stage 1 again (the same recipe and data as the pipeline's), saving every 2 steps; task 1's
    trainer is killed with SIGKILL once step 3 is logged. The job requeues itself, resumes from
    its newest checkpoint and finishes."""
    work = pipeline.work
    env = _job_env(
        work,
        RECIPE=str(REPO / "examples" / "tiny" / "stage1.yaml"),
        DATA_PREFIX=str(work / "data" / "train"),
        SAVE_DIR="crash",
        EXTRA_OVERRIDES=f"train.steps={STAGE1_STEPS} {TINY_OVERRIDES} checkpoint.save_interval=2",
        MAX_RESTARTS="1",
    )
    job_id = cluster.submit(*_sbatch_args(work), STAGE1, cwd=work, env=env)
    stepping = f"[train] stage1 step 3/{STAGE1_STEPS} "
    cluster.wait_job(
        job_id,
        lambda f: stepping in _output(work, job_id) or f.get("JobState") in FINAL_STATES,
        timeout=TRAIN_TIMEOUT_S,
    )
    assert stepping in _output(work, job_id), _output(work, job_id)[-4000:]
    pid = _task_trainer_pid(job_id, 1)
    assert pid is not None, _output(work, job_id)[-4000:]
    os.kill(pid, signal.SIGKILL)
    # A requeued job passes through non-final states only (REQUEUED, PENDING, RUNNING).
    fields = cluster.wait_ended(job_id, timeout=TRAIN_TIMEOUT_S)
    return Crash(Job(job_id, fields, _output(work, job_id)), pid, work / "crash")


@pytest.mark.slow
@pytest.mark.distributed
def test_killed_task_requeues_and_resumes(crash: Crash) -> None:
    job = crash.job
    _completed(job)
    assert job.fields.get("Restarts") == "1", job.fields
    assert "elastic_failures=1" in job.fields.get("Comment", ""), job.fields
    match = re.search(r"trainer exited with status (\d+)", job.output)
    assert match and match.group(1) not in ("0", "2", "3"), job.output[-4000:]
    assert (
        f"trainer failed with status {match.group(1)}: restart 1 of MAX_RESTARTS=1" in job.output
    ), job.output[-4000:]
    assert f"requeueing job {job.job_id} to resume from the newest checkpoint" in job.output
    resumed = re.search(r"resumed from crash/step_(\d{7}) at step (\d+)", job.output)
    assert resumed, job.output[-4000:]
    step = int(resumed.group(2))
    assert 2 <= step < STAGE1_STEPS, job.output[-4000:]
    assert job.output.count("trainer exited with status 0") == 1, job.output[-4000:]
    _check_checkpoint(crash.save, STAGE1_STEPS)


@pytest.mark.slow
@pytest.mark.distributed
def test_resumed_run_has_the_uninterrupted_losses(crash: Crash, pipeline: Pipeline) -> None:
    got = _metrics_by_step(crash.save)
    assert sorted(got) == list(range(1, STAGE1_STEPS + 1)), got
    # The steps after the checkpoint ran twice: before the kill and after the resume.
    assert any(len(rows) > 1 for rows in got.values()), got
    # Every row equals the pipeline's stage 1 (same recipe, data and seeds; its own preemption
    # resumed exactly where it saved), and the repeated steps equal their first run.
    reference = _metrics_by_step(pipeline.work / "stage1")
    for step, rows in got.items():
        (expected,) = {json.dumps(r, sort_keys=True) for r in reference[step]}
        for row in rows:
            assert row == json.loads(expected), (step, row, expected)


@pytest.mark.slow
@pytest.mark.distributed
def test_nan_loss_is_not_requeued(cluster, pipeline: Pipeline) -> None:
    # The real trainer with a learning rate that overflows the weights at the first update: the
    # second step's loss is not finite, every rank exits 3, and the job fails with 3, unrequeued.
    env = _job_env(
        pipeline.work,
        RECIPE=str(REPO / "examples" / "tiny" / "stage1.yaml"),
        DATA_PREFIX=str(pipeline.work / "data" / "train"),
        SAVE_DIR="nan",
        EXTRA_OVERRIDES=f"train.steps=3 {TINY_OVERRIDES} optim.lr=1.0e+30 optim.warmup_steps=0",
        MAX_RESTARTS="2",
    )
    job = _run_stage(cluster, pipeline.work, STAGE1, env)
    assert job.fields.get("JobState") == "FAILED", (job.fields, job.output[-4000:])
    assert job.fields.get("ExitCode") == "3:0", (job.fields, job.output[-4000:])
    assert job.fields.get("Restarts") == "0", job.fields
    assert "non-finite loss or gradient at step" in job.output, job.output[-4000:]
    assert "not requeued: status 3 (NaN/inf loss)" in job.output, job.output[-4000:]


STAND_IN = """#!/bin/bash
# Stands in for the trainer's interpreter: prints what the task sees, then fails with status 7.
echo "task $RANK/$WORLD_SIZE local $LOCAL_RANK args $*"
for name in TRITON_CACHE_DIR PYTORCH_CUDA_ALLOC_CONF TORCH_NCCL_AVOID_RECORD_STREAMS \\
    TORCH_NCCL_ASYNC_ERROR_HANDLING CUDA_DEVICE_MAX_CONNECTIONS SITE_SETTING PYTHONPATH; do
  echo "task $RANK env $name=${!name}"
done
exit 7
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_max_restarts_exhausted_fails_with_the_status(cluster, pipeline: Pipeline) -> None:
    """The launcher's policy with a stand-in for the trainer: PYTHON is a script that prints the
    environment its task sees and exits 7 (a crash: not 0, 2 or 3) at once, so the job fails,
    requeues once (MAX_RESTARTS=1), fails again and ends with status 7. The stand-in also shows
    that ENV_FILE's settings and the site defaults reach every task. (Real trainer failures are
    covered above: the kill -9, exit 2 and exit 3 tests.)"""
    work = pipeline.work
    stand_in = work / "crashing_python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    site = work / "site.env"
    site.write_text("export SITE_SETTING=from-env-file\nexport TORCH_NCCL_AVOID_RECORD_STREAMS=0\n")
    env = _job_env(
        work,
        PYTHON=str(stand_in),
        RECIPE=str(REPO / "examples" / "tiny" / "stage1.yaml"),
        DATA_PREFIX=str(work / "data" / "train"),
        SAVE_DIR="exhausted",
        MAX_RESTARTS="1",
        ENV_FILE=str(site),
    )
    job_id = cluster.submit(*_sbatch_args(work), STAGE1, cwd=work, env=env)
    fields = cluster.wait_ended(job_id, timeout=TRAIN_TIMEOUT_S)
    out = _output(work, job_id)
    assert fields.get("Restarts") == "1", (fields, out[-4000:])
    assert fields.get("JobState") == "FAILED", (fields, out[-4000:])
    assert fields.get("ExitCode") == "7:0", (fields, out[-4000:])
    assert out.count("trainer exited with status 7") == 2, out[-4000:]
    assert "trainer failed with status 7: restart 1 of MAX_RESTARTS=1" in out, out[-4000:]
    assert "MAX_RESTARTS=1 exhausted: failing with status 7" in out, out[-4000:]
    for rank in (0, 1):
        assert f"task {rank}/2 local {rank} args -m megatron_elastic.train --config" in out, out
        for setting in (
            f"TRITON_CACHE_DIR=/tmp/triton-{getpass.getuser()}-{job_id}",
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
            "TORCH_NCCL_AVOID_RECORD_STREAMS=0",  # ENV_FILE's value wins over the default
            "TORCH_NCCL_ASYNC_ERROR_HANDLING=3",
            "CUDA_DEVICE_MAX_CONNECTIONS=1",
            "SITE_SETTING=from-env-file",
            f"PYTHONPATH={REPO}",
        ):
            assert f"task {rank} env {setting}" in out, out[-4000:]


# --- the scripts' input validation, without a cluster (DRY_RUN=1) --------------------------------


@pytest.fixture
def inputs(tmp_path) -> dict[str, str]:
    """Files that pass the scripts' checks (they are not read: nothing runs)."""
    for name in ("train.bin", "train.idx", "tokenizer.json"):
        (tmp_path / name).write_text("")
    (tmp_path / "ranked").mkdir()
    (tmp_path / "ranked" / "manifest.json").write_text("{}")
    return {
        "DATA_PREFIX": str(tmp_path / "train"),
        "TOKENIZER": str(tmp_path / "tokenizer.json"),
        "PARENT": str(tmp_path / "ranked"),
        "PYTHON": sys.executable,
    }


def _dry_run(script: Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for key in (
        "RECIPE",
        "TP",
        "PP",
        "SAVE_DIR",
        "STAGE1_DIR",
        "EXTRA_OVERRIDES",
        "REPO",
        "DATA_BLEND",
        "DATA_CACHE",
        "SRUN_ARGS",
        "MAX_RESTARTS",
        "ENV_FILE",
        "CONTAINER_IMAGE",
        "CONTAINER_MOUNTS",
        "CONTAINER_ENV",
    ):
        base.pop(key, None)
    return subprocess.run(
        ["bash", str(script)],
        env={**base, "DRY_RUN": "1", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _srun_line(done: subprocess.CompletedProcess) -> tuple[list[str], list[str]]:
    """The dry run's srun line, split as the shell would: (srun and its options, the trainer
    command each task runs)."""
    assert done.returncode == 0, done.stderr
    assert "dry run; srun line" in done.stderr, done.stderr
    words = shlex.split(done.stderr.splitlines()[-1])
    assert words[0] == "srun", words
    # srun [options] bash -c SCRIPT task REPO TRAINER...
    i = words.index("bash")
    assert words[i + 1] == "-c" and words[i + 3 : i + 5] == ["task", str(REPO)], words
    return words[:i], words[i + 5 :]


def test_dry_run_prints_the_12b_command(inputs, tmp_path) -> None:
    done = _dry_run(STAGE1, {**inputs, "EXTRA_OVERRIDES": "train.steps=10 logging.x=1"}, tmp_path)
    srun, trainer = _srun_line(done)
    assert srun == ["srun", "--kill-on-bad-exit=0", "--wait=120"], srun  # no container asked
    command = " ".join(trainer)
    recipe = REPO / "examples" / "nemotron_nano_12b" / "stage1_8k.yaml"
    assert f"-m megatron_elastic.train --config {recipe} " in command, command
    for item in (
        f"data.blend='{inputs['DATA_PREFIX']}'",  # a YAML string, whatever the path holds
        f"checkpoint.init={inputs['PARENT']}",
        f"distill.teacher_checkpoint={inputs['PARENT']}",
        "checkpoint.save=runs/nemotron_nano_12b/stage1_8k",
        "parallel.tensor_parallel_size=4",
        "parallel.pipeline_parallel_size=1",
        "train.steps=10 logging.x=1",
    ):
        assert item in command, command
    assert command.split()[0] == sys.executable, command


def test_dry_run_stage2_defaults(inputs, tmp_path) -> None:
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "latest.json").write_text("{}")
    done = _dry_run(STAGE2, {**inputs, "STAGE1_DIR": "s1"}, tmp_path)
    command = " ".join(_srun_line(done)[1])
    assert f"--config {REPO / 'examples' / 'nemotron_nano_12b' / 'stage2_49k.yaml'} " in command
    for item in (
        "checkpoint.init=s1",
        f"distill.teacher_checkpoint={inputs['PARENT']}",
        "checkpoint.save=runs/nemotron_nano_12b/stage2_49k",
        "parallel.tensor_parallel_size=4",
        "parallel.pipeline_parallel_size=1",
    ):
        assert item in command, command


def test_dry_run_container_and_srun_args(inputs, tmp_path) -> None:
    env = {
        **inputs,
        "CONTAINER_IMAGE": "nvcr.io/nvidia/pytorch:25.12-py3",
        "CONTAINER_MOUNTS": "/lustre:/lustre,/data:/data:ro",
        "CONTAINER_ENV": "NCCL_SOCKET_IFNAME",
        # Quotes keep a word together; nothing is expanded or run.
        "SRUN_ARGS": "--mpi=pmix -l --export='ALL,NOTE=two words' \"$(touch pwned)\"",
        "PYTHON": "python3.12",  # the image's interpreter: not looked up on the batch host
    }
    srun, trainer = _srun_line(_dry_run(STAGE1, env, tmp_path))
    assert srun == [
        "srun",
        "--kill-on-bad-exit=0",
        "--wait=120",
        "--container-image=nvcr.io/nvidia/pytorch:25.12-py3",
        "--container-mounts=/lustre:/lustre,/data:/data:ro",
        f"--container-workdir={tmp_path}",
        "--no-container-mount-home",
        "--container-env=TRITON_CACHE_DIR,PYTORCH_CUDA_ALLOC_CONF,TORCH_NCCL_AVOID_RECORD_STREAMS,"
        "TORCH_NCCL_ASYNC_ERROR_HANDLING,OMP_NUM_THREADS,CUDA_DEVICE_MAX_CONNECTIONS,"
        "NCCL_SOCKET_IFNAME",
        "--mpi=pmix",
        "-l",
        "--export=ALL,NOTE=two words",
        "$(touch pwned)",
    ], srun
    assert not (tmp_path / "pwned").exists()
    assert trainer[:3] == ["python3.12", "-m", "megatron_elastic.train"], trainer


@pytest.mark.slow  # imports megatron (the recipe parser): ~7 s of CPU
def test_dry_run_blend_reaches_the_trainer_intact(inputs, tmp_path) -> None:
    # Three datasets, one under a directory with a space and a YAML-special character.
    odd = tmp_path / "web docs: 2024"
    odd.mkdir()
    prefixes = [str(tmp_path / "train"), str(odd / "part#1"), "train"]
    for prefix in prefixes[:2]:
        for ext in (".bin", ".idx"):
            Path(prefix + ext).write_text("")
    env = {**inputs, "DATA_PREFIX": ""}
    env["DATA_BLEND"] = f"0.5 {prefixes[0]}\n  .3 '{prefixes[1]}' 2 {prefixes[2]}"
    env["DATA_CACHE"] = str(tmp_path / "index cache")
    _, trainer = _srun_line(_dry_run(STAGE1, env, tmp_path))
    blend = [w for w in trainer if w.startswith("data.blend=")]
    assert blend == [f"data.blend=[[0.5, '{prefixes[0]}'], [.3, '{prefixes[1]}'], [2, 'train']]"]
    assert f"data.cache_dir='{tmp_path / 'index cache'}'" in trainer, trainer
    # What the trainer parses from it.
    from megatron_elastic.training.recipe import load_train_recipe

    assert trainer[3] == "--config", trainer
    recipe = load_train_recipe(trainer[4], trainer[5:])
    assert recipe.data.blend == [[0.5, prefixes[0]], [0.3, prefixes[1]], [2, "train"]]
    assert recipe.data.cache_dir == str(tmp_path / "index cache")


@pytest.mark.parametrize(
    ("script", "change", "message"),
    [
        (STAGE1, {"DATA_PREFIX": ""}, "DATA_PREFIX is not set"),
        (STAGE1, {"TOKENIZER": ""}, "TOKENIZER is not set"),
        (STAGE1, {"PARENT": ""}, "PARENT is not set"),
        (STAGE1, {"DATA_PREFIX": "/nonexistent/train"}, "is not a dataset prefix"),
        (STAGE1, {"TOKENIZER": "/nonexistent/tok.json"}, "TOKENIZER=/nonexistent/tok.json does"),
        (STAGE1, {"PARENT": "/nonexistent"}, "PARENT=/nonexistent is neither a checkpoint"),
        (STAGE1, {"TP": "four"}, "TP must be a positive integer"),
        (STAGE1, {"PP": "0"}, "PP must be a positive integer"),
        (STAGE1, {"SLURM_NTASKS": "6"}, "6 tasks do not split into TP=4 x PP=1"),
        (STAGE1, {"RECIPE": "/nonexistent.yaml"}, "recipe /nonexistent.yaml does not exist"),
        (STAGE1, {"PYTHON": "/nonexistent/python"}, "PYTHON=/nonexistent/python is not"),
        (STAGE2, {"STAGE1_DIR": "/nonexistent"}, "STAGE1_DIR=/nonexistent holds no checkpoint"),
        (STAGE1, {"DATA_BLEND": "1.0 x"}, "DATA_PREFIX and DATA_BLEND are both set"),
        (STAGE1, {"DATA_PREFIX": "", "DATA_BLEND": "0.5"}, "DATA_BLEND must be weight/prefix"),
        (STAGE1, {"DATA_PREFIX": "", "DATA_BLEND": "1e-3 x"}, "weight '1e-3' (before x) is not"),
        (STAGE1, {"DATA_PREFIX": "", "DATA_BLEND": "0 x"}, "weight '0' (before x) is not"),
        (STAGE2, {"DATA_PREFIX": "", "DATA_BLEND": "1 /no/set"}, "DATA_BLEND=/no/set is not a"),
        (STAGE1, {"DATA_PREFIX": "", "DATA_BLEND": "1 '/a b"}, "DATA_BLEND cannot be split"),
        (STAGE1, {"DATA_CACHE": "/dev/null"}, "DATA_CACHE=/dev/null is not a writable directory"),
        (STAGE1, {"SRUN_ARGS": '-l "--x=y'}, "SRUN_ARGS cannot be split into words"),
        (STAGE1, {"MAX_RESTARTS": "three"}, "MAX_RESTARTS must be a non-negative integer"),
        (STAGE1, {"MAX_RESTARTS": "-1"}, "MAX_RESTARTS must be a non-negative integer"),
        (STAGE1, {"ENV_FILE": "/nonexistent.env"}, "ENV_FILE=/nonexistent.env does not exist"),
        (STAGE1, {"CONTAINER_MOUNTS": "/a:/a"}, "CONTAINER_MOUNTS/CONTAINER_ENV are set but"),
    ],
    ids=lambda v: v.name if isinstance(v, Path) else None,
)
def test_bad_input_exits_2_before_running(inputs, tmp_path, script, change, message) -> None:
    done = _dry_run(script, {**inputs, **change}, tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr, done.stderr
    assert "dry run" not in done.stderr, done.stderr


def test_outside_slurm_refuses_to_run(inputs, tmp_path) -> None:
    done = _dry_run(STAGE1, {**inputs, "DRY_RUN": "0"}, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "not inside a SLURM job" in done.stderr, done.stderr
