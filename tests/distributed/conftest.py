"""Shared by the distributed tests: launching a worker script under torchrun (gloo on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

MODEL = Path(__file__).parents[1] / "fixtures" / "hybrid_small.yaml"


def _torchrun(worker: Path, workdir: Path, nproc: int, *args: str) -> None:
    """Run ``worker --model hybrid_small.yaml --workdir WORKDIR ARGS`` on ``nproc`` local ranks
    (one thread each) and fail the test with the tail of its output if any rank fails."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(worker),
        "--model",
        str(MODEL),
        "--workdir",
        str(workdir),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="session")
def torchrun() -> Callable[..., None]:
    return _torchrun
