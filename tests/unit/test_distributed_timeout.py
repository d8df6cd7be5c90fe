"""``parallel.distributed_timeout_minutes``: validated once, and the timeout of every process
group the trainer creates (torch's default group and megatron's model-parallel groups), so a hung
collective ends the process and the SLURM scripts requeue the job."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from test_process_groups import run_in_fresh_process

from megatron_elastic.config import ParallelConfig
from megatron_elastic.training.recipe import load_train_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_default_is_megatrons() -> None:
    # megatron-LM's --distributed-timeout-minutes defaults to 10.
    assert ParallelConfig().distributed_timeout_minutes == 10


@pytest.mark.parametrize("value", [0, -5, 1.5, True, "10", None])
def test_bad_values_are_refused(value) -> None:
    with pytest.raises(ValueError, match=r"ParallelConfig.distributed_timeout_minutes must be a"):
        ParallelConfig(distributed_timeout_minutes=value)


def test_recipe_override_reaches_the_config() -> None:
    recipe = load_train_recipe(
        ROOT / "examples" / "tiny" / "stage1.yaml", ["parallel.distributed_timeout_minutes=3"]
    )
    assert recipe.parallel.distributed_timeout_minutes == 3
    with pytest.raises(ValueError, match="distributed_timeout_minutes"):
        load_train_recipe(
            ROOT / "examples" / "tiny" / "stage1.yaml", ["parallel.distributed_timeout_minutes=0"]
        )


CHECK = textwrap.dedent(
    """\
    import torch
    import torch.distributed as dist

    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups

    pgs = init_process_groups(ParallelConfig(distributed_timeout_minutes=3))
    for name, group in (("world", dist.group.WORLD), ("tp", pgs.tp), ("pp", pgs.pp),
                        ("dp", pgs.dp), ("cp", pgs.cp)):
        timeout = group._get_backend(torch.device("cpu")).options._timeout
        print(name, int(timeout.total_seconds()))
    destroy_process_groups()
    """
)


@pytest.mark.slow
def test_every_process_group_gets_the_timeout() -> None:
    stdout = run_in_fresh_process(CHECK)
    seconds = dict(line.split() for line in stdout.splitlines())
    assert seconds == {name: "180" for name in ("world", "tp", "pp", "dp", "cp")}, stdout
