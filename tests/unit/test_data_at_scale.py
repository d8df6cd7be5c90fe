"""Data at scale: megatron's index caches under ``data.cache_dir`` with a read-only data
directory (single prefix and weighted blends), the one-line errors for an unwritable cache and a
malformed blend, and ``prepare_data --workers N`` writing the bytes one worker writes."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import stat
from pathlib import Path

import pytest

from megatron_elastic.data import (
    build_gpt_datasets,
    check_blend,
    gpt_data,
    prepare,
    train_bpe_tokenizer,
    write_indexed_dataset,
)
from megatron_elastic.training.recipe import DataConfig

ROOT = Path(__file__).parents[2]


def _texts(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    words = ["apple", "kiwi", "total", "step", "answer", "+", "=", "東京", "ü"]
    return [" ".join(f"{r.choice(words)} {r.randint(0, 99)}" for _ in range(r.randint(1, 20)))
            for _ in range(n)]  # fmt: skip


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_bpe_tokenizer(_texts(300, 0), 300, tmp_path_factory.mktemp("tok") / "tok.json")


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``directory`` (the directory itself too) with size and mtime."""
    entries = [directory, *directory.rglob("*")]
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in entries}


@pytest.fixture
def read_only_data(tmp_path, bpe, monkeypatch):
    """Two dataset prefixes in a directory without write permission. As root, mode bits do not
    stop writes, so ``os.access`` (what the cache check asks) is made to answer for that
    directory as on a read-only mount (EROFS); the snapshot comparisons hold either way."""
    data = tmp_path / "data"
    write_indexed_dataset(data / "a", [[*bpe.encode(t), bpe.eod] for t in _texts(80, 1)], 300)
    write_indexed_dataset(data / "b", [bpe.encode(t) for t in _texts(40, 2)], 300)
    data.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    if os.access(data, os.W_OK):  # root
        real = os.access

        def access(path, mode, *args, **kwargs):
            inside = Path(path).absolute().is_relative_to(data)
            return False if inside and mode & os.W_OK else real(path, mode, *args, **kwargs)

        monkeypatch.setattr(gpt_data.os, "access", access)
    yield data
    data.chmod(0o755)


def test_invariant_cache_dir_leaves_a_read_only_data_directory_untouched(
    read_only_data, bpe, tmp_path
) -> None:
    data, cache = read_only_data, tmp_path / "cache"
    before = _snapshot(data)
    for blend in (str(data / "a"), [[0.3, str(data / "a")], [0.7, str(data / "b")]]):
        check_blend(blend, cache)
        train, valid, _ = build_gpt_datasets(
            blend, seq_length=8, tokenizer=bpe, num_samples=(30, 4, None), split="90,10,0",
            cache_dir=cache,
        )  # fmt: skip
        assert len(train) >= 30 and len(valid) >= 4 and train[0]["tokens"].shape == (8,)
    assert _snapshot(data) == before  # nothing written beside the data
    npy = sorted(p.name for p in cache.rglob("*.npy"))
    gpt = [n for n in npy if "-GPTDataset-" in n]
    blended = [n for n in npy if "-BlendedDataset-" in n]
    # a alone, a and b in the blend (other sample counts), each train and valid: 3 indices each
    assert len(gpt) == 3 * 2 * 3 and len(blended) == 2 * 2, npy
    # without cache_dir the caches would go beside the data: refused before megatron starts
    with pytest.raises(ValueError, match=r"set data\.cache_dir") as info:
        check_blend([[1, str(data / "a")], [2, str(data / "b")]])
    assert "\n" not in str(info.value) and str(data) in str(info.value)
    with pytest.raises(ValueError, match=r"^data.cache_dir='.*sub': .* is not writable"):
        check_blend(str(data / "a"), data / "sub")  # a cache_dir inside the read-only tree
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        check_blend(str(data / "a"), tmp_path / "file" / "cache")
    assert _snapshot(data) == before


BAD_BLENDS = {
    "zero weight": ([[0, "a"], [1, "b"]], r"data.blend\[0\]: the weight must be a positive"),
    "negative": ([[1, "a"], [-1, "b"]], r"data.blend\[1\]: the weight must be a positive"),
    "string weight": ([["0.5", "a"]], r"data.blend\[0\]: the weight .* got '0.5'"),
    "bool weight": ([[True, "a"]], r"data.blend\[0\]: the weight .* got True"),
    "nan": ([[float("nan"), "a"]], r"data.blend\[0\]: the weight .* got nan"),
    "inf": ([[float("inf"), "a"]], r"data.blend\[0\]: the weight .* got inf"),
    "prefix not a string": ([[1, 3]], r"data.blend\[0\]: the prefix must be a non-empty path"),
    "empty prefix": ([[1, ""]], r"data.blend\[0\]: the prefix must be a non-empty path"),
    "not a pair": ([[0.5, "a", "b"]], r"data.blend\[0\]=.* is not a \[weight, prefix\] pair"),
    "flat list": ([0.5, "a"], r"data.blend\[0\]=0.5 is not a \[weight, prefix\] pair"),
    "empty list": ([], r"data.blend=\[\]: data.blend is one dataset prefix or a list"),
    "empty string": ("", "data.blend is empty"),
    "words": ("0.3 /d/a 0.7 /d/b", r"looks like 'weight prefix \.\.\.' words.*\[\[0.3, /d/a\]"),
}


@pytest.mark.parametrize("case", list(BAD_BLENDS))
def test_blend_errors_are_one_line_naming_the_field(case) -> None:
    blend, message = BAD_BLENDS[case]
    with pytest.raises(ValueError, match=message) as info:
        DataConfig(blend=blend, tokenizer="t.json")
    assert "\n" not in str(info.value)


def test_blend_and_cache_dir_accepted_forms() -> None:
    assert DataConfig(blend="my data/a", tokenizer="t").blend == "my data/a"  # a space in a path
    config = DataConfig(blend=[[1, "a"], [2.5, "b"]], tokenizer="t", cache_dir="/c")
    assert gpt_data.parse_blend(config.blend) == (["a", "b"], [1.0, 2.5])
    assert gpt_data.parse_blend([[3, "a"]]) == (["a"], None)
    with pytest.raises(ValueError, match=r"data\.cache_dir must be a directory path"):
        DataConfig(blend="a", tokenizer="t", cache_dir=3)


# --- prepare_data --workers ---------------------------------------------------------------------


def _prepare_tool():
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "tools/prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_invariant_prepare_data_workers_write_the_same_bytes(
    tmp_path, bpe, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(prepare, "CHUNK_DOCUMENTS", 16)  # many chunks, several in flight
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = _texts(700, 3)
    texts[5] = texts[400] = ""  # tokenize to nothing: skipped and counted
    for name, part in (("1.jsonl", texts[:300]), ("2.jsonl", texts[300:])):
        rows = [json.dumps({"text": t}, ensure_ascii=False) for t in part]
        (corpus / name).write_text("\n".join(rows) + "\n")
    tokenizer = str(bpe.save(tmp_path / "tokenizer.json"))
    tool = _prepare_tool()
    base = ["--input", str(corpus), "--tokenizer", tokenizer, "--append-eod"]
    files = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}" / "data"
        assert tool.main([*base, "--output", str(out), "--workers", str(workers)]) == 0
        files[workers] = [Path(f"{out}{ext}").read_bytes() for ext in (".bin", ".idx", ".json")]
    assert files[2] == files[1] and files[3] == files[1]
    # what the tool wrote before it had workers: each document encoded, EOD appended
    docs = [[*bpe.encode(t), bpe.eod] for t in texts if t]
    write_indexed_dataset(tmp_path / "ref" / "data", docs, bpe.vocab_size)
    assert files[2][:2] == [(tmp_path / "ref" / f"data{e}").read_bytes() for e in (".bin", ".idx")]
    assert json.loads(files[2][2])["skipped_empty"] == 2

    # bad input in a late chunk: the file and line named, nothing written, with workers too
    (corpus / "3.jsonl").write_text('{"text": "ok"}\n' * 40 + "{oops\n")
    out = tmp_path / "bad" / "data"
    capsys.readouterr()
    assert tool.main([*base, "--output", str(out), "--workers", "2"]) == 2
    assert "3.jsonl:41: not valid JSON" in capsys.readouterr().err
    assert not out.parent.exists() or not any(out.parent.iterdir())
    with pytest.raises(SystemExit):
        tool.main([*base, "--output", str(out), "--workers", "0"])
    assert "--workers must be >= 1" in capsys.readouterr().err
