"""Tokenizers: one small interface over HF ``tokenizers`` (``tokenizer.json``) and SentencePiece
(``.model``), loading by file type, and training a byte-level BPE tokenizer offline.

Both kinds encode without adding special tokens; documents end with :attr:`Tokenizer.eod` only
where the caller appends it (``tools/prepare_data.py --append-eod``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "EOD_TOKEN",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "train_bpe_tokenizer",
]

EOD_TOKEN = "<|endoftext|>"
"""The end-of-document token of tokenizers trained by :func:`train_bpe_tokenizer`."""

_HF_EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")


class Tokenizer(ABC):
    """Text <-> token ids, with an end-of-document id. Saved to and loaded from one file."""

    kind: str
    """Short name of the implementation, written into data manifests."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids (special tokens included)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """Id of the end-of-document token."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens added."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens kept as text)."""

    @abstractmethod
    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as one file that :func:`load_tokenizer` reads back."""


class HFTokenizer(Tokenizer):
    """A HF ``tokenizers`` tokenizer (``tokenizer.json``). The end-of-document token is the first
    in the vocabulary of ``<|endoftext|>``, ``</s>``, ``<|end_of_text|>``, ``<eos>``, ``<|eos|>``.
    """

    kind = "hf"

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        eod = next(
            (i for i in map(tokenizer.token_to_id, _HF_EOD_CANDIDATES) if i is not None), None
        )
        if eod is None:
            raise ValueError(
                f"tokenizer has none of the end-of-document tokens {list(_HF_EOD_CANDIDATES)}"
            )
        self._eod = eod

    @classmethod
    def load(cls, path: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            return cls(RustTokenizer.from_file(str(path)))
        except Exception as e:  # the Rust library raises its own exception type
            raise ValueError(f"cannot read HF tokenizer {str(path)!r}: {e}") from e

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path))
        return path


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (``.model``); its end-of-sentence id is the end-of-document id."""

    kind = "sentencepiece"

    def __init__(self, processor) -> None:
        if processor.eos_id() < 0:
            raise ValueError("SentencePiece model has no end-of-sentence token (eos_id is -1)")
        self._sp = processor

    @classmethod
    def load(cls, path: str | Path) -> SentencePieceTokenizer:
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except Exception as e:  # OSError or RuntimeError depending on the failure
            raise ValueError(f"cannot read SentencePiece model {str(path)!r}: {e}") from e
        return cls(processor)

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds(list(ids))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self._sp.serialized_model_proto())
        return path


_BY_SUFFIX: dict[str, type[HFTokenizer] | type[SentencePieceTokenizer]] = {
    ".json": HFTokenizer,
    ".model": SentencePieceTokenizer,
}
_DIR_FILES = ("tokenizer.json", "tokenizer.model")


def load_tokenizer(path: str | Path, *, model_vocab_size: int | None = None) -> Tokenizer:
    """Load ``tokenizer.json`` (HF) or ``*.model`` (SentencePiece); a directory is searched for
    ``tokenizer.json`` then ``tokenizer.model``. ``ValueError`` for a missing or unknown file, or
    for a tokenizer with more tokens than ``model_vocab_size`` (the model it is meant for)."""
    tokenizer = _load(Path(path))
    if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"tokenizer {str(path)!r} has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size {model_vocab_size}: pass the tokenizer the model was trained with"
        )
    return tokenizer


def _load(path: Path) -> Tokenizer:
    if path.is_dir():
        found = [path / name for name in _DIR_FILES if (path / name).is_file()]
        if not found:
            raise ValueError(f"tokenizer directory {str(path)!r} has none of {list(_DIR_FILES)}")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"tokenizer file {str(path)!r} does not exist")
    cls = _BY_SUFFIX.get(path.suffix)
    if cls is None:
        raise ValueError(
            f"unknown tokenizer file {str(path)!r}: expected a HF tokenizer.json (.json) or a "
            "SentencePiece model (.model)"
        )
    return cls.load(path)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, output_path: str | Path, *, split_digits: bool = False
) -> HFTokenizer:
    """Train a byte-level BPE tokenizer (every byte is in the alphabet, so any text round-trips)
    with the special token ``<|endoftext|>`` (id 0), save it to ``output_path`` (a
    ``tokenizer.json``) and return it. The vocabulary has ``vocab_size`` tokens, or fewer when the
    texts allow no more merges. The same texts in the same order give the same file.
    ``split_digits``: every digit is a token of its own (numbers are never merged), so a small
    model sees arithmetic digit by digit."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + {EOD_TOKEN}), got {vocab_size}")
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    result = HFTokenizer(tok)
    result.save(output_path)
    return result
