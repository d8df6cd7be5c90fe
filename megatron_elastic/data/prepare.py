"""Tokenizing JSON-lines text into a megatron indexed dataset (what ``tools/prepare_data.py``
runs): the input files, their documents, tokenization in worker processes, the atomic write.

With ``workers > 1`` documents are tokenized in chunks by a pool of forked processes (each loads
the tokenizer once, from its file) while this process reads the input and writes the dataset;
chunks come back in input order, so the ``.bin``/``.idx`` bytes do not depend on the number of
workers. At most a few chunks per worker are in flight (the input is never read ahead into
memory). Workers are forked (``fork`` start method, Linux): the children only tokenize, and a
fresh interpreter per worker would import megatron-core again.
"""

from __future__ import annotations

import json
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from megatron_elastic.data.indexed import write_indexed_dataset
from megatron_elastic.data.tokenizers import Tokenizer, load_tokenizer, train_bpe_tokenizer
from megatron_elastic.files import iter_jsonl

__all__ = ["encode_documents", "input_files", "iter_texts", "prepare_dataset"]

CHUNK_DOCUMENTS = 512
"""Documents per task sent to a worker (amortises the inter-process transfer)."""
_IN_FLIGHT_PER_WORKER = 4
"""Chunks submitted ahead per worker: keeps them busy without reading the input ahead."""


def input_files(path: str | Path) -> list[Path]:
    """``path`` itself (a jsonl file) or the ``*.jsonl`` files of a directory, in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise ValueError(f"input directory {str(path)!r} has no *.jsonl files")
        return files
    if not path.is_file():
        raise ValueError(f"input {str(path)!r} does not exist")
    return [path]


def iter_texts(files: Sequence[Path], text_key: str) -> Iterator[str]:
    """The ``text_key`` string of every non-blank line; ``ValueError`` naming file:line else."""
    for file in files:
        for where, row in iter_jsonl(file):
            if not isinstance(row, dict) or text_key not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{where}: no {text_key!r} key (found {keys})")
            if not isinstance(row[text_key], str):
                raise ValueError(f"{where}: {text_key!r} is not a string")
            yield row[text_key]


def _encode(
    tokenizer: Tokenizer, texts: list[str], append_eod: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The chunk's token ids concatenated (int64) and each document's length; a document that
    tokenizes to nothing gets no EOD (length 0: the caller skips it)."""
    docs = [tokenizer.encode(text) for text in texts]
    if append_eod:
        for ids in docs:
            if ids:
                ids.append(tokenizer.eod)
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    tokens = np.fromiter((t for ids in docs for t in ids), dtype=np.int64, count=int(lengths.sum()))
    return tokens, lengths


_worker_tokenizer: Tokenizer | None = None


def _worker_init(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _worker_encode(texts: list[str], append_eod: bool) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_tokenizer is not None, "worker started without its tokenizer"
    return _encode(_worker_tokenizer, texts, append_eod)


def _chunks(texts: Iterable[str]) -> Iterator[list[str]]:
    it = iter(texts)
    while chunk := list(islice(it, CHUNK_DOCUMENTS)):
        yield chunk


def _encoded_chunks(
    texts: Iterable[str],
    tokenizer: Tokenizer,
    tokenizer_path: str | Path,
    append_eod: bool,
    workers: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if workers == 1:
        for chunk in _chunks(texts):
            yield _encode(tokenizer, chunk, append_eod)
        return
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_init, initargs=(str(tokenizer_path),)
    ) as pool:
        pending: deque[Future] = deque()
        try:
            for chunk in _chunks(texts):  # bad input raises here, in input order
                pending.append(pool.submit(_worker_encode, chunk, append_eod))
                if len(pending) >= workers * _IN_FLIGHT_PER_WORKER:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # an error or an abandoned generator: drop the rest
                future.cancel()


def encode_documents(
    texts: Iterable[str],
    tokenizer: Tokenizer,
    tokenizer_path: str | Path,
    *,
    append_eod: bool = False,
    workers: int = 1,
) -> Iterator[np.ndarray]:
    """Token ids (int64) of each of ``texts``, in order, EOD-terminated with ``append_eod``
    (documents that tokenize to nothing stay empty). ``workers > 1`` tokenizes in that many
    forked processes, each loading ``tokenizer_path`` (the file ``tokenizer`` was loaded from);
    the ids are the same for any number of workers."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    for tokens, lengths in _encoded_chunks(texts, tokenizer, tokenizer_path, append_eod, workers):
        yield from np.split(tokens, np.cumsum(lengths)[:-1])


def prepare_dataset(
    input_path: str | Path,
    output: str | Path,
    *,
    tokenizer: str | Path | None = None,
    train_tokenizer: int | None = None,
    split_digits: bool = False,
    text_key: str = "text",
    append_eod: bool = False,
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tokenize the jsonl ``input_path`` (a file or a directory of ``*.jsonl``) into
    ``output.bin``/``.idx`` and write ``output.json`` (tokenizer, vocabulary, counts), which is
    also returned. The tokenizer is the file ``tokenizer``, or a byte-level BPE of
    ``train_tokenizer`` tokens first trained on the same text (saved as ``tokenizer.json``
    beside ``output``). Documents that tokenize to nothing are skipped and counted. The dataset
    is written under a temporary prefix and renamed at the end: bad input leaves nothing."""
    if (tokenizer is None) == (train_tokenizer is None):
        raise ValueError("give exactly one of tokenizer (a file) and train_tokenizer (a size)")
    files = input_files(input_path)
    if next(iter_texts(files, text_key), None) is None:
        raise ValueError(f"input {str(input_path)!r} has no documents")
    prefix = Path(output)
    if tokenizer is not None:
        tokenizer_path = Path(tokenizer)
        tok = load_tokenizer(tokenizer_path)
    else:
        tokenizer_path = prefix.parent / "tokenizer.json"
        tok = train_bpe_tokenizer(
            iter_texts(files, text_key), train_tokenizer, tokenizer_path, split_digits=split_digits
        )
        log(f"trained a {tok.vocab_size}-token BPE tokenizer: {tokenizer_path}")

    counts = {"documents": 0, "tokens": 0, "skipped_empty": 0}

    def documents() -> Iterator[np.ndarray]:
        texts = iter_texts(files, text_key)
        for ids in encode_documents(
            texts, tok, tokenizer_path, append_eod=append_eod, workers=workers
        ):
            if not ids.size:
                counts["skipped_empty"] += 1
                continue
            counts["documents"] += 1
            counts["tokens"] += int(ids.size)
            yield ids

    partial = prefix.with_name(prefix.name + ".partial")
    try:
        write_indexed_dataset(partial, documents(), tok.vocab_size)
    except BaseException:
        for ext in (".bin", ".idx"):
            Path(f"{partial}{ext}").unlink(missing_ok=True)
        raise
    for ext in (".bin", ".idx"):
        Path(f"{partial}{ext}").replace(f"{prefix}{ext}")
    manifest = {
        "tokenizer": str(tokenizer_path.resolve()),
        "tokenizer_kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "eod": tok.eod,
        "append_eod": append_eod,
        "text_key": text_key,
        "inputs": [str(f.resolve()) for f in files],
        **counts,
    }
    Path(f"{prefix}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
