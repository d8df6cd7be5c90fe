"""Checkpoints: megatron ``dist_checkpointing`` for weights (TP/PP layout can change between save
and load) plus a JSON manifest naming what the directory holds and what produced it.

Writes are atomic: everything goes to a temporary sibling directory that replaces the target only
once complete, so a crash never leaves a half-written checkpoint under the final name. The
manifest, written last, records the size and checksum of every file (:mod:`.integrity`). Loading
checks the manifest first, refuses a checkpoint of another architecture before touching weights,
and verifies each file's checksum before reading it: a truncated, altered, missing or foreign
file is refused with its name. Every loader takes ``verify`` (:data:`.integrity.VERIFY_MODES`,
a recipe's ``checkpoint.verify``): ``manifest`` checks presence and sizes only, no checksums.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch import nn

from megatron_elastic.config import ModelConfig, config_from_dict
from megatron_elastic.integrity import (
    ALGORITHM,
    check_verify_mode,
    digest_files,
    list_files,
    verify_files,
)

__all__ = [
    "MANIFEST",
    "save_checkpoint",
    "load_checkpoint",
    "load_extra",
    "load_rank_state",
    "read_manifest",
    "manifest_model",
    "replace_directory",
]

MANIFEST = "manifest.json"
_WEIGHTS = "weights"
_EXTRA = "extra.pt"
_OPTIMIZER = "optimizer"
_RANKS = "ranks"
FORMAT_VERSION = 2
"""Version 2 added per-file checksums; version 1 checkpoints are still read (unverified)."""
_READABLE_VERSIONS = (1, 2)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _versions() -> dict[str, str]:
    import megatron.core

    import megatron_elastic

    return {
        "megatron_elastic": megatron_elastic.__version__,
        "megatron_core": megatron.core.__version__,
        "torch": torch.__version__,
    }


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    model_config: ModelConfig,
    *,
    kind: str,
    metadata: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    optimizer: Any | None = None,
    rank_state: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` (every rank's shard) under ``path`` atomically. ``kind`` names the artefact
    (``parent``, ``ranked``, ``elastic``...); ``metadata`` is stored in the manifest (JSON);
    ``extra`` (replicated state such as the router's, tensors allowed) in ``extra.pt``, written
    by rank 0 (every rank holds the same). ``optimizer`` (megatron's) is saved sharded next to
    the weights, so it too can be loaded at another TP/PP layout; ``rank_state`` (e.g. RNG
    states) is saved per rank and only restored at the same world size."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # leftovers of an interrupted save
        (tmp / _WEIGHTS).mkdir(parents=True)
    _barrier()
    state = model.sharded_state_dict()
    if optimizer is not None:
        state = {**state, _OPTIMIZER: optimizer.sharded_state_dict(state)}
    dist_checkpointing.save(state, str(tmp / _WEIGHTS))
    if rank_state is not None:
        (tmp / _RANKS).mkdir(exist_ok=True)
        torch.save(rank_state, tmp / _RANKS / f"rank{_rank()}.pt")
    if extra is not None and _rank() == 0:
        torch.save(extra, tmp / _EXTRA)
    _barrier()
    files = digest_files(tmp, list_files(tmp))  # every rank hashes a share
    if _rank() == 0:
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "model": dataclasses.asdict(model_config),
            "metadata": metadata or {},
            "has_optimizer": optimizer is not None,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "versions": _versions(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "checksum": ALGORITHM,
            "files": files,
        }
        _write_manifest(tmp, manifest)
        replace_directory(tmp, path)
    _barrier()
    return path


def replace_directory(complete: Path, target: Path) -> None:
    """Put the finished directory ``complete`` (a hidden sibling of ``target``) in place of
    ``target``: renames only, so ``target`` is always either the old or the new directory."""
    old = target.parent / f".{target.name}.old"
    if target.exists():
        os.replace(target, old)
    os.replace(complete, target)
    if old.exists():
        shutil.rmtree(old)


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """The manifest is the last file of a checkpoint written: its presence (after the rename
    of the whole directory) is what makes the checkpoint complete."""
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _verify(
    path: str | Path, manifest: dict[str, Any], names: list[str], verify: str, **kw: Any
) -> None:
    """``names`` against the manifest as ``verify`` says (version-1 checkpoints record none)."""
    check_verify_mode(verify)
    if "files" in manifest:
        verify_files(Path(path), manifest["files"], names, verify=verify, **kw)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint directory, with clear errors for what is not one."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} does not exist (or is not a directory)")
    file = path / MANIFEST
    if not file.is_file() or not (path / _WEIGHTS).is_dir():
        raise ValueError(
            f"{str(path)!r} is not a megatron-elastic checkpoint (no {MANIFEST} and {_WEIGHTS}/); "
            "an interrupted save leaves its partial files in a hidden .tmp sibling instead"
        )
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint {str(path)!r} has a corrupt {MANIFEST}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") not in _READABLE_VERSIONS:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ValueError(
            f"checkpoint {str(path)!r} has format version {version!r}; this megatron-elastic "
            f"reads versions {', '.join(map(str, _READABLE_VERSIONS))}"
        )
    return manifest


def manifest_model(manifest: dict[str, Any]) -> ModelConfig:
    return config_from_dict(ModelConfig, manifest["model"], where="checkpoint manifest model")


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    model_config: ModelConfig,
    *,
    kinds: tuple[str, ...] | None = None,
    optimizer: Any | None = None,
    verify: str = "full",
) -> dict[str, Any]:
    """Load weights saved by :func:`save_checkpoint` into ``model`` (any TP/PP layout), and the
    optimizer state into ``optimizer`` if given, and return the manifest. Raises ``ValueError``
    before loading anything if the checkpoint's kind or architecture differs from what is
    expected, or if it holds no optimizer state and one was asked for; ``CheckpointDamaged`` if
    a weights file fails ``verify`` (``full``: sizes and checksums; ``manifest``: sizes)."""
    manifest = read_manifest(path)
    if kinds is not None and manifest["kind"] not in kinds:
        raise ValueError(
            f"checkpoint {str(path)!r} holds a {manifest['kind']!r} model; expected one of {kinds}"
        )
    saved = manifest_model(manifest)
    if saved != model_config:
        diffs = [
            f"{f.name}: checkpoint {getattr(saved, f.name)!r} vs "
            f"config {getattr(model_config, f.name)!r}"
            for f in dataclasses.fields(ModelConfig)
            if getattr(saved, f.name) != getattr(model_config, f.name)
        ]
        raise ValueError(
            f"checkpoint {str(path)!r} was saved for a different architecture ({'; '.join(diffs)})"
        )
    if optimizer is not None and not manifest.get("has_optimizer"):
        raise ValueError(f"checkpoint {str(path)!r} holds no optimizer state")
    _verify(path, manifest, [], verify, complete_under=_WEIGHTS)
    request = model.sharded_state_dict()
    if optimizer is not None:
        request = {**request, _OPTIMIZER: optimizer.sharded_state_dict(request, is_loading=True)}
    try:
        state = dist_checkpointing.load(request, str(Path(path) / _WEIGHTS))
    except Exception as exc:  # corrupt or truncated shards: say which checkpoint
        raise ValueError(f"checkpoint {str(path)!r} could not be read: {exc}") from exc
    # Without an optimizer requested, dist_checkpointing still returns its common (non-sharded)
    # entries, e.g. param groups: drop them.
    optimizer_state = state.pop(_OPTIMIZER, None)
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    model.load_state_dict(state)
    return manifest


def load_rank_state(path: str | Path, verify: str = "full") -> dict[str, Any] | None:
    """This rank's ``rank_state``, or None if the checkpoint was saved at another world size (the
    per-rank state, e.g. RNG streams, does not map across layouts) or holds none."""
    manifest = read_manifest(path)
    world = dist.get_world_size() if dist.is_initialized() else 1
    file = Path(path) / _RANKS / f"rank{_rank()}.pt"
    name = f"{_RANKS}/{file.name}"
    recorded = name in manifest.get("files", {})
    if manifest.get("world_size") != world or not (file.is_file() or recorded):
        return None
    _verify(path, manifest, [name], verify, collective=False)
    return torch.load(file, map_location="cpu", weights_only=False)


def load_extra(path: str | Path, verify: str = "full") -> dict[str, Any]:
    """The replicated state saved with ``extra=`` (e.g. the router), with a clear error if the
    checkpoint has none."""
    manifest = read_manifest(path)
    file = Path(path) / _EXTRA
    if not file.is_file() and _EXTRA not in manifest.get("files", {}):
        raise ValueError(f"checkpoint {str(path)!r} holds no extra state (router etc.)")
    _verify(path, manifest, [_EXTRA], verify, collective=False)
    return torch.load(file, map_location="cpu", weights_only=True)
