"""Data: tokenizers (HF BPE and SentencePiece), reasoning text generation and scoring, the
make_tiny_corpus and prepare_data tools end to end, and megatron GPT datasets -> micro-batches."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_elastic.data import (
    HFTokenizer,
    ReasoningRecord,
    SentencePieceTokenizer,
    build_gpt_datasets,
    extract_answer,
    generate_records,
    load_tokenizer,
    micro_batches,
    render_prompt,
    render_text,
    score_answer,
    train_bpe_tokenizer,
    write_indexed_dataset,
)
from megatron_elastic.data.reasoning import DEFAULT_TASKS, QUICKSTART_TASKS

ROOT = Path(__file__).parents[2]
SAMPLE = "Question: 12 + 30 = ?\nAnswer:  12 + 30 = 42\n#### 42 (ü, 東京, tab\there)"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _texts(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    words = ["apple", "kiwi", "total", "step", "answer", "bought", "the", "of", "+", "="]
    return [" ".join(f"{r.choice(words)} {r.randint(0, 99)}" for _ in range(12)) for _ in range(n)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
    return train_bpe_tokenizer(_texts(400), 320, tmp_path_factory.mktemp("bpe") / "tok.json")


# --- tokenizers --------------------------------------------------------------------------------


def test_bpe_tokenizer_round_trip_and_deterministic(bpe, tmp_path) -> None:
    assert isinstance(bpe, HFTokenizer) and bpe.vocab_size == 320
    assert bpe.decode(bpe.encode(SAMPLE)) == SAMPLE  # byte-level: unseen characters too
    assert bpe.encode("<|endoftext|>") == [bpe.eod]
    again = train_bpe_tokenizer(_texts(400), 320, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == bpe.save(tmp_path / "first.json").read_bytes()
    assert again.encode(SAMPLE) == bpe.encode(SAMPLE)
    loaded = load_tokenizer(bpe.save(tmp_path / "saved" / "tokenizer.json").parent)
    assert loaded.encode(SAMPLE) == bpe.encode(SAMPLE) and loaded.eod == bpe.eod


def test_bpe_tokenizer_split_digits(tmp_path) -> None:
    split = train_bpe_tokenizer(_texts(400), 600, tmp_path / "digits.json", split_digits=True)
    assert split.decode(split.encode(SAMPLE)) == SAMPLE
    assert load_tokenizer(tmp_path / "digits.json").encode(SAMPLE) == split.encode(SAMPLE)
    pieces = [split.decode([i]) for i in split.encode(SAMPLE)]
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("1230123042" + "42")  # one token per digit, nothing merged with it
    # without the option the same training merges whole numbers (" 12") into one token
    plain = train_bpe_tokenizer(_texts(400), 600, tmp_path / "plain.json")
    assert " 12" in [plain.decode([i]) for i in plain.encode(SAMPLE)]


def test_sentencepiece_tokenizer_round_trip(tmp_path) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_texts(300)),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        num_threads=1,
        minloglevel=2,
    )
    tok = load_tokenizer(tmp_path / "sp.model")
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 320
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.eod == 2  # sentencepiece's default eos id
    copy = load_tokenizer(tok.save(tmp_path / "copy.model"))
    assert copy.encode(SAMPLE) == tok.encode(SAMPLE)


def test_load_tokenizer_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="unknown tokenizer file"):
        load_tokenizer(tmp_path / "vocab.txt")
    with pytest.raises(ValueError, match="has none of"):
        load_tokenizer(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read HF tokenizer"):
        load_tokenizer(tmp_path / "broken.json")
    (tmp_path / "broken.model").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot read SentencePiece"):
        load_tokenizer(tmp_path / "broken.model")


# --- reasoning text ----------------------------------------------------------------------------


def test_reasoning_records_deterministic_and_distinct() -> None:
    records = generate_records(60, seed=3)
    assert records == generate_records(60, seed=3)
    assert records != generate_records(60, seed=4)
    assert len({r.question for r in records}) == len(records)
    assert {r.task for r in records} == set(DEFAULT_TASKS)
    for r in records:
        text = render_text(r)
        assert text.startswith(render_prompt(r) + " ")
        assert text.endswith(f"\n#### {r.answer}") and r.solution.strip()
        assert ReasoningRecord.from_json(json.loads(json.dumps(r.to_json()))) == r
    long = generate_records(60, seed=3, size="long")
    mean_lines = lambda rs: sum(r.solution.count("\n") + 1 for r in rs) / len(rs)
    assert mean_lines(long) > mean_lines(records)
    # the quickstart's short problems: at most 3 terms of at most 2 digits, x = 1..9
    short = generate_records(60, seed=3, tasks=QUICKSTART_TASKS, size="short")
    assert {r.task for r in short} == set(QUICKSTART_TASKS)
    assert short == generate_records(60, seed=3, tasks=QUICKSTART_TASKS, size="short")
    for r in short:
        numbers = re.findall(r"\d+", r.question.split(":")[-1])
        if r.task == "chain_sum":
            assert 2 <= len(numbers) <= 3 and all(len(n) <= 2 for n in numbers), r.question
        else:
            assert 1 <= int(r.answer) <= 9, r
    with pytest.raises(ValueError, match=r"size must be one of \('short', 'standard', 'long'\)"):
        generate_records(1, seed=0, size="huge")


def test_score_answer_uses_task_scorer() -> None:
    for r in generate_records(40, seed=5):
        assert extract_answer(render_text(r)) == r.answer
        assert score_answer(r, r.answer) == 1.0
        assert score_answer(r, None) == 0.0
        assert score_answer(r, "no idea") == 0.0
        # a wrong number that does not contain the answer: 0, except gsm_symbolic's 0.01 credit
        digit = next(d for d in "7312" if d not in r.answer)
        wrong = score_answer(r, digit * (len(r.answer) + 1))
        assert wrong == (0.01 if r.task == "gsm_symbolic" else 0.0), (r, wrong)
    assert extract_answer("no mark here") is None
    assert extract_answer("steps\n#### 12\nQuestion: next") == "12"


def test_worked_steps_reach_the_answer() -> None:
    r = ReasoningRecord("chain_sum", "q", "", "0")
    assert score_answer(r, "0") == 1.0
    by_task = {}
    for rec in generate_records(200, seed=0, size="long"):
        by_task.setdefault(rec.task, rec)
    eq = by_task["simple_equations"]
    assert "Check:" in eq.solution and eq.solution.endswith(f"= {eq.answer}.")
    chain = by_task["chain_sum"]
    assert chain.solution.splitlines()[-1].endswith(f"= {chain.answer}")


# --- tools end to end --------------------------------------------------------------------------


def test_corpus_and_prepare_data_end_to_end(tmp_path) -> None:
    corpus = tmp_path / "corpus"
    args = ["--output", str(corpus), "--num-train", "60", "--num-valid", "10", "--seed", "7"]
    result = _run_tool("make_tiny_corpus", *args)
    assert result.returncode == 0, result.stderr
    train = [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()]
    valid = [json.loads(line) for line in (corpus / "valid.jsonl").read_text().splitlines()]
    assert len(train) == 60 and len(valid) == 10
    assert {"text", "task", "question", "answer"} <= set(train[0])
    assert not {r["question"] for r in train} & {r["question"] for r in valid}
    first = (corpus / "train.jsonl").read_bytes()
    assert _tool("make_tiny_corpus").main(args) == 0  # same arguments, same file
    assert (corpus / "train.jsonl").read_bytes() == first

    prefix = tmp_path / "data" / "train"
    result = _run_tool(
        "prepare_data",
        *("--input", str(corpus / "train.jsonl"), "--train-tokenizer", "512"),
        *("--output", str(prefix), "--append-eod"),
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads(Path(f"{prefix}.json").read_text())
    tok = load_tokenizer(manifest["tokenizer"])
    assert Path(manifest["tokenizer"]) == (tmp_path / "data" / "tokenizer.json").resolve()
    assert manifest["vocab_size"] == tok.vocab_size <= 512 and manifest["documents"] == 60
    expected = [[*tok.encode(row["text"]), tok.eod] for row in train]
    dataset = IndexedDataset(str(prefix))
    assert [dataset[i].tolist() for i in range(len(dataset))] == expected
    assert manifest["tokens"] == sum(map(len, expected))

    # a directory input reads every *.jsonl in name order; an existing tokenizer, no EOD
    both = tmp_path / "data" / "both"
    prepare = _tool("prepare_data")
    argv = ["--input", str(corpus), "--tokenizer", manifest["tokenizer"], "--output", str(both)]
    assert prepare.main(argv) == 0
    dataset = IndexedDataset(str(both))
    assert [dataset[i].tolist() for i in range(len(dataset))] == [
        tok.encode(row["text"]) for row in train + valid
    ]


def test_prepare_data_bad_input(tmp_path, bpe, capsys) -> None:
    prepare = _tool("prepare_data")
    tokenizer = str(bpe.save(tmp_path / "tokenizer.json"))
    out = str(tmp_path / "out" / "data")

    def fails(input_path: Path, message: str, *extra: str) -> None:
        argv = ["--input", str(input_path), "--output", out, *extra]
        assert prepare.main(argv if extra else [*argv, "--tokenizer", tokenizer]) == 2
        assert message in capsys.readouterr().err
        assert not Path(f"{out}.bin").exists() and not Path(f"{out}.partial.bin").exists()

    fails(tmp_path / "missing.jsonl", "does not exist")
    (tmp_path / "empty.jsonl").write_text("\n")
    fails(tmp_path / "empty.jsonl", "has no documents")
    (tmp_path / "nojsonl").mkdir()
    fails(tmp_path / "nojsonl", "has no *.jsonl files")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    fails(tmp_path / "bad.jsonl", "bad.jsonl:3: not valid JSON")
    fails(tmp_path / "bad.jsonl", "bad.jsonl:3: not valid JSON", "--train-tokenizer", "300")
    (tmp_path / "nokey.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    fails(tmp_path / "nokey.jsonl", "nokey.jsonl:2: no 'text' key (found ['body'])")
    (tmp_path / "vocab.txt").write_text("a\n")
    fails(
        tmp_path / "nokey.jsonl",
        "unknown tokenizer file",
        "--tokenizer",
        str(tmp_path / "vocab.txt"),
    )

    # the real command line: exit status 2 and the message on stderr
    result = _run_tool("prepare_data", "--input", str(tmp_path / "bad.jsonl"), "--output", out,
                       "--tokenizer", tokenizer)  # fmt: skip
    assert result.returncode == 2 and "bad.jsonl:3: not valid JSON" in result.stderr


# --- megatron GPT datasets ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory, bpe) -> tuple[Path, Path, list[list[int]]]:
    work = tmp_path_factory.mktemp("gpt_data")
    docs = [[*bpe.encode(t), bpe.eod] for t in _texts(120, seed=1)]
    write_indexed_dataset(work / "a", docs, bpe.vocab_size)
    write_indexed_dataset(work / "b", [bpe.encode(t) for t in _texts(50, seed=2)], bpe.vocab_size)
    return work / "a", work / "b", docs


def test_gpt_datasets_give_shifted_windows_of_the_documents(prefixes, bpe, tmp_path) -> None:
    prefix, _, docs = prefixes
    seq = 16
    train, valid, test = build_gpt_datasets(
        prefix, seq_length=seq, tokenizer=bpe, num_samples=(50, 5, None), split="90,10,0",
        seed=1, cache_dir=tmp_path / "cache",
    )  # fmt: skip
    assert test is None and len(train) >= 50 and len(valid) >= 5
    stream = np.concatenate([docs[d] for d in train.document_index])
    windows = {tuple(w) for w in np.lib.stride_tricks.sliding_window_view(stream, seq + 1)}
    batches = list(micro_batches(train, 4))
    assert len(batches) == len(train) // 4
    for batch in batches:
        assert (
            batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (4, seq)
        )
        assert batch["tokens"].dtype == batch["labels"].dtype == torch.int64
        assert batch["loss_mask"].dtype == torch.float32 and bool((batch["loss_mask"] == 1).all())
        assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
        for t, lab in zip(batch["tokens"], batch["labels"], strict=True):
            assert (*t.tolist(), lab[-1].item()) in windows
    # same seed, same samples (read from megatron's index cache the second time)
    again, _, _ = build_gpt_datasets(
        prefix, seq_length=seq, tokenizer=bpe, num_samples=(50, 5, None), split="90,10,0",
        seed=1, cache_dir=tmp_path / "cache",
    )  # fmt: skip
    assert torch.equal(next(micro_batches(again, 4))["tokens"], batches[0]["tokens"])


def test_micro_batches_data_parallel_slices_and_resume(prefixes, bpe, tmp_path) -> None:
    train, _, _ = build_gpt_datasets(
        prefixes[0], seq_length=8, tokenizer=bpe, num_samples=(40, None, None), split="1,0,0",
        cache_dir=tmp_path,
    )  # fmt: skip
    whole = torch.cat([b["tokens"] for b in micro_batches(train, 4)])
    ranks = [list(micro_batches(train, 2, dp_rank=r, dp_size=2)) for r in range(2)]
    interleaved = torch.cat(
        [torch.cat([b0["tokens"], b1["tokens"]]) for b0, b1 in zip(*ranks, strict=True)]
    )
    assert torch.equal(interleaved, whole)
    resumed = next(micro_batches(train, 4, start=8))["tokens"]
    assert torch.equal(resumed, whole[8:12])


def test_weighted_blend_and_errors(prefixes, bpe, tmp_path) -> None:
    a, b, _ = prefixes
    train, valid, _ = build_gpt_datasets(
        [(0.3, a), (0.7, b)], seq_length=8, tokenizer=bpe, num_samples=(30, 4, None),
        split="90,10,0", cache_dir=tmp_path,
    )  # fmt: skip
    assert len(train) == 30 and len(valid) >= 4  # megatron rounds each part up
    assert next(micro_batches(train, 3))["tokens"].shape == (3, 8)
    with pytest.raises(ValueError, match="missing"):
        build_gpt_datasets(tmp_path / "nope", seq_length=8, tokenizer=bpe, num_samples=(1, 1, 1))
    with pytest.raises(ValueError, match="needs a sample count for the train split"):
        build_gpt_datasets([(1, a), (1, b)], seq_length=8, tokenizer=bpe, num_samples=(None,) * 3)
    with pytest.raises(ValueError, match=r"blend\[0\]: the weight must be a positive number"):
        build_gpt_datasets([(0, a), (1, b)], seq_length=8, tokenizer=bpe, num_samples=(1, 1, 1))
