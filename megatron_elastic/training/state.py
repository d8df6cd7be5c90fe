"""Full training state on disk: where a stage resumes from, and what the next stage starts from.

A stage's save directory holds ``step_NNNNNNN/`` checkpoints (model + optimizer sharded through
megatron ``dist_checkpointing``; router, schedulers and progress replicated in ``extra.pt``; RNG
streams per rank) and ``latest.json`` naming the newest complete one. ``latest.json`` is replaced
atomically after the checkpoint directory itself is complete, so a crash at any point leaves the
previous checkpoint as the one to resume from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_elastic.checkpoint import read_manifest

__all__ = [
    "LATEST",
    "Progress",
    "capture_rng",
    "latest_checkpoint",
    "resolve_init",
    "restore_rng",
    "step_dir",
    "write_latest",
    "prune_checkpoints",
]

LATEST = "latest.json"


@dataclass
class Progress:
    """Where training stands (saved in every checkpoint)."""

    step: int = 0
    """Optimizer steps done in this stage."""
    consumed_samples: int = 0
    """Training samples consumed in this stage (the data position)."""
    router_step: int = 0
    """Router steps over all stages (the temperature/logit-scale schedules continue across the
    curriculum: stage 2 picks up where stage 1 left off)."""
    tokens: int = 0
    """Training tokens seen in this stage."""


def step_dir(save: str | Path, step: int) -> Path:
    return Path(save) / f"step_{step:07d}"


def latest_checkpoint(save: str | Path) -> Path | None:
    """The newest complete checkpoint of a save directory, or None if it has none yet."""
    file = Path(save) / LATEST
    if not file.is_file():
        return None
    try:
        name = json.loads(file.read_text())["checkpoint"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise ValueError(f"{file} is corrupt ({exc}); delete it to start over") from exc
    path = Path(save) / name
    read_manifest(path)  # clear error if it is not a checkpoint
    return path


def resolve_init(path: str | Path) -> Path:
    """A checkpoint directory, or the newest checkpoint of a stage's save directory."""
    path = Path(path)
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is not None:
        return latest
    read_manifest(path)
    return path


def write_latest(save: str | Path, checkpoint: Path, step: int) -> None:
    """Point ``latest.json`` at ``checkpoint`` (rank 0 only; atomic replace)."""
    save = Path(save)
    tmp = save / f".{LATEST}.tmp"
    tmp.write_text(json.dumps({"checkpoint": checkpoint.name, "step": step}) + "\n")
    os.replace(tmp, save / LATEST)


def prune_checkpoints(save: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (rank 0 only)."""
    steps = sorted(p for p in Path(save).glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def capture_rng() -> dict[str, Any]:
    """This rank's random-number generator states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any] | None) -> bool:
    """Restore :func:`capture_rng`'s states; False if there were none for this rank."""
    if state is None:
        return False
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
