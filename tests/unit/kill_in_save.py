"""``python tests/unit/kill_in_save.py POINT N TRAIN-ARGS...``: the trainer
(``python -m megatron_elastic.train TRAIN-ARGS``) killed with SIGKILL, its whole process group
(like SLURM's kill of a step), during its ``N``-th checkpoint save at ``POINT``:

- ``after_tensors``: megatron's ``dist_checkpointing.save`` has written the weights and optimizer;
- ``before_manifest``: every file but the manifest is written and hashed;
- ``before_latest``: the checkpoint directory is complete under its final name, ``latest.json``
  still names the previous one.
"""

from __future__ import annotations

import os
import signal
import sys


def _kill_on_call(owner: object, name: str, call: int, *, after: bool) -> None:
    original = getattr(owner, name)
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call and not after:
            os.killpg(0, signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls == call and after:
            os.killpg(0, signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)


def main() -> int:
    point, call, train_args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    from megatron_elastic import checkpoint
    from megatron_elastic.train import main as train
    from megatron_elastic.training import trainer

    if point == "after_tensors":
        _kill_on_call(checkpoint.dist_checkpointing, "save", call, after=True)
    elif point == "before_manifest":
        _kill_on_call(checkpoint, "_write_manifest", call, after=False)
    elif point == "before_latest":
        _kill_on_call(trainer, "write_latest", call, after=False)
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    return train(train_args)


if __name__ == "__main__":
    sys.exit(main())
