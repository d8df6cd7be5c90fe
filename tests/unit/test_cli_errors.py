"""Every CLI under ``tools/`` and ``python -m megatron_elastic.train``, driven with damaged
inputs of every kind it reads (checkpoints, safetensors, tokenizer files, indexed datasets, YAML,
JSON and JSON lines) and out-of-range values: each answers ``error: ...`` on one stderr line
naming what is wrong, exit status 2, no traceback; nothing it read is changed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_elastic import cli

ROOT = Path(__file__).parents[2]
TRAIN_FIXTURE = ROOT / "tests" / "fixtures" / "train_small"
TINY = ROOT / "examples" / "tiny"


def _truncate(file: Path, keep: float = 0.5) -> None:
    file.write_bytes(file.read_bytes()[: int(file.stat().st_size * keep)])


def _flip(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def _copy(source: Path, target: Path) -> Path:
    (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    return target


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, pgs, tiny_elastic_checkpoint) -> dict[str, Path]:
    """Valid inputs of every kind the tools read, and a damaged copy of each."""
    from megatron_elastic.checkpoint import save_checkpoint
    from megatron_elastic.config import load_model_config
    from megatron_elastic.data import (
        generate_records,
        render_text,
        train_bpe_tokenizer,
        write_indexed_dataset,
    )
    from megatron_elastic.export.hf import export_subnet_to_hf
    from megatron_elastic.model import build_hybrid_model

    d = tmp_path_factory.mktemp("cli_errors")
    records = generate_records(40, seed=5)
    texts = [render_text(r) for r in records]
    tok = train_bpe_tokenizer(texts, 300, d / "tokenizer.json")
    p = {"tok": d / "tokenizer.json", "tok_bad": d / "bad" / "tokenizer.json"}
    p["tok_bad"].parent.mkdir()
    _truncate(_copy(p["tok"], p["tok_bad"]), 0.3)

    p["data"] = write_indexed_dataset(d / "data", ([*tok.encode(t), tok.eod] for t in texts), 4096)
    for part in ("idx", "bin"):
        prefix = d / f"data_bad_{part}"
        for ext in ("idx", "bin"):
            _copy(Path(f"{p['data']}.{ext}"), Path(f"{prefix}.{ext}"))
        _truncate(Path(f"{prefix}.{part}"), 0.9)
        p[f"data_bad_{part}"] = prefix

    p["corpus"] = d / "corpus.jsonl"
    rows = [
        json.dumps({"question": r.question, "text": t}) for r, t in zip(records, texts, strict=True)
    ]
    p["corpus"].write_text("\n".join(rows) + "\n")
    p["corpus_bad"] = d / "corpus_bad.jsonl"
    p["corpus_bad"].write_text("\n".join([*rows[:2], '{"text": "unterminated', *rows[2:]]))
    p["corpus_binary"] = d / "corpus_binary.jsonl"
    p["corpus_binary"].write_bytes(rows[0].encode() + b"\n\xff\xfe\x00garbage\n")
    p["yaml_bad"] = d / "bad.yaml"
    p["yaml_bad"].write_text("hybrid_pattern: [M-M*\nhidden_size: 8\n")
    p["yaml_unknown"] = d / "unknown.yaml"
    p["yaml_unknown"].write_text(
        (TINY / "model.yaml").read_text() + "\nhiden_size: 8\n"
    )  # a typo'd key

    # checkpoints: the tiny parent (for the tools) and the trainer fixture's parent (for train)
    tiny_cfg = load_model_config(TINY / "model.yaml")
    save_checkpoint(d / "parent", build_hybrid_model(tiny_cfg, pgs), tiny_cfg, kind="parent")
    _flip(next((_copy(d / "parent", d / "parent_flipped") / "weights").glob("*.distcp")))
    small_cfg = load_model_config(TRAIN_FIXTURE / "model.yaml")
    small = build_hybrid_model(small_cfg, pgs)
    save_checkpoint(d / "train_parent", small, small_cfg, kind="ranked")
    _truncate(next((_copy(d / "train_parent", d / "train_bad") / "weights").glob("*.distcp")))
    elastic, model, router = tiny_elastic_checkpoint
    p["elastic"] = _copy(elastic, d / "elastic")
    _flip(_copy(elastic, d / "elastic_bad_extra") / "extra.pt")
    _truncate(next((_copy(elastic, d / "elastic_trunc") / "weights").glob("*.distcp")))
    (_copy(elastic, d / "elastic_no_metadata") / "weights" / ".metadata").unlink()
    for name in ("parent", "parent_flipped", "train_parent", "train_bad"):
        p[name] = d / name
    for name in ("elastic_bad_extra", "elastic_trunc", "elastic_no_metadata"):
        p[name] = d / name

    # a Hugging Face export and damaged copies
    spec = router.decide("full", 0, None, deterministic=True).spec
    export_subnet_to_hf(model, spec, d / "hf", tokenizer_path=p["tok"], metadata={"budget": "f"})
    p["hf"] = d / "hf"
    _truncate(_copy(d / "hf", d / "hf_trunc") / "model.safetensors", 0.8)
    (_copy(d / "hf", d / "hf_header") / "model.safetensors").write_bytes(b"\xff" * 64)
    (_copy(d / "hf", d / "hf_json") / "config.json").write_text('{"vocab_size": 4')
    for name in ("hf_trunc", "hf_header", "hf_json"):
        p[name] = d / name
    p["file"] = d / "a_file"
    p["file"].write_text("not a directory\n")
    # JSON the tools read besides HF configs: a checkpoint manifest and a save's latest.json
    (_copy(elastic, d / "elastic_bad_manifest") / "manifest.json").write_text('{"kind": ')
    p["elastic_bad_manifest"] = d / "elastic_bad_manifest"
    p["save_bad_latest"] = d / "save_bad_latest"
    p["save_bad_latest"].mkdir()
    (p["save_bad_latest"] / "latest.json").write_text("{oops")
    p["out"] = d / "out"  # never written: every case fails first
    return p


def _cases(p: dict[str, Path]) -> list[tuple[str, list[str], str]]:
    """(tool, argv, what the one-line error must name)."""
    s = {k: str(v) for k, v in p.items()}
    out = s["out"]
    imp = ["--elastic-config", str(TINY / "elastic.yaml"), "--data", s["data"], "--output", out]
    imp += ["--num-samples", "2", "--seq-length", "16"]
    ev = ["--data", s["data"], "--tokenizer", s["tok"], "--num-problems", "0", "--output", out]
    train = [
        *("--config", str(TRAIN_FIXTURE / "stage.yaml")),
        f"data.blend={s['data']}",
        f"data.tokenizer={s['tok']}",
        f"distill.teacher_checkpoint={s['train_parent']}",
        f"checkpoint.init={s['train_parent']}",
        f"checkpoint.save={out}",
    ]
    return [
        # HF import: damaged safetensors (truncated, header), damaged config.json, no directory
        (
            "tools/convert_hf_to_megatron.py",
            ["--hf", s["hf_trunc"], "--output", out],
            "model.safetensors",
        ),
        (
            "tools/convert_hf_to_megatron.py",
            ["--hf", s["hf_header"], "--output", out],
            "model.safetensors",
        ),
        ("tools/convert_hf_to_megatron.py", ["--hf", s["hf_json"], "--output", out], "config.json"),
        ("tools/convert_hf_to_megatron.py", ["--hf", s["out"], "--output", out], s["out"]),
        # megatron -> HF: a flipped shard byte, a damaged tokenizer, no checkpoint
        (
            "tools/convert_megatron_to_hf.py",
            ["--checkpoint", s["parent_flipped"], "--output", out],
            ".distcp",
        ),
        (
            "tools/convert_megatron_to_hf.py",
            ["--checkpoint", s["parent"], "--tokenizer", s["tok_bad"], "--output", out],
            "tokenizer.json",
        ),
        ("tools/convert_megatron_to_hf.py", ["--checkpoint", s["file"], "--output", out], "a_file"),
        # Megatron-LM: a flipped shard byte, a damaged tokenizer, not a Megatron-LM checkpoint
        (
            "tools/convert_megatron_lm.py",
            ["export", "--checkpoint", s["parent_flipped"], "--output", out],
            ".distcp",
        ),
        (
            "tools/convert_megatron_lm.py",
            ["export", "--checkpoint", s["parent"], "--tokenizer", s["tok_bad"], "--output", out],
            "tokenizer.json",
        ),
        (
            "tools/convert_megatron_lm.py",
            ["import", "--load", s["file"], "--output", out],
            "a_file",
        ),
        # importance: YAML, checkpoint, dataset
        (
            "tools/estimate_importance.py",
            [*imp[:1], s["yaml_bad"], *imp[2:], "--checkpoint", s["parent"]],
            "bad.yaml' is not valid YAML (line 2",
        ),
        ("tools/estimate_importance.py", [*imp, "--checkpoint", s["parent_flipped"]], ".distcp"),
        (
            "tools/estimate_importance.py",
            [*imp[:2], "--data", s["data_bad_idx"], *imp[4:], "--checkpoint", s["parent"]],
            "data_bad_idx.idx",
        ),
        # evaluate: megatron checkpoint, HF directory, dataset, tokenizer, JSONL
        ("tools/evaluate.py", ["--checkpoint", s["elastic_trunc"], *ev], "truncated"),
        ("tools/evaluate.py", ["--checkpoint", s["hf_trunc"], *ev], "model.safetensors"),
        (
            "tools/evaluate.py",
            ["--checkpoint", s["elastic"], *ev[:1], s["data_bad_bin"], *ev[2:]],
            "data_bad_bin.bin",
        ),
        (
            "tools/evaluate.py",
            ["--checkpoint", s["elastic"], *ev[:3], s["tok_bad"], *ev[4:]],
            "tokenizer.json",
        ),
        (
            "tools/evaluate.py",
            ["--checkpoint", s["elastic"], *ev[:5], "2", "--exclude", s["corpus_bad"], *ev[6:]],
            "corpus_bad.jsonl:3",
        ),
        # export: router state, tokenizer, shard metadata
        (
            "tools/export_budget.py",
            ["--checkpoint", s["elastic_bad_extra"], "--all", "--output", out],
            "extra.pt",
        ),
        (
            "tools/export_budget.py",
            [
                "--checkpoint",
                s["elastic"],
                "--all",
                "--format",
                "hf",
                "--tokenizer",
                s["tok_bad"],
                "--output",
                out,
            ],
            "tokenizer.json",
        ),
        (
            "tools/export_budget.py",
            ["--checkpoint", s["elastic_no_metadata"], "--all", "--output", out],
            ".metadata",
        ),
        # generate: out-of-range budget, damaged checkpoint, damaged tokenizer
        (
            "tools/generate.py",
            [
                "--checkpoint",
                s["elastic"],
                "--tokenizer",
                s["tok"],
                "--budget",
                "2.0",
                "--prompt",
                "x",
            ],
            "2.0",
        ),
        (
            "tools/generate.py",
            ["--checkpoint", s["elastic_no_metadata"], "--tokenizer", s["tok"], "--prompt", "x"],
            ".metadata",
        ),
        (
            "tools/generate.py",
            ["--checkpoint", s["elastic"], "--tokenizer", s["tok_bad"], "--prompt", "x"],
            "tokenizer.json",
        ),
        # budget sweep: router state, tokenizer
        (
            "tools/sweep_budgets.py",
            ["--checkpoint", s["elastic_bad_extra"], "--output", out],
            "extra.pt",
        ),
        (
            "tools/sweep_budgets.py",
            ["--checkpoint", s["elastic"], "--tokenizer", s["tok_bad"], "--output", out],
            "tokenizer.json",
        ),
        # latency profiling: the recipe YAML (malformed, unknown key)
        ("tools/profile_latency.py", ["--config", s["yaml_bad"], "--output", out], "bad.yaml"),
        # inspection: YAML (malformed, unknown key), router state
        ("tools/inspect_budgets.py", ["--config", s["yaml_bad"]], "bad.yaml"),
        ("tools/inspect_budgets.py", ["--checkpoint", s["elastic_bad_extra"]], "extra.pt"),
        ("tools/inspect_model.py", ["--config", s["yaml_bad"]], "bad.yaml"),
        ("tools/inspect_model.py", ["--config", s["yaml_unknown"]], "hiden_size"),
        ("tools/plan_memory.py", ["--recipe", s["yaml_bad"]], "bad.yaml"),
        (
            "tools/plan_memory.py",
            ["--recipe", str(TRAIN_FIXTURE / "stage.yaml"), "train.stepz=3"],
            "stepz",
        ),
        ("tools/preflight.py", ["--recipe", s["yaml_bad"]], "bad.yaml"),
        (
            "tools/preflight.py",
            ["--recipe", str(TRAIN_FIXTURE / "stage.yaml"), "train.stepz=3"],
            "stepz",
        ),
        # data preparation: JSONL (malformed line, not UTF-8), tokenizer, output that is a file
        (
            "tools/prepare_data.py",
            ["--input", s["corpus_bad"], "--tokenizer", s["tok"], "--output", out],
            "corpus_bad.jsonl:3",
        ),
        (
            "tools/prepare_data.py",
            ["--input", s["corpus_binary"], "--tokenizer", s["tok"], "--output", out],
            "corpus_binary.jsonl:2",
        ),
        (
            "tools/prepare_data.py",
            ["--input", s["corpus"], "--tokenizer", s["tok_bad"], "--output", out],
            "tokenizer.json",
        ),
        (
            "tools/make_tiny_corpus.py",
            ["--output", s["file"], "--num-train", "2", "--num-valid", "1"],
            "a_file",
        ),
        ("tools/quickstart.py", ["--output", s["file"]], "a_file"),
        ("tools/make_lm_eval_tasks.py", ["--output", s["file"], "--num-problems", "2"], "a_file"),
        # training: recipe YAML, tokenizer, dataset index, the init checkpoint's shard
        ("megatron_elastic.train", ["--config", s["yaml_bad"]], "bad.yaml"),
        ("megatron_elastic.train", [*train, f"data.tokenizer={s['tok_bad']}"], "tokenizer.json"),
        ("megatron_elastic.train", [*train, f"data.blend={s['data_bad_idx']}"], "data_bad_idx.idx"),
        ("megatron_elastic.train", [*train, f"checkpoint.init={s['train_bad']}"], ".distcp"),
        ("megatron_elastic.train", [*train, f"checkpoint.save={s['save_bad_latest']}"], "latest"),
        (
            "tools/generate.py",
            ["--checkpoint", s["elastic_bad_manifest"], "--prompt", "x"],
            "corrupt manifest.json",
        ),
        ("tools/serve.py", ["--checkpoint", s["elastic_bad_manifest"]], "corrupt manifest.json"),
    ]


def test_invariant_every_tool_answers_damaged_input_with_one_line_and_exit_2(
    inputs, run_cli
) -> None:
    cases = _cases(inputs)
    tools = {tool for tool, _, _ in cases}
    every = {f"tools/{f.name}" for f in (ROOT / "tools").glob("*.py")}
    assert tools == every | {"megatron_elastic.train"}  # every CLI is in the battery
    before = {f: f.read_bytes() for f in inputs["out"].parent.rglob("*") if f.is_file()}
    results = run_cli([(tool, argv) for tool, argv, _ in cases])
    failures = []
    for (tool, argv, names), result in zip(cases, results, strict=True):
        lines = result["stderr"].strip().splitlines()
        ok = (
            result["traceback"] is None
            and result["rc"] == cli.EXIT_USER_ERROR
            and len(lines) == 1
            and lines[0].startswith("error: ")
            and names in lines[0]
        )
        if not ok:
            failures.append(
                f"{tool} {argv}: rc {result['rc']}, {result['stderr']!r}, {result['traceback']}"
            )
    assert not failures, "\n".join(failures)
    # nothing read was changed (megatron's dataset index cache may be added), nothing written
    assert {f: f.read_bytes() for f in before} == before and not inputs["out"].exists()


def test_internal_bugs_keep_their_traceback_and_user_errors_are_one_line(capsys) -> None:
    @cli.entry_point
    def user_error(argv):
        raise ValueError("first line\n  second line")

    @cli.entry_point
    def missing(argv):
        open("/nonexistent/file")

    @cli.entry_point
    def bug(argv):
        raise KeyError("internal")

    assert user_error([]) == 2 and capsys.readouterr().err == "error: first line second line\n"
    assert missing([]) == 2 and "/nonexistent/file" in capsys.readouterr().err
    with pytest.raises(KeyError, match="internal"):
        bug([])


def test_verbose_flag_reaches_child_processes(monkeypatch) -> None:
    from megatron_elastic import console

    monkeypatch.setenv(console.VERBOSE_ENV, "0")  # restored after the test
    parser = cli.ArgumentParser()
    assert not parser.parse_args([]).verbose and not console.verbose()
    assert parser.parse_args(["--verbose"]).verbose and console.verbose()
    child = subprocess.run(
        [sys.executable, "-c", "from megatron_elastic import console; print(console.verbose())"],
        capture_output=True,
        text=True,
    )
    assert child.stdout.strip() == "True"
