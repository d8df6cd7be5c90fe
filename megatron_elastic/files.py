"""Readers of the small file formats users hand to the tools (JSON, JSON lines, safetensors
headers), each failing with a ``ValueError`` that names the file and says what is wrong with it.
Checkpoints (:mod:`.checkpoint`, :mod:`.integrity`), YAML recipes (:func:`.config.load_yaml`),
tokenizers and indexed datasets (:mod:`.data`) have their own checks."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["check_safetensors", "iter_jsonl", "read_json"]


def read_json(file: str | Path) -> Any:
    """The JSON document in ``file``."""
    file = Path(file)
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(file)!r} is not valid JSON ({exc})") from exc


def iter_jsonl(file: str | Path) -> Iterator[tuple[str, Any]]:
    """``("file:line", value)`` for every non-blank line of a JSON-lines file."""
    file = Path(file)
    with file.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{file}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}: not UTF-8 text ({exc.reason})") from exc
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from exc
            yield where, value


def check_safetensors(file: str | Path) -> None:
    """A safetensors file whose header parses and whose tensors end exactly at the end of the
    file: what a truncated or overwritten file fails (the format has no checksum, so a flipped
    byte inside tensor data stays undetectable)."""
    file = Path(file)
    size = file.stat().st_size
    problem = None
    with file.open("rb") as f:
        raw = f.read(8)
        length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < length <= size - 8:
            problem = "its header length is impossible for the file's size"
        else:
            try:
                header = json.loads(f.read(length))
                ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                problem = "its header is not valid safetensors JSON"
            else:
                if 8 + length + max(ends, default=0) != size:
                    problem = (
                        f"its tensors need {8 + length + max(ends, default=0):,} bytes, the file "
                        f"has {size:,} (truncated?)"
                    )
    if problem:
        raise ValueError(f"{str(file)!r} is damaged: {problem}; export or download it again")
