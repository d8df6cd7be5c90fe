"""A real local SLURM cluster (munged + slurmctld + slurmd on this machine) for the e2e tests.

slurm/local_cluster.sh brings the cluster up in a private work directory on free ports (so a
cluster someone started by hand is left alone), once per test session; the tests submit real jobs
with sbatch/srun, and the cluster is stopped at the end. Tests that use it skip only where the
SLURM binaries are not installed (`bash scripts/install_slurm.sh` installs them; CI does).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
# The daemons live in /usr/sbin, which is not on every user's PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
NEEDED = ["munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel"]
JOB_TIMEOUT_S = 180
# Job states after which a job runs no more (PENDING/RUNNING/REQUEUED/COMPLETING are not final).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@dataclass
class Cluster:
    workdir: Path
    env: dict[str, str]

    def run(
        self,
        *args: str,
        timeout: float = 30,
        check: bool = True,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> CompletedProcess:
        """Run a command against this cluster (its SLURM_CONF), in ``cwd`` (default: the
        cluster's work directory), with ``env`` added to the cluster's environment."""
        return subprocess.run(
            list(args),
            env={**self.env, **(env or {})},
            cwd=cwd or self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def submit(
        self, *args: str | Path, cwd: Path | None = None, env: Mapping[str, str] | None = None
    ) -> str:
        """``sbatch ARGS`` without waiting; returns the job id. Jobs inherit ``env``."""
        proc = self.run("sbatch", "--parsable", *map(str, args), cwd=cwd, env=env, check=False)
        match = re.match(r"\s*(\d+)", proc.stdout)
        assert match, f"sbatch printed no job id\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        return match.group(1)

    def sbatch_wait(
        self,
        *args: str | Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = JOB_TIMEOUT_S,
    ) -> tuple[str, int]:
        """Submit a job (``sbatch ARGS``: options, then the script), wait for it to end; return
        (job id, sbatch's exit code = the job's)."""
        proc = self.run(
            "sbatch",
            "--parsable",
            "--wait",
            *map(str, args),
            timeout=timeout,
            check=False,
            cwd=cwd,
            env=env,
        )
        match = re.match(r"\s*(\d+)", proc.stdout)
        assert match, f"sbatch printed no job id\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        return match.group(1), proc.returncode

    def job_fields(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (slurmctld forgets ended jobs after MinJobAge, 16 s)."""
        out = self.run("scontrol", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(
        self, job_id: str, until: Callable[[dict[str, str]], bool], timeout: float = JOB_TIMEOUT_S
    ) -> dict[str, str]:
        """Poll the job's record until ``until(fields)`` holds; return those fields."""
        deadline = time.monotonic() + timeout
        fields: dict[str, str] = {}
        while time.monotonic() < deadline:
            fields = self.job_fields(job_id)
            if until(fields):
                return fields
            time.sleep(0.25)
        raise AssertionError(f"job {job_id}: condition not met after {timeout} s: {fields}")

    def wait_ended(self, job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
        """Poll until the job has ended (a final state); return its record."""
        return self.wait_job(job_id, lambda f: f.get("JobState") in FINAL_STATES, timeout)


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


@pytest.fixture(scope="session")
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
