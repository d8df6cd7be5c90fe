"""Megatron indexed datasets (``PREFIX.bin`` / ``PREFIX.idx``) through ``megatron.core.datasets``:
writing token documents, and reading fixed-length calibration batches from them."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

__all__ = ["write_indexed_dataset", "check_prefix", "calibration_batches", "token_dtype"]


def token_dtype(vocab_size: int) -> type[np.number]:
    return np.uint16 if vocab_size < 65500 else np.int32


def write_indexed_dataset(
    prefix: str | Path, documents: Iterable[Iterable[int] | np.ndarray], vocab_size: int
) -> Path:
    """Write token documents as ``prefix.bin``/``prefix.idx``; returns the prefix."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=token_dtype(vocab_size))
    count = 0
    for doc in documents:
        tokens = np.asarray(doc if isinstance(doc, np.ndarray) else list(doc), dtype=np.int64)
        builder.add_document(tokens, [tokens.size])  # megatron casts to the token dtype
        count += 1
    if count == 0:
        raise ValueError("no documents to write")
    builder.finalize(f"{prefix}.idx")
    return prefix


_IDX_MAGIC = b"MMIDIDX\x00\x00"
# megatron's DType codes -> bytes per token (indexed_dataset.DType)
_ITEM_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}


def check_prefix(prefix: str | Path) -> None:
    """Clear errors for a dataset prefix whose files are missing or damaged: the ``.idx``
    header, its length for the sequence and document counts it declares, and the ``.bin``
    length its last sequence pointer implies (what megatron's reader would otherwise meet as an
    assertion or a short ``numpy.frombuffer``)."""
    missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not Path(f"{prefix}{ext}").is_file()]
    if missing:
        raise ValueError(
            f"dataset prefix {str(prefix)!r} is missing {missing}; give the path without the "
            ".bin/.idx extension (tools/prepare_data.py writes both)"
        )
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    fix = "write the dataset again with tools/prepare_data.py"
    with idx.open("rb") as f:
        header = f.read(34)
        if len(header) < 34 or header[:9] != _IDX_MAGIC:
            raise ValueError(f"{idx} is not a megatron indexed-dataset index (bad header); {fix}")
        version, code, sequences, documents = struct.unpack("<QBQQ", header[9:])
        if version != 1 or code not in _ITEM_BYTES:
            raise ValueError(f"{idx} has version {version}, token type {code}: unknown; {fix}")
        expected = 34 + 12 * sequences + 8 * documents
        if idx.stat().st_size != expected:
            raise ValueError(
                f"{idx} has {idx.stat().st_size:,} bytes, its header declares {expected:,} "
                f"(truncated or damaged); {fix}"
            )
        if sequences:
            f.seek(34 + 4 * (sequences - 1))
            (length,) = struct.unpack("<i", f.read(4))
            f.seek(34 + 4 * sequences + 8 * (sequences - 1))
            (pointer,) = struct.unpack("<q", f.read(8))
            need = pointer + length * _ITEM_BYTES[code]
            if bin_.stat().st_size != need:
                raise ValueError(
                    f"{bin_} has {bin_.stat().st_size:,} bytes, its index {idx.name} says "
                    f"{need:,} (truncated, damaged, or from another dataset); {fix}"
                )


def calibration_batches(
    prefix: str | Path, *, num_samples: int, seq_length: int, batch_size: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``num_samples`` sequences of ``seq_length`` tokens (documents concatenated, windows drawn
    at seeded random offsets), in batches of ``batch_size``."""
    check_prefix(prefix)
    dataset = IndexedDataset(str(prefix))
    stream = np.concatenate([np.asarray(dataset[i]) for i in range(len(dataset))])
    need = seq_length + 1
    if stream.size < need:
        raise ValueError(f"dataset {str(prefix)!r} has {stream.size} tokens; need >= {need}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.size - need + 1, (num_samples,), generator=g).tolist()
    windows = torch.from_numpy(np.stack([stream[s : s + need] for s in starts]).astype(np.int64))
    batches = []
    for i in range(0, num_samples, batch_size):
        w = windows[i : i + batch_size]
        batches.append(
            {
                "tokens": w[:, :-1],
                "labels": w[:, 1:],
                "loss_mask": torch.ones(w.size(0), seq_length),
            }
        )
    return batches
