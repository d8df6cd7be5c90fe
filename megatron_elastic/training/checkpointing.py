"""What a training stage's checkpoints hold, saved and loaded in one place: which checkpoints a
stage starts from (checked before any compute), the elastic layer ranking they carry, the frozen
teacher, the state it resumes (or initialises) from, and the state it saves. Each load verifies
files as the recipe's ``checkpoint.verify`` says (:mod:`megatron_elastic.integrity`).

The on-disk format and the generic loaders are :mod:`megatron_elastic.checkpoint`'s, the save
directory's history (``latest.json``) :mod:`.state`'s. This module knows what a *stage* holds
(optimizer, schedulers, router, progress), which is why it lives in ``training/``:
``checkpoint.py`` stays free of training objects (``state.py`` imports it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import nn

from megatron_elastic.checkpoint import (
    load_checkpoint,
    load_extra,
    load_rank_state,
    manifest_model,
    read_manifest,
    save_checkpoint,
)
from megatron_elastic.integrity import CheckpointDamaged
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.router import router_state
from megatron_elastic.training.recipe import TrainRecipe, recipe_summary
from megatron_elastic.training.state import (
    Progress,
    capture_rng,
    latest_checkpoint,
    log,
    previous_checkpoint_advice,
    resolve_init,
    restore_rng,
)

__all__ = [
    "StageState",
    "checkpoint_layer_ranking",
    "load_stage",
    "load_teacher",
    "save_stage",
    "stage_checkpoints",
]


@dataclass(frozen=True)
class StageState:
    """The objects whose state a stage checkpoint holds (this rank's share)."""

    model: nn.Module
    """The trained model (unwrapped): weights, sharded."""
    optimizer: Any
    """megatron's optimizer: its state sharded next to the weights."""
    scheduler: Any
    """The learning-rate schedule (``extra.pt``'s ``scheduler``)."""
    router: Any | None = None
    """The elastic router (``extra.pt``'s router state), or None in plain training."""
    router_optimizer: Any | None = None
    """The router's optimizer, or None (plain training, fixed architectures)."""
    router_scheduler: Any | None = None
    """The router's learning-rate schedule, with ``router_optimizer``."""


def stage_checkpoints(recipe: TrainRecipe) -> dict[str, Path | None]:
    """The checkpoints the stage loads (``resume``: the newest in ``checkpoint.save``, then
    ``init`` is not read; ``init``; ``teacher``), each checked to hold the recipe's
    architecture, and a resumed run's optimizer settings checked to be the recipe's."""
    resume = latest_checkpoint(recipe.checkpoint.save)
    init = None if resume is not None or not recipe.checkpoint.init else recipe.checkpoint.init
    init = resolve_init(init) if init else None
    teacher = None
    if recipe.distill.teacher == "parent":
        teacher = resolve_init(recipe.distill.teacher_checkpoint)
    for path in (resume, init, teacher):
        if path is not None and manifest_model(read_manifest(path)) != recipe.model:
            raise ValueError(
                f"checkpoint {str(path)!r} was saved for a different architecture than the "
                "recipe's model"
            )
    if resume is not None:
        saved = read_manifest(resume)["metadata"].get("recipe", {}).get("optim", {})
        # train.steps (and the schedule horizon derived from it) may change on resume, e.g. to
        # stop early or extend; the LR schedule keeps its saved horizon (the trainer says so).
        changed = {
            k: (saved[k], v)
            for k, v in dataclasses.asdict(recipe.optim).items()
            if k in saved and saved[k] != v and k != "total_steps"
        }
        if changed:
            raise ValueError(
                f"{recipe.checkpoint.save} holds a run with other optimizer settings "
                f"(saved vs now: {changed}); resuming needs the same ones. To change them, start "
                "a new stage: a new checkpoint.save with checkpoint.init pointing at this one"
            )
    return {"resume": resume, "init": init, "teacher": teacher}


def checkpoint_layer_ranking(source: Path | None, verify: str) -> list[int] | None:
    """The layer ranking the checkpoint a stage starts from carries (importance estimation stores
    it in the manifest; elastic stages carry it in their router state), or None."""
    if source is None:
        return None
    manifest = read_manifest(source)
    ranking = manifest["metadata"].get("layer_ranking")
    if manifest["kind"] == "elastic":
        ranking = load_extra(source, verify)["elastic_config"].get("layer_ranking")
    return ranking


def load_teacher(
    recipe: TrainRecipe, path: Path, pgs: ProcessGroupCollection, dtype: torch.dtype
) -> nn.Module:
    """This rank's part of the frozen parent teacher, loaded from ``path``."""
    teacher = build_hybrid_model(recipe.model, pgs, recipe.parallel, params_dtype=dtype)
    load_checkpoint(path, teacher, recipe.model, verify=recipe.checkpoint.verify)
    log(f"teacher: {path} (frozen)")
    return teacher


def load_stage(
    recipe: TrainRecipe,
    paths: dict[str, Path | None],
    state: StageState,
    budgets: dict[str, float] | None,
) -> Progress:
    """Load what the stage starts from into ``state``: the full training state of
    ``paths["resume"]`` (weights, optimizer, schedulers, router, this rank's RNG), else the
    weights (and an elastic checkpoint's router, which must have trained the same ``budgets``)
    of ``paths["init"]``. Returns the stage's progress."""
    model, optimizer, router = state.model, state.optimizer, state.router
    router_optimizer, router_scheduler = state.router_optimizer, state.router_scheduler
    verify, progress = recipe.checkpoint.verify, Progress()
    if (path := paths["resume"]) is not None:
        try:
            manifest = load_checkpoint(
                path, model, recipe.model, optimizer=optimizer, verify=verify
            )
            extra, rank_state = load_extra(path, verify), load_rank_state(path, verify)
        except CheckpointDamaged as exc:
            advice = previous_checkpoint_advice(recipe.checkpoint.save, path)
            raise CheckpointDamaged(exc.path, exc.file, exc.problem, advice) from exc
        state.scheduler.load_state_dict(extra["scheduler"])
        if router is not None:
            router.load_state_dict(extra["state_dict"])
        if router_optimizer is not None:
            router_optimizer.load_state_dict(extra["router_optimizer"])
            router_scheduler.load_state_dict(extra["router_scheduler"])
        progress = Progress(**manifest["metadata"]["progress"])
        horizon = manifest["metadata"]["recipe"]["optim"]["total_steps"]
        if horizon != recipe.optim.total_steps:
            log(
                f"train.steps is now {recipe.train.steps}; the LR schedule keeps the horizon of "
                f"{horizon} steps it was saved with"
            )
        exact = restore_rng(rank_state)
        log(
            f"resumed from {path} at step {progress.step}"
            + ("" if exact else " (RNG not restored: saved at another world size)")
        )
    elif (path := paths["init"]) is not None:
        manifest = load_checkpoint(path, model, recipe.model, verify=verify)
        # bf16: the optimizer's fp32 main weights were copied from the initial weights when it
        # was built; without this, its first step would write those back over the loaded.
        optimizer.reload_model_params()
        if router is not None and manifest["kind"] == "elastic":
            extra = load_extra(path, verify)
            if extra["elastic_config"]["budgets"] != dict(budgets):
                raise ValueError(
                    f"{path} trained budgets {extra['elastic_config']['budgets']}, this "
                    f"recipe trains {dict(budgets)}"
                )
            router.load_state_dict(extra["state_dict"])
            progress.router_step = manifest["metadata"].get("progress", {}).get("router_step", 0)
        log(f"initialised from {path} ({manifest['kind']})")
    return progress


def save_stage(
    path: Path,
    recipe: TrainRecipe,
    state: StageState,
    progress: Progress,
    *,
    tokenizer: str,
    layer_ranking: tuple[int, ...] | None,
) -> None:
    """Checkpoint the stage's full training state under ``path`` (what :func:`load_stage`
    resumes), with the progress, tokenizer, recipe and layer ranking in the manifest."""
    extra = {"scheduler": state.scheduler.state_dict()}
    if state.router is not None:
        extra.update(router_state(state.router))
    if state.router_optimizer is not None:
        extra["router_optimizer"] = state.router_optimizer.state_dict()
        extra["router_scheduler"] = state.router_scheduler.state_dict()
    metadata = {
        "stage": recipe.stage,
        "progress": dataclasses.asdict(progress),
        "tokenizer": tokenizer,
        "recipe": recipe_summary(recipe),
    }
    if layer_ranking is not None:
        metadata["layer_ranking"] = list(layer_ranking)
    save_checkpoint(
        path,
        state.model,
        recipe.model,
        kind="elastic" if recipe.mode == "elastic" else "parent",
        metadata=metadata,
        extra=extra,
        optimizer=state.optimizer,
        rank_state=capture_rng(),
    )
