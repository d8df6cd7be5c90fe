#!/usr/bin/env python
"""Tokenize jsonl text into a Megatron indexed dataset (PREFIX.bin / PREFIX.idx) for training.

Reads one jsonl file, or every *.jsonl file of a directory (in name order); each line is a JSON
object whose --text-key field is one document. Tokenizes with an existing tokenizer
(--tokenizer: a HF tokenizer.json or a SentencePiece .model), or first trains a byte-level BPE
tokenizer of the given vocabulary size on the same text (--train-tokenizer; saved as
tokenizer.json beside the prefix). Also writes PREFIX.json: tokenizer path, vocabulary size,
document and token counts. Documents that tokenize to nothing are skipped (and counted).

    python tools/prepare_data.py --input runs/corpus/train.jsonl --train-tokenizer 4096 \\
        --output runs/data/train --append-eod
    python tools/prepare_data.py --input runs/corpus/valid.jsonl \\
        --tokenizer runs/data/tokenizer.json --output runs/data/valid --append-eod

Bad input (missing or empty input, unknown tokenizer file, a line that is not JSON or lacks the
text key) stops with exit code 2 and a message naming the file and line; nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from megatron_elastic import cli


def input_files(path: Path) -> list[Path]:
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
    from megatron_elastic.files import iter_jsonl

    for file in files:
        for where, row in iter_jsonl(file):
            if not isinstance(row, dict) or text_key not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{where}: no {text_key!r} key (found {keys})")
            if not isinstance(row[text_key], str):
                raise ValueError(f"{where}: {text_key!r} is not a string")
            yield row[text_key]


def prepare(args: argparse.Namespace) -> dict:
    from megatron_elastic.data.indexed import write_indexed_dataset
    from megatron_elastic.data.tokenizers import load_tokenizer, train_bpe_tokenizer

    files = input_files(Path(args.input))
    if next(iter_texts(files, args.text_key), None) is None:
        raise ValueError(f"input {args.input!r} has no documents")
    prefix = Path(args.output)
    if args.tokenizer is not None:
        tokenizer_path = Path(args.tokenizer)
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        tokenizer_path = prefix.parent / "tokenizer.json"
        tokenizer = train_bpe_tokenizer(
            iter_texts(files, args.text_key),
            args.train_tokenizer,
            tokenizer_path,
            split_digits=args.split_digits,
        )
        print(f"trained a {tokenizer.vocab_size}-token BPE tokenizer: {tokenizer_path}")

    counts = {"documents": 0, "tokens": 0, "skipped_empty": 0}

    def documents() -> Iterator[list[int]]:
        for text in iter_texts(files, args.text_key):
            ids = tokenizer.encode(text)
            if args.append_eod and ids:
                ids.append(tokenizer.eod)
            if not ids:
                counts["skipped_empty"] += 1
                continue
            counts["documents"] += 1
            counts["tokens"] += len(ids)
            yield ids

    # write under a temporary prefix so that a failure halfway leaves no dataset behind
    partial = prefix.with_name(prefix.name + ".partial")
    try:
        write_indexed_dataset(partial, documents(), tokenizer.vocab_size)
    except BaseException:
        for ext in (".bin", ".idx"):
            Path(f"{partial}{ext}").unlink(missing_ok=True)
        raise
    for ext in (".bin", ".idx"):
        Path(f"{partial}{ext}").replace(f"{prefix}{ext}")
    manifest = {
        "tokenizer": str(tokenizer_path.resolve()),
        "tokenizer_kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod,
        "append_eod": args.append_eod,
        "text_key": args.text_key,
        "inputs": [str(f.resolve()) for f in files],
        **counts,
    }
    Path(f"{prefix}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="a .jsonl file or a directory of them")
    tok = parser.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="tokenizer.json (HF) or .model (SentencePiece)")
    tok.add_argument(
        "--train-tokenizer",
        type=int,
        metavar="VOCAB",
        help="train a byte-level BPE tokenizer of this vocabulary size on the input first",
    )
    parser.add_argument(
        "--split-digits",
        action="store_true",
        help="with --train-tokenizer: one token per digit (numbers never merged; for arithmetic)",
    )
    parser.add_argument(
        "--output", required=True, help="dataset prefix: writes PREFIX.bin, .idx and .json"
    )
    parser.add_argument("--text-key", default="text", help="JSON field holding the document")
    parser.add_argument(
        "--append-eod", action="store_true", help="end every document with the EOD token"
    )
    args = parser.parse_args(argv)
    manifest = prepare(args)
    print(
        f"wrote {manifest['documents']} documents, {manifest['tokens']} tokens to "
        f"{args.output}.bin/.idx (vocab {manifest['vocab_size']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
