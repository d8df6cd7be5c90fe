"""Content checksums of checkpoint files: recorded in the manifest at save time, verified before
any byte of a file is used.

A checkpoint's manifest holds ``files: {relative path: {"bytes": n, "sha256": hex}}`` for every
file it wrote. Hashing is streamed (``hashlib.file_digest``) and shared between the ranks that
save or load together: rank ``r`` of ``w`` hashes files ``r, r + w, ...`` of the sorted list and
the results are gathered, so every rank raises the same error for the same damage.

How much a load verifies is one choice, :data:`VERIFY_MODES` (``checkpoint.verify`` of a
recipe): ``full`` hashes every file it reads; ``manifest`` checks only what costs no reading (the
manifest's file table, every listed file present with its recorded size, no unlisted file among
the weights). ``manifest`` catches a missing, truncated or foreign file, and a stray one, but not
a flipped byte or a same-size overwrite: those reach torch's loader, which notices only damage to
the structure it parses (a bit flip in tensor data loads silently as a changed weight).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist

__all__ = [
    "ALGORITHM",
    "VERIFY_MODES",
    "CheckpointDamaged",
    "check_verify_mode",
    "digest_files",
    "list_files",
    "verify_files",
]

ALGORITHM = "sha256"
"""Hash recorded per file (``hashlib`` name); the manifest's key for each file's digest."""
VERIFY_MODES = ("full", "manifest")
"""What a load checks: ``full`` every file's size and checksum; ``manifest`` presence and sizes."""


def check_verify_mode(verify: str, field: str = "verify") -> None:
    """``ValueError`` naming ``field`` unless ``verify`` is one of :data:`VERIFY_MODES`."""
    if verify not in VERIFY_MODES:
        raise ValueError(
            f"{field}={verify!r}; choose one of {VERIFY_MODES} (full: hash every file at load, "
            "manifest: check presence and sizes only)"
        )


class CheckpointDamaged(ValueError):
    """A checkpoint file is missing, truncated, altered or foreign to its manifest. ``path`` is
    the checkpoint directory, ``file`` the damaged file relative to it."""

    def __init__(self, path: Path, file: str, problem: str, advice: str | None = None) -> None:
        self.path, self.file, self.problem = Path(path), file, problem
        advice = advice or "restore the checkpoint from a copy or write it again"
        super().__init__(f"checkpoint {str(path)!r} is damaged: {file} {problem}; {advice}")


def list_files(root: Path, under: str = "") -> list[str]:
    """Sorted POSIX paths, relative to ``root``, of the regular files under ``root / under``."""
    base = root / under if under else root
    return sorted(p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file())


def _digest(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, ALGORITHM).hexdigest()


def _gather(local: dict[str, Any]) -> dict[str, Any]:
    """Merge each rank's dict (all ranks of the default group take part)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts: list[dict[str, Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in (part or {}).items()}


def _my_share(names: list[str], collective: bool = True) -> list[str]:
    if not collective or not dist.is_initialized():
        return names
    return names[dist.get_rank() :: dist.get_world_size()]


def digest_files(root: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": size, ALGORITHM: hex}}`` for ``names`` under ``root``; collective when
    torch.distributed is initialised (every rank must call it with the same names)."""
    local = {
        name: {"bytes": (root / name).stat().st_size, ALGORITHM: _digest(root / name)}
        for name in _my_share(sorted(names))
    }
    return dict(sorted(_gather(local).items()))


def _problem(root: Path, name: str, recorded: Mapping[str, Any], verify: str) -> str | None:
    file = root / name
    if not file.is_file():
        return "is missing"
    size = file.stat().st_size
    if size != recorded["bytes"]:
        return f"has {size:,} bytes where the manifest recorded {recorded['bytes']:,} (truncated?)"
    if verify == "full" and _digest(file) != recorded[ALGORITHM]:
        return f"does not match its {ALGORITHM} checksum in the manifest (altered or corrupt)"
    return None


def verify_files(
    root: Path,
    recorded: Mapping[str, Mapping[str, Any]],
    names: Iterable[str],
    *,
    complete_under: str | None = None,
    collective: bool = True,
    verify: str = "full",
) -> None:
    """Raise :class:`CheckpointDamaged` for the first of ``names`` (relative to ``root``) that is
    missing or differs from its ``recorded`` size and checksum, or that the manifest does not
    record. With ``complete_under``, every file the manifest records under that folder is
    checked too, and every file found there must be recorded (a file the manifest does not know
    means the manifest belongs to another checkpoint). ``collective``
    (when torch.distributed is initialised): every rank calls it with the same names and hashes
    a share of them; otherwise this rank checks its own ``names`` alone. ``verify`` (one of
    :data:`VERIFY_MODES`): ``manifest`` skips the checksums (presence and sizes only)."""
    check_verify_mode(verify)
    malformed = [
        n
        for n, r in recorded.items()
        if not (
            isinstance(r, Mapping)
            and type(r.get("bytes")) is int
            and isinstance(r.get(ALGORITHM), str)
        )
    ]
    if malformed:
        raise CheckpointDamaged(
            root, "its manifest", f"has a malformed file-table entry for {min(malformed)!r}"
        )
    names = set(names)
    if complete_under is not None:  # what the manifest records there, and what is there
        names |= {n for n in recorded if n.startswith(f"{complete_under}/")}
        names |= set(list_files(root, complete_under))
    names = sorted(names)
    local: dict[str, str] = {}
    for name in _my_share(names, collective):
        if name not in recorded:
            local[name] = "is not recorded in the manifest (the manifest of another checkpoint?)"
        elif (problem := _problem(root, name, recorded[name], verify)) is not None:
            local[name] = problem
    problems = _gather(local) if collective else local
    if problems:
        first = min(problems)
        raise CheckpointDamaged(root, first, problems[first])
