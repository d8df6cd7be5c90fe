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
        --tokenizer runs/data/tokenizer.json --output runs/data/valid --append-eod --workers 8

Bad input (missing or empty input, unknown tokenizer file, a line that is not JSON or lacks the
text key) stops with exit code 2 and a message naming the file and line; nothing is written then.
--workers N tokenizes in N processes and writes the same bytes as one (the body of this tool is
megatron_elastic.data.prepare).
"""

from __future__ import annotations

import sys

from megatron_elastic import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    from megatron_elastic.data.prepare import prepare_dataset

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
    parser.add_argument("--text-key", help="JSON field holding the document")
    parser.add_argument(
        "--append-eod", action="store_true", help="end every document with the EOD token"
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="tokenizer processes (same output for any number; default %(default)s)",
    )
    parser.take_defaults(prepare_dataset)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")

    manifest = prepare_dataset(
        args.input,
        args.output,
        tokenizer=args.tokenizer,
        train_tokenizer=args.train_tokenizer,
        split_digits=args.split_digits,
        text_key=args.text_key,
        append_eod=args.append_eod,
        workers=args.workers,
    )
    print(
        f"wrote {manifest['documents']} documents, {manifest['tokens']} tokens to "
        f"{args.output}.bin/.idx (vocab {manifest['vocab_size']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
