"""End to end on a real local SLURM cluster: munged + slurmctld + slurmd on this machine.

slurm/local_cluster.sh brings the cluster up in a private work directory on free ports (so a
cluster someone started by hand is left alone), the tests submit real jobs with sbatch/srun, and
the cluster is stopped afterwards. Skipped only where the SLURM binaries are not installed
(`bash scripts/install_slurm.sh` installs them; CI does).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
# The daemons live in /usr/sbin, which is not on every user's PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
NEEDED = ["munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo"]
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
class Cluster:
    workdir: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 30, check: bool = True) -> CompletedProcess:
        return subprocess.run(
            list(args),
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def sbatch_wait(self, script: Path) -> tuple[str, int]:
        """Submit SCRIPT, wait for it to end; return (job id, sbatch's exit code = the job's)."""
        proc = self.run(
            "sbatch", "--parsable", "--wait", str(script), timeout=JOB_TIMEOUT_S, check=False
        )
        match = re.match(r"\s*(\d+)", proc.stdout)
        assert match, f"sbatch printed no job id\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        return match.group(1), proc.returncode

    def job_fields(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))


@dataclass
class AllreduceJob:
    job_id: str
    returncode: int  # sbatch --wait's exit code, which is the job's
    output: str  # the job's output file
    scontrol: dict[str, str]  # `scontrol show job` fields read as soon as the job ended


def _free_port_pair() -> int:
    """A port P with P and P+1 free: slurmctld listens on P, slurmd on P+1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no two consecutive free TCP ports")


def _clean_env() -> dict[str, str]:
    # SLURM_* variables from an enclosing allocation would leak into the jobs and the clients.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = SEARCH_PATH
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _local_cluster(action: str, workdir: Path, env: dict[str, str]) -> CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), action, "--workdir", str(workdir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    missing = [b for b in NEEDED if shutil.which(b, path=SEARCH_PATH) is None]
    if missing:
        pytest.skip(
            f"SLURM not installed (missing {', '.join(missing)}); "
            "run: bash scripts/install_slurm.sh"
        )
    # A private work dir in /tmp (not pytest's tmp_path: its 0700 parents keep the munge user,
    # which runs munged, out) with a short path (munged's socket path must fit in 108 bytes).
    workdir = Path(tempfile.mkdtemp(prefix="me-slurm-test-", dir="/tmp"))
    workdir.chmod(0o755)
    env = _clean_env()
    env["LOCAL_SLURM_PORT"] = str(_free_port_pair())
    start = _local_cluster("start", workdir, env)
    if start.returncode != 0:
        _local_cluster("stop", workdir, env)
        pytest.fail(f"local cluster did not start:\n{start.stderr}\n{start.stdout}")
    match = re.search(r"^export SLURM_CONF=(\S+)$", start.stdout, re.M)
    assert match, f"start printed no SLURM_CONF export line: {start.stdout!r}"
    env["SLURM_CONF"] = match.group(1)
    try:
        yield Cluster(workdir=workdir, env=env)
    finally:
        stop = _local_cluster("stop", workdir, env)
        status = _local_cluster("status", workdir, env)
        assert stop.returncode == 0, f"local cluster did not stop:\n{stop.stderr}"
        assert status.returncode != 0, f"daemons still running after stop:\n{status.stderr}"
        # Kept when stopping failed: its logs say why.
        shutil.rmtree(workdir, ignore_errors=True)


def _write_job(cluster: Cluster, name: str, body: str) -> Path:
    path = cluster.workdir / f"{name}.sbatch"
    header = (
        "#!/bin/bash\n"
        f"#SBATCH --job-name={name}\n"
        f"#SBATCH --output={cluster.workdir}/{name}-%j.out\n"
    )
    path.write_text(header + body)
    return path


@pytest.fixture(scope="module")
def allreduce_job(cluster: Cluster) -> AllreduceJob:
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


def test_failing_job_reported_failed(cluster: Cluster) -> None:
    script = _write_job(cluster, "fails", "echo about to fail\nexit 3\n")
    job_id, rc = cluster.sbatch_wait(script)
    assert rc == 3
    fields = cluster.job_fields(job_id)
    assert fields.get("JobState") == "FAILED", fields
    assert fields.get("ExitCode") == "3:0", fields
    assert "about to fail" in (cluster.workdir / f"fails-{job_id}.out").read_text()


def test_four_tasks_fit(cluster: Cluster) -> None:
    # The node advertises 4 CPUs even on a 2-core machine, so 4-task jobs are not refused.
    proc = cluster.run(
        "srun", "-n4", "--time=2", "bash", "-c", "echo task=$SLURM_PROCID", timeout=JOB_TIMEOUT_S
    )
    tasks = sorted(proc.stdout.split())
    assert tasks == [f"task={i}" for i in range(4)], proc.stdout + proc.stderr
