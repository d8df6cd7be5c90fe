"""Full training state on disk: where a stage resumes from, and what the next stage starts from.

A stage's save directory holds ``step_NNNNNNN/`` checkpoints (model + optimizer sharded through
megatron ``dist_checkpointing``; router, schedulers and progress replicated in ``extra.pt``; RNG
streams per rank) and ``latest.json`` naming the newest complete one and, in ``history``, every
complete one still kept (newest first). ``latest.json`` is replaced atomically after the
checkpoint directory itself is complete, and a checkpoint leaves the history before its directory
is deleted, so a crash at any point leaves a complete checkpoint to resume from. If the newest
turns out damaged, deleting it makes the next one in the history the one to resume from.
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
    "checkpoint_history",
    "previous_checkpoint_advice",
    "capture_rng",
    "is_rank0",
    "latest_checkpoint",
    "log",
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


def checkpoint_history(save: str | Path) -> list[Path]:
    """The complete checkpoints ``latest.json`` names, newest first, that still exist (empty
    without ``latest.json``). A ``latest.json`` written before the history existed names one."""
    save = Path(save)
    file = save / LATEST
    if not file.is_file():
        return []
    try:
        latest = json.loads(file.read_text())
        names = [latest["checkpoint"], *latest.get("history", [])]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{file} is corrupt ({exc}); delete it to start over") from exc
    return [save / n for n in dict.fromkeys(names) if (save / n).is_dir()]


def latest_checkpoint(save: str | Path) -> Path | None:
    """The newest complete checkpoint of a save directory, or None if it has none yet. If the
    newest was deleted (e.g. found damaged), the next one in ``latest.json``'s history."""
    file = Path(save) / LATEST
    if not file.is_file():
        return None
    history = checkpoint_history(save)
    if not history:
        raise ValueError(
            f"{file} names no checkpoint that still exists; delete it to start the stage over"
        )
    read_manifest(history[0])  # clear error if it is not a checkpoint
    return history[0]


def previous_checkpoint_advice(save: str | Path, damaged: Path) -> str:
    """What to do when ``damaged``, the checkpoint a run would resume from, fails verification."""
    older = [p for p in checkpoint_history(save) if p.name != damaged.name]
    if not older:
        return (
            "no earlier checkpoint is kept (checkpoint.keep_last): restore it from a copy, or "
            "delete it and latest.json to start the stage over"
        )
    return f"delete or move it and rerun: training resumes from {older[0]}, the previous one"


def resolve_init(path: str | Path) -> Path:
    """A checkpoint directory, or the newest checkpoint of a stage's save directory."""
    path = Path(path)
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is not None:
        return latest
    read_manifest(path)
    return path


def write_latest(save: str | Path, checkpoint: Path, step: int, keep_last: int) -> None:
    """Point ``latest.json`` at the complete ``checkpoint``; its history keeps the newest
    ``keep_last`` checkpoints (rank 0 only; atomic replace)."""
    save = Path(save)
    kept = [checkpoint.name, *(p.name for p in checkpoint_history(save))]
    history = list(dict.fromkeys(kept))[:keep_last]
    tmp = save / f".{LATEST}.tmp"
    record = {"checkpoint": checkpoint.name, "step": step, "history": history}
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, save / LATEST)


def prune_checkpoints(save: str | Path) -> None:
    """Delete the checkpoints ``latest.json``'s history no longer names (rank 0 only). Each is
    renamed to a hidden name first, so a crash mid-delete never leaves a partial checkpoint
    under a ``step_*`` name."""
    save = Path(save)
    kept = {p.name for p in checkpoint_history(save)}
    for old in sorted(p for p in save.glob("step_*") if p.is_dir() and p.name not in kept):
        doomed = save / f".{old.name}.deleting"
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    for leftover in save.glob(".step_*"):  # of saves or deletions a crash interrupted
        shutil.rmtree(leftover, ignore_errors=True)


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


def log(message: str) -> None:
    """A training message on the console, printed by rank 0."""
    if is_rank0():
        print(f"[train] {message}", flush=True)
