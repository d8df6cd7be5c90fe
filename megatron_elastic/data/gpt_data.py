"""Training data through megatron-core's GPT dataset machinery: ``BlendedMegatronDatasetBuilder``
builds train/valid/test ``GPTDataset`` (or ``BlendedDataset``) splits of fixed-length samples
from indexed datasets, and :func:`micro_batches` stacks them into the project's batch format.

On CPU this works as is with megatron-core 0.19.2: the index builder's C++ helpers ship compiled
in the wheel (``megatron/core/datasets/helpers_cpp*.so``; nothing is compiled at run time), the
builder calls ``torch.distributed`` only when it is initialized (gloo is fine: rank 0 builds the
index cache, the others wait on a barrier and read it), and no CUDA is touched.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.utils import Split
from torch.utils.data import Dataset

from megatron_elastic.data.indexed import check_prefix
from megatron_elastic.data.tokenizers import Tokenizer

__all__ = [
    "MegatronTokenizerAdapter",
    "build_gpt_datasets",
    "check_blend",
    "index_cache_dir",
    "micro_batches",
    "parse_blend",
]

Blend = str | Path | Sequence[tuple[float, str | Path] | list[Any]]
"""One dataset prefix, or ``(weight, prefix)`` pairs sampled in proportion to the weights."""


class MegatronTokenizerAdapter:
    """What megatron's ``GPTDataset`` reads from ``config.tokenizer``: ``vocab_size`` (token dtype),
    ``eod`` (EOD loss masking / position resets), ``pad`` and ``unique_identifiers`` (hashed into
    the index cache names)."""

    pad = -1
    """Our tokenizers have no pad token; -1 never occurs in the data, and samples are only padded
    when a split keeps its last partial sequence (not with megatron's defaults)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        self.unique_identifiers = {
            "class": type(tokenizer).__name__,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
        }

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)


def parse_blend(blend: Any, field: str = "blend") -> tuple[list[str], list[float] | None]:
    """The prefixes and weights (None for a single prefix) of ``blend``: one prefix, or a
    non-empty list of ``[weight, prefix]`` pairs with positive finite weights and non-empty
    prefixes. Checks the structure only (:func:`check_blend` checks the files);
    ``ValueError`` naming ``field`` otherwise."""
    form = f"{field} is one dataset prefix or a list of [weight, prefix] pairs"
    if isinstance(blend, str | Path):
        words = str(blend).split()
        if len(words) > 1 and _is_number(words[0]):
            raise ValueError(
                f"{field}={str(blend)!r} looks like 'weight prefix ...' words; {form}, e.g. "
                f"[[{words[0]}, {words[1]}], ...]"
            )
        if not str(blend):
            raise ValueError(f"{field} is empty; {form}")
        return [str(blend)], None
    if not isinstance(blend, Sequence) or not blend:
        raise ValueError(f"{field}={blend!r}: {form}")
    prefixes, weights = [], []
    for i, pair in enumerate(blend):
        where = f"{field}[{i}]"
        if not (isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2):
            raise ValueError(f"{where}={pair!r} is not a [weight, prefix] pair; {form}")
        weight, prefix = pair
        number = isinstance(weight, int | float) and not isinstance(weight, bool)
        if not (number and 0 < weight < math.inf):
            raise ValueError(f"{where}: the weight must be a positive number, got {weight!r}")
        if not (isinstance(prefix, str | Path) and str(prefix)):
            raise ValueError(f"{where}: the prefix must be a non-empty path, got {prefix!r}")
        prefixes.append(str(prefix))
        weights.append(float(weight))
    return prefixes, (weights if len(prefixes) > 1 else None)


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def index_cache_dir(prefixes: Sequence[str], cache_dir: str | Path | None) -> Path:
    """Where the index caches of a blend go: ``cache_dir``, or ``index_cache/`` beside the first
    prefix. (megatron-core's own default, without a path, is ``<prefix>/cache/GPTDataset_indices``
    for each dataset, and a weighted blend's index is then not saved at all.)"""
    return Path(cache_dir) if cache_dir is not None else Path(prefixes[0]).parent / "index_cache"


def check_blend(blend: Blend, cache_dir: str | Path | None = None) -> None:
    """Before any collective: ``ValueError`` for a malformed blend, a missing or damaged dataset
    prefix, or an index-cache directory that cannot be written (megatron's rank 0 would fail
    writing while the other ranks wait for it). An existing read-only cache directory is refused
    too, even when it holds the caches already."""
    prefixes, _ = parse_blend(blend, field="data.blend")
    for prefix in prefixes:
        check_prefix(prefix)
    cache = index_cache_dir(prefixes, cache_dir).absolute()
    existing = next(p for p in (cache, *cache.parents) if p.exists())
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return
    problem = "is not a directory" if not existing.is_dir() else "is not writable"
    if cache_dir is not None:
        raise ValueError(
            f"data.cache_dir={str(cache_dir)!r}: {existing} {problem}; give a writable directory "
            "that every rank sees (megatron writes the dataset index caches there)"
        )
    raise ValueError(
        f"the dataset index cache {cache} (beside the data) cannot be written: {existing} "
        f"{problem} (read-only data directory?); set data.cache_dir to a writable directory "
        "that every rank sees"
    )


def build_gpt_datasets(
    blend: Blend,
    *,
    seq_length: int,
    tokenizer: Tokenizer,
    num_samples: Sequence[int | None],
    split: str = "98,2,0",
    seed: int = 0,
    cache_dir: str | Path | None = None,
    eod_mask_loss: bool = False,
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """Train, valid and test datasets (None for a split with no share) of ``seq_length``-token
    samples over the documents of ``blend``, split by document in the ``split`` proportions.

    ``num_samples`` (train, valid, test): at least this many samples per split (documents repeat in
    further shuffled epochs as needed); None means one epoch. A weighted blend of several
    prefixes needs a count for every split that has a share. ``cache_dir`` holds megatron's index
    caches (default: ``index_cache/`` beside the first prefix); ``seed`` drives their shuffles.
    Every rank that calls this gets the datasets (with torch.distributed initialized, rank 0
    builds the caches first). ``eod_mask_loss`` zeroes the loss mask where the input is EOD.

    The datasets are megatron ``GPTDataset`` s (``BlendedDataset`` for a weighted blend); their
    samples are dicts of (seq_length,) tensors ``tokens``, ``labels`` (tokens shifted by one),
    ``loss_mask`` and ``position_ids``.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if len(num_samples) != len(Split):
        raise ValueError(
            f"num_samples needs one entry per split (train, valid, test): {num_samples}"
        )
    prefixes, weights = parse_blend(blend)
    for prefix in prefixes:
        check_prefix(prefix)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=str(index_cache_dir(prefixes, cache_dir)),
        tokenizer=MegatronTokenizerAdapter(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
    )
    sizes = list(num_samples)
    if weights is not None:
        for s in Split:
            if config.split_matrix[s.value] is None:
                sizes[s.value] = 0  # no share: megatron still wants a count with weights
            elif sizes[s.value] is None:
                raise ValueError(
                    f"a weighted blend needs a sample count for the {s.name} split, got None"
                )
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, lambda: True, config
    ).build()
    return train, valid, test


def micro_batches(
    dataset: Dataset,
    micro_batch_size: int,
    *,
    start: int = 0,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches of ``dataset`` in order, for data-parallel rank ``dp_rank`` of ``dp_size``:
    each group of ``dp_size * micro_batch_size`` samples from sample ``start`` on (the samples
    already consumed, to resume) gives this rank its slice. Yields ``tokens``/``labels`` int64
    (b, s) and ``loss_mask`` float (b, s); stops before an incomplete group."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
    group = micro_batch_size * dp_size
    for first in range(start, len(dataset) - group + 1, group):
        begin = first + dp_rank * micro_batch_size
        samples = [dataset[i] for i in range(begin, begin + micro_batch_size)]
        yield {
            "tokens": torch.stack([s["tokens"] for s in samples]).long(),  # (b, s)
            "labels": torch.stack([s["labels"] for s in samples]).long(),  # (b, s)
            "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float(),  # (b, s)
        }
