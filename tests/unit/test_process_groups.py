"""``megatron_elastic/parallel.py`` holds the process groups by count: a tool run in-process (a
test, a notebook, a driver that trains and then exports) shares the groups its caller holds and
releases only its own hold, and the last release tears them down."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_elastic.config import ParallelConfig
from megatron_elastic.parallel import destroy_process_groups, init_process_groups

ROOT = Path(__file__).parents[2]


def test_an_in_process_tool_leaves_its_callers_groups_working(pgs) -> None:
    tool = init_process_groups(ParallelConfig(), seed=7)  # what export/eval/serving/training do
    assert tool.tp is pgs.tp and tool.dp is pgs.dp  # shared, not rebuilt
    destroy_process_groups()
    assert dist.is_initialized() and parallel_state.model_parallel_is_initialized()
    value = torch.ones(2)
    dist.all_reduce(value, group=pgs.dp)  # the caller's groups still work
    assert value.tolist() == [1.0, 1.0]


LAST_RELEASE = textwrap.dedent(
    """\
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups

    init_process_groups(ParallelConfig())
    init_process_groups(ParallelConfig())
    destroy_process_groups()
    print("after one release", dist.is_initialized(),
          parallel_state.model_parallel_is_initialized())
    destroy_process_groups()
    print("after the last", dist.is_initialized(), parallel_state.model_parallel_is_initialized())
    """
)


def run_in_fresh_process(code: str) -> str:
    """Run ``code`` in a new single-process Python (the unit tests' session holds groups of its
    own) and return its stdout; fail the test if it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_last_release_tears_the_groups_down() -> None:
    stdout = run_in_fresh_process(LAST_RELEASE)
    lines = stdout.strip().splitlines()[-2:]
    assert lines == ["after one release True True", "after the last False False"], stdout
