"""End to end on a real local SLURM cluster (the `cluster` fixture of tests/e2e/conftest.py):
sbatch and srun jobs, a 2-task gloo all_reduce with a rendezvous from SLURM's variables, job
states and exit codes as `scontrol` reports them."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

JOB_TIMEOUT_S = 180

WORKER = textwrap.dedent(
    """\
    # One rank of a 2-task job: rendezvous from SLURM's variables, gloo all_reduce, print the sum.
    import os
    import socket
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    rank = int(os.environ["SLURM_PROCID"])
    world = int(os.environ["SLURM_NTASKS"])
    addr = os.environ["MASTER_ADDR"]
    # Every job gets its own port, so consecutive jobs never meet a socket in TIME_WAIT.
    port = 40000 + int(os.environ["SLURM_JOB_ID"]) % 10000
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{addr}:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    print(
        f"rank={rank} world={world} nodelist={os.environ['SLURM_JOB_NODELIST']} "
        f"host={socket.gethostname()} sum={value.item():g}",
        flush=True,
    )
    dist.destroy_process_group()
    """
)


@dataclass
class AllreduceJob:
    job_id: str
    returncode: int  # sbatch --wait's exit code, which is the job's
    output: str  # the job's output file
    scontrol: dict[str, str]  # `scontrol show job` fields read as soon as the job ended


def _write_job(cluster, name: str, body: str) -> Path:
    path = cluster.workdir / f"{name}.sbatch"
    header = (
        "#!/bin/bash\n"
        f"#SBATCH --job-name={name}\n"
        f"#SBATCH --output={cluster.workdir}/{name}-%j.out\n"
    )
    path.write_text(header + body)
    return path


@pytest.fixture(scope="module")
def allreduce_job(cluster) -> AllreduceJob:
    """Run the 2-task gloo all_reduce job once, for the tests below."""
    worker = cluster.workdir / "allreduce_worker.py"
    worker.write_text(WORKER)
    script = _write_job(
        cluster,
        "allreduce",
        textwrap.dedent(
            f"""\
            #SBATCH --ntasks=2
            #SBATCH --time=5
            set -euo pipefail
            # The only node's address is 127.0.0.1 (NodeAddr); its host name need not resolve.
            export MASTER_ADDR=127.0.0.1
            srun -n2 {sys.executable} {worker}
            """
        ),
    )
    job_id, rc = cluster.sbatch_wait(script)
    # Read the job's record now: slurmctld forgets ended jobs after MinJobAge (16 s).
    fields = cluster.job_fields(job_id)
    out_file = cluster.workdir / f"allreduce-{job_id}.out"
    output = out_file.read_text() if out_file.exists() else "<no output file>"
    return AllreduceJob(job_id, rc, output, fields)


def test_sbatch_srun_gloo_allreduce(allreduce_job: AllreduceJob) -> None:
    job_id, rc, output = allreduce_job.job_id, allreduce_job.returncode, allreduce_job.output
    assert rc == 0, f"job {job_id} exited {rc}:\n{output}"
    lines = sorted(line for line in output.splitlines() if line.startswith("rank="))
    assert len(lines) == 2, f"expected one line per rank:\n{output}"
    for rank, line in enumerate(lines):
        assert line.startswith(f"rank={rank} world=2 "), line
        # 1 + 2: each rank contributed rank + 1.
        assert line.endswith(" sum=3"), line


def test_scontrol_reports_completed(allreduce_job: AllreduceJob) -> None:
    fields = allreduce_job.scontrol
    assert fields.get("JobState") == "COMPLETED", fields
    assert fields.get("ExitCode") == "0:0", fields
    assert fields.get("NumTasks") == "2", fields


def test_failing_job_reported_failed(cluster) -> None:
    script = _write_job(cluster, "fails", "echo about to fail\nexit 3\n")
    job_id, rc = cluster.sbatch_wait(script)
    assert rc == 3
    fields = cluster.job_fields(job_id)
    assert fields.get("JobState") == "FAILED", fields
    assert fields.get("ExitCode") == "3:0", fields
    assert "about to fail" in (cluster.workdir / f"fails-{job_id}.out").read_text()


def test_four_tasks_fit(cluster) -> None:
    # The node advertises 4 CPUs even on a 2-core machine, so 4-task jobs are not refused.
    proc = cluster.run(
        "srun", "-n4", "--time=2", "bash", "-c", "echo task=$SLURM_PROCID", timeout=JOB_TIMEOUT_S
    )
    tasks = sorted(proc.stdout.split())
    assert tasks == [f"task={i}" for i in range(4)], proc.stdout + proc.stderr
