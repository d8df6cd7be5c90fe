"""Budgets exported as GGUF run in llama.cpp itself (through llama-cpp-python, in a child process
so that a llama.cpp abort cannot take the test session down) and compute what the elastic model
computes at that budget: logits within F32_TOL relative (f32 file and KV cache; relative =
max |diff| / max |logit|; llama.cpp's default f16 KV cache within F16_CACHE_TOL),
the same 32 greedy tokens (llama.cpp decoding with its own KV cache and Mamba state), the same
tokenization as our tokenizer. Also: a budget without attention layers, a heterogeneous
FFN/attention budget, f16 and q8_0 files, and the refusals (heterogeneous Mamba, unsupported type,
a norm epsilon llama.cpp cannot represent)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_elastic.elastic import SubnetSpec
from megatron_elastic.elastic.budget import subnet_param_count
from megatron_elastic.export.gguf import (
    GGUF_FILE,
    GGUF_TYPES,
    check_gguf_exportable,
    export_subnet_to_gguf,
)
from megatron_elastic.training.lm_step import position_ids_like

ROOT = Path(__file__).parents[2]
SEQ_LEN, PROMPT_LEN, NEW_TOKENS = 37, 12, 32
F32_TOL = 2e-6
"""f32 file, f32 KV cache: measured worst 7.7e-7 over every budget, the attention-free and the
heterogeneous one (2026-12-07), the rounding of two fp32 implementations."""
F16_CACHE_TOL = 1.5e-4
"""f32 file, llama.cpp's default f16 KV cache (what a user runs): measured 7.2e-5, all of it the
cache's rounding of K and V (the attention-free budget stays at 7.7e-7 either way)."""
TEXTS = [
    "the elastic model exports budgets",
    "Hello world! It's 3.14159, isn't it?",
    "  two  spaces\nand a newline\t tab",
    "naïve café — 東京 🙂",
]

# Runs in a child process: llama.cpp loads one GGUF, returns logits of whole sequences (one
# llama_decode each), greedy continuations (one token per llama_decode, reusing llama.cpp's
# cache/state) and the tokenization of TEXTS (when the GGUF has a tokenizer). With f32_cache the
# KV cache is f32 (type 0 = GGML_TYPE_F32), else llama.cpp's default (f16).
_RUNNER = r"""
import json, sys
import numpy as np
import llama_cpp

job = json.loads(sys.argv[1])
llm = llama_cpp.Llama(model_path=job["model"], n_ctx=job["n_ctx"], n_batch=job["n_ctx"],
                      logits_all=True, verbose=False, n_threads=1, n_threads_batch=1, seed=0,
                      **({"type_k": 0, "type_v": 0} if job["f32_cache"] else {}))
logits = []
for seq in job["sequences"]:
    llm.reset()
    llm.eval(seq)
    logits.append(np.array(llm.scores[: len(seq)], dtype=np.float32))
np.save(job["logits_out"], np.stack(logits))
greedy = []
for prompt in job["prompts"]:
    llm.reset()
    llm.eval(prompt)
    new = []
    for _ in range(job["new_tokens"]):
        new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([new[-1]])
    greedy.append(new)
tokenized = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in job["texts"]]
print(json.dumps({"greedy": greedy, "tokenized": tokenized, "n_vocab": llm.n_vocab()}))
"""


def _run_llama_cpp(gguf: Path, sequences, prompts, texts=(), *, f32_cache: bool = True) -> dict:
    job = {
        "f32_cache": f32_cache,
        "model": str(gguf),
        "n_ctx": 64,
        "sequences": sequences.tolist(),
        "prompts": prompts.tolist(),
        "new_tokens": NEW_TOKENS,
        "texts": list(texts),
        "logits_out": str(gguf.with_suffix(".logits.npy")),
    }
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"llama.cpp failed ({done.returncode}): {done.stderr[-3000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["logits"] = np.load(job["logits_out"])
    return result


@pytest.fixture(scope="module")
def model(perturbed_tiny_model):
    return perturbed_tiny_model


@pytest.fixture(scope="module")
def budgets(tiny_elastic_checkpoint) -> dict[str, SubnetSpec]:
    """The tiny recipe's budgets as its trained router chooses them (homogeneous recipe)."""
    _, _, router = tiny_elastic_checkpoint
    return {
        b: router.decide(b, 0, None, deterministic=True).spec for b in router.elastic_config.budgets
    }


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megatron_elastic.data.tokenizers import train_bpe_tokenizer

    texts = [f"the elastic model number {i} exports budgets, isn't it? {i * 7}" for i in range(300)]
    texts += TEXTS
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return path, train_bpe_tokenizer(texts, 400, path)


@pytest.fixture(scope="module")
def inputs(model):
    gen = torch.Generator().manual_seed(11)
    vocab = model.model_config.vocab_size
    sequences = torch.randint(0, vocab, (2, SEQ_LEN), generator=gen)
    prompts = torch.randint(0, vocab, (2, PROMPT_LEN), generator=gen)
    return sequences, prompts


@torch.no_grad()
def _elastic_logits(model, spec: SubnetSpec, tokens: torch.Tensor) -> torch.Tensor:
    model.set_subnet(spec, mode="slice")
    try:
        return model(tokens, position_ids_like(tokens), None)
    finally:
        model.set_subnet(None)


@torch.no_grad()
def _elastic_greedy(model, spec: SubnetSpec, prompts: torch.Tensor) -> tuple[list, float]:
    """Greedy continuations (full recompute each step) and the smallest top-2 logit margin met."""
    tokens, margin = prompts, float("inf")
    for _ in range(NEW_TOKENS):
        last = _elastic_logits(model, spec, tokens)[:, -1]
        top2 = last.topk(2, dim=-1).values
        margin = min(margin, (top2[:, 0] - top2[:, 1]).min().item())
        tokens = torch.cat([tokens, last.argmax(-1, keepdim=True)], dim=1)
    return tokens[:, prompts.size(1) :].tolist(), margin


def _compare(result: dict, model, spec, inputs, label: str) -> tuple[float, float]:
    """(max abs, max rel) logit difference of llama.cpp vs the elastic model at ``spec``."""
    sequences, _ = inputs
    ref = _elastic_logits(model, spec, sequences).numpy()
    diff = float(np.abs(result["logits"] - ref).max())
    rel = diff / float(np.abs(ref).max())
    scale = float(np.abs(ref).max())
    print(f"{label}: max |diff| = {diff:.3g}, max rel = {rel:.3g} (max |logit| {scale:.3g})")
    return diff, rel


def _greedy_matches(result: dict, model, spec, inputs, label: str) -> None:
    expected, margin = _elastic_greedy(model, spec, inputs[1])
    print(f"{label}: {NEW_TOKENS} greedy tokens, smallest top-2 margin {margin:.3g}")
    assert result["greedy"] == expected, label


@pytest.fixture(scope="module")
def f32_exports(model, budgets, tokenizer, inputs, tmp_path_factory):
    """Every budget exported as f32 with the tokenizer, and what llama.cpp computed on it."""
    out = tmp_path_factory.mktemp("gguf_f32")
    found = {}
    for budget, spec in budgets.items():
        manifest = export_subnet_to_gguf(
            model, spec, out / budget, tokenizer_path=tokenizer[0], metadata={"budget": budget}
        )
        result = _run_llama_cpp(out / budget / GGUF_FILE, *inputs, texts=TEXTS)
        found[budget] = (manifest, result)
    return found


def test_invariant_gguf_every_budget_matches_in_llama_cpp(
    model, budgets, inputs, f32_exports
) -> None:
    assert set(f32_exports) == {"full", "75%", "50%"}
    for budget, spec in budgets.items():
        manifest, result = f32_exports[budget]
        assert manifest["format"] == "gguf" and manifest["budget"] == budget
        assert manifest["file"] == GGUF_FILE and manifest["dtype"] == "f32"
        assert manifest["tensor_types"].keys() == {"F32"}
        assert manifest["params"] == subnet_param_count(model.model_config, spec)
        assert manifest["has_attention"] and not manifest["placeholder_attention_layer"]
        assert result["n_vocab"] == model.model_config.vocab_size
        label = f"f32 {budget} ({manifest['dims']['pattern']}, hidden {spec.hidden})"
        _, rel = _compare(result, model, spec, inputs, label)
        assert rel <= F32_TOL, budget
        _greedy_matches(result, model, spec, inputs, label)


def test_llama_cpp_tokenizes_like_our_tokenizer(tokenizer, f32_exports) -> None:
    _, ours = tokenizer
    for budget, (manifest, result) in f32_exports.items():
        assert manifest["tokenizer"]["in_gguf"], manifest["tokenizer"]
        assert result["tokenized"] == [ours.encode(t) for t in TEXTS], budget


def test_invariant_gguf_budget_without_attention_layers_matches(model, inputs, tmp_path) -> None:
    cfg = model.model_config  # M-M*-M-M*-: attention at 3 and 8, ranked last so depth 8 drops both
    spec = SubnetSpec.homogeneous(
        cfg, hidden=192, ffn=512, depth=8, layer_ranking=[0, 1, 2, 4, 5, 6, 7, 9, 3, 8]
    )
    manifest = export_subnet_to_gguf(model, spec, tmp_path)
    assert manifest["dims"]["pattern"] == "M-M-M-M-" and manifest["has_attention"] is False
    assert manifest["placeholder_attention_layer"] is True
    assert manifest["placeholder_params"] == 4 * cfg.head_dim * 192 + 192
    result = _run_llama_cpp(tmp_path / GGUF_FILE, *inputs)
    _, rel = _compare(result, model, spec, inputs, "no attention")
    assert rel <= F32_TOL
    _greedy_matches(result, model, spec, inputs, "no attention")


def test_llama_cpp_aborts_on_a_gguf_without_attention_layer(model, tmp_path) -> None:
    """Why the placeholder exists: the same budget written without it kills llama.cpp's process
    (GGML_ASSERT(buffer) in its hybrid memory). When llama.cpp fixes this, this test fails and
    the placeholder can go."""
    from megatron_elastic.export import gguf as g
    from megatron_elastic.export.gguf_mapping import GGUFLayout, to_gguf_tensors
    from megatron_elastic.export.standalone import standalone_config, standalone_state_dict

    parent = model.model_config
    spec = SubnetSpec.homogeneous(parent, depth=8, layer_ranking=[0, 1, 2, 4, 5, 6, 7, 9, 3, 8])
    cfg = standalone_config(parent, spec)
    layout = GGUFLayout(cfg.num_query_groups, cfg.head_dim, cfg.mamba_num_groups)
    tensors = to_gguf_tensors(standalone_state_dict(model, spec), cfg.layer_kinds(), layout)
    blocks = [g._Block(c.kind, c.width) for c in spec.layers if c.active]
    g._write_gguf(tmp_path / GGUF_FILE, cfg, blocks, tensors, None, "f32", "no-attention")
    ids = np.zeros((1, 4), dtype=np.int64)
    with pytest.raises(AssertionError, match=r"GGML_ASSERT\(buffer\) failed"):
        _run_llama_cpp(tmp_path / GGUF_FILE, ids, ids[:, :0])


def _heterogeneous_ffn_attention(cfg) -> SubnetSpec:
    """Per-layer FFN widths and attention heads, one Mamba shape (6 heads x 24), MLP 6 skipped."""
    return SubnetSpec.heterogeneous(
        cfg,
        hidden=224,
        attention_heads=[0, 0, 0, 6, 0, 0, 0, 0, 4, 0],
        mamba_heads=[6, 0, 6, 0, 0, 6, 0, 6, 0, 0],
        mamba_head_dim=[24, 0, 24, 0, 0, 24, 0, 24, 0, 0],
        ffn=[0, 768, 0, 0, 384, 0, 512, 0, 0, 640],
        active=[i != 6 for i in range(cfg.num_layers)],
    )


def test_invariant_gguf_heterogeneous_ffn_and_attention_budget_matches(
    model, inputs, tmp_path
) -> None:
    cfg = model.model_config
    spec = _heterogeneous_ffn_attention(cfg)
    manifest = export_subnet_to_gguf(model, spec, tmp_path)
    assert manifest["params"] == subnet_param_count(cfg, spec)
    assert manifest["tokenizer"]["in_gguf"] is False  # no tokenizer given: token ids only
    result = _run_llama_cpp(tmp_path / GGUF_FILE, *inputs)
    assert result["n_vocab"] == cfg.vocab_size  # llama.cpp's vocab type "none": ids only
    _, rel = _compare(result, model, spec, inputs, "heterogeneous FFN/attention")
    assert rel <= F32_TOL
    _greedy_matches(result, model, spec, inputs, "heterogeneous FFN/attention")


def test_heterogeneous_mamba_budget_is_refused_before_writing(
    model, tiny_heterogeneous_spec, tmp_path
) -> None:
    spec = tiny_heterogeneous_spec(model.model_config)
    with pytest.raises(ValueError, match=r"one Mamba shape.*--format hf .*megatron-lm"):
        check_gguf_exportable(model.model_config, spec)
    with pytest.raises(ValueError, match="one Mamba shape"):
        export_subnet_to_gguf(model, spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_type_and_epsilon_are_refused(model, budgets, tmp_path) -> None:
    for dtype in ("bf16", "q4_0", "F16"):
        with pytest.raises(ValueError, match="f32, f16, q8_0"):
            export_subnet_to_gguf(model, budgets["50%"], tmp_path / dtype, dtype=dtype)
        assert not (tmp_path / dtype).exists()
    cfg = dataclasses.replace(model.model_config, layernorm_epsilon=1e-6)
    with pytest.raises(ValueError, match="one norm epsilon"):
        check_gguf_exportable(cfg, SubnetSpec.full(cfg))


TOLERANCE = {"f16": 2e-3, "q8_0": 5e-2}
"""Max relative logit difference allowed for reduced-precision files with llama.cpp's default f16
KV cache (measured worst 9.7e-4 for f16 and 2.9e-2 for q8_0 on this random-weight model)."""


@pytest.mark.parametrize("dtype", [t for t in GGUF_TYPES if t != "f32"])
def test_reduced_precision_loads_and_runs(model, budgets, inputs, dtype, tmp_path) -> None:
    """Every budget, and the heterogeneous one whose Mamba out_proj rows (6 x 24 = 144) are not
    whole q8_0 blocks of 32: that matrix falls back to f16, as llama.cpp's converter does."""
    cases = {**budgets, "heterogeneous": _heterogeneous_ffn_attention(model.model_config)}
    for budget, spec in cases.items():
        manifest = export_subnet_to_gguf(model, spec, tmp_path / budget, dtype=dtype)
        types = manifest["tensor_types"]
        print(f"{dtype} {budget}: tensor types {types}")
        assert types["F32"] > 0 and types.get(dtype.upper(), 0) > 0, types
        if dtype == "q8_0" and budget == "heterogeneous":
            assert types["F16"] == 4, types  # the 4 Mamba out_proj matrices
        result = _run_llama_cpp(tmp_path / budget / GGUF_FILE, *inputs, f32_cache=False)
        assert np.isfinite(result["logits"]).all()
        _, rel = _compare(result, model, spec, inputs, f"{dtype} {budget}")
        assert rel <= TOLERANCE[dtype], budget


def test_tokenizers_llama_cpp_cannot_reproduce_are_left_out(tokenizer, tmp_path) -> None:
    """A tokenizer llama.cpp's gpt2 tokenizer would not reproduce gives a token-ids-only GGUF
    and the reason; one larger than the model's vocabulary is an error."""
    import sentencepiece as spm

    from megatron_elastic.export.gguf import gguf_tokenizer_vocab

    fields, note = gguf_tokenizer_vocab(tokenizer[0], 4096)
    assert fields is not None and len(fields["tokens"]) == 4096 and fields["eos"] == 0
    assert note.startswith("gpt2 byte-level BPE")
    content = json.loads(tokenizer[0].read_text())
    content["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "prefix").mkdir()
    (tmp_path / "prefix" / "tokenizer.json").write_text(json.dumps(content))
    assert gguf_tokenizer_vocab(tmp_path / "prefix", 4096) == (
        None,
        "llama.cpp's gpt2 tokenizer would not reproduce it: its ByteLevel pre-tokenizer adds a "
        "prefix space or skips the GPT-2 split regex",
    )
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 50),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    fields, note = gguf_tokenizer_vocab(tmp_path / "sp.model", 4096)
    assert fields is None and "sentencepiece" in note
    with pytest.raises(ValueError, match="more than the model's vocab_size 300"):
        gguf_tokenizer_vocab(tokenizer[0], 300)


def test_export_budget_cli_writes_gguf_that_llama_cpp_runs(
    tiny_elastic_checkpoint, tokenizer, run_cli, tmp_path
) -> None:
    """``tools/export_budget.py --format gguf``: one budget end to end through the CLI (the
    checkpoint's own weights, llama.cpp's logits == the elastic model's), and its bad input."""
    path, elastic_model, router = tiny_elastic_checkpoint
    ckpt = ["--checkpoint", str(path), "--budget", "50%"]
    ok, bad_type, type_without_gguf = run_cli(
        [
            ("tools/export_budget.py", [*ckpt, "--format", "gguf", "--gguf-type", "f32",
                                        "--tokenizer", str(tokenizer[0]),
                                        "--output", str(tmp_path / "ok")]),
            ("tools/export_budget.py", [*ckpt, "--format", "gguf", "--gguf-type", "q4_0",
                                        "--output", str(tmp_path / "q4")]),
            ("tools/export_budget.py", [*ckpt, "--gguf-type", "f16",
                                        "--output", str(tmp_path / "f16")]),
        ]
    )  # fmt: skip
    assert ok["rc"] == 0, ok["stderr"][-3000:] + str(ok["traceback"])
    assert "GGUF for llama.cpp" in ok["stdout"]
    assert bad_type["rc"] == 2 and "f32, f16, q8_0" in bad_type["stderr"]
    assert type_without_gguf["rc"] == 2 and "--format gguf" in type_without_gguf["stderr"]
    assert not (tmp_path / "q4").exists() and not (tmp_path / "f16").exists()
    manifest = json.loads((tmp_path / "ok" / "export_manifest.json").read_text())
    assert manifest["budget"] == "50%" and manifest["tokenizer"]["in_gguf"]
    gen = torch.Generator().manual_seed(3)
    sequences = torch.randint(0, elastic_model.model_config.vocab_size, (1, 16), generator=gen)
    no_prompts = torch.zeros(0, 0, dtype=torch.long)
    result = _run_llama_cpp(tmp_path / "ok" / GGUF_FILE, sequences, no_prompts, f32_cache=False)
    spec = router.decide("50%", 0, None, deterministic=True).spec
    _, rel = _compare(result, elastic_model, spec, (sequences, None), "CLI 50%")
    assert rel <= F16_CACHE_TOL


# ---- mixture of experts: llama.cpp's nemotron_h_moe ---------------------------------------------


@pytest.fixture(scope="module")
def moe_setup(pgs):
    """The tiny MoE parent (ME*E; sigmoid router, expert bias, scaled top-2, shared expert) and
    token inputs of its vocabulary."""
    from moe_fixture import MOE_YAML

    from megatron_elastic.config import load_model_config

    cfg = load_model_config(MOE_YAML)
    gen = torch.Generator().manual_seed(12)
    sequences = torch.randint(0, cfg.vocab_size, (2, SEQ_LEN), generator=gen)
    prompts = torch.randint(0, cfg.vocab_size, (2, PROMPT_LEN), generator=gen)
    return cfg, (sequences, prompts)


def _moe_matches(model, spec, inputs, tmp_path, label: str) -> dict:
    manifest = export_subnet_to_gguf(model, spec, tmp_path)
    assert manifest["architecture"] == "nemotron_h_moe"
    assert manifest["params"] == subnet_param_count(model.model_config, spec)
    result = _run_llama_cpp(tmp_path / GGUF_FILE, *inputs)
    _, rel = _compare(result, model, spec, inputs, label)
    assert rel <= F32_TOL, label
    _greedy_matches(result, model, spec, inputs, label)
    return manifest


@pytest.mark.parametrize("router", ["sigmoid_bias_shared", "sigmoid_group_limited"])
def test_invariant_gguf_moe_budgets_match_in_llama_cpp(pgs, moe_setup, router, tmp_path) -> None:
    """The parent and a budget with fewer, narrower experts, a narrower shared expert and a
    narrower hidden size, as llama.cpp's nemotron_h_moe: its logits and greedy tokens are the
    elastic model's (Nemotron 3's router, and its group-limited variant)."""
    from moe_fixture import ROUTERS, moe_elastic_model

    cfg = dataclasses.replace(moe_setup[0], **ROUTERS[router])
    model = moe_elastic_model(cfg, pgs)
    full = SubnetSpec.full(cfg)
    small = SubnetSpec.homogeneous(
        cfg, hidden=24, moe_experts=4, moe_expert_ffn=8, moe_shared_ffn=12
    )
    for name, spec in (("full", full), ("small", small)):
        label = f"MoE {router} {name}"
        manifest = _moe_matches(model, spec, moe_setup[1], tmp_path / name, label)
        assert manifest["dims"]["pattern"] == "ME*E"


def test_gguf_moe_features_llama_cpp_cannot_run_are_refused(pgs, moe_setup, tmp_path) -> None:
    """One line naming llama-cpp-python's version and the feature, before anything is written."""
    from moe_fixture import ROUTERS

    cfg = moe_setup[0]
    version = r"nemotron_h_moe \(llama-cpp-python 0\.3\.36\) does not support"
    cases = [
        (dataclasses.replace(cfg, **ROUTERS["softmax_top3_no_shared"]), None, "a softmax router"),
        (
            dataclasses.replace(cfg, moe_shared_expert_intermediate_size=None),
            None,
            "without a shared expert",
        ),
        (
            dataclasses.replace(
                cfg, moe_router_topk=4, moe_router_num_groups=2, moe_router_group_topk=1
            ),
            None,
            "by its top 4 experts",
        ),
        (dataclasses.replace(cfg, hybrid_pattern="ME*-"), None, r"plain MLP \('-'\) layers"),
        (cfg, SubnetSpec.heterogeneous(cfg, moe_experts=[0, 4, 0, 8]), "per-layer MoE sizes"),
    ]
    for parent, spec, why in cases:
        with pytest.raises(ValueError, match=f"{version} .*{why}"):
            check_gguf_exportable(parent, spec or SubnetSpec.full(parent))
    from moe_fixture import moe_elastic_model

    model = moe_elastic_model(cfg, pgs)
    with pytest.raises(ValueError, match="per-layer MoE sizes"):
        export_subnet_to_gguf(model, cases[-1][1], tmp_path / "out")
    assert not (tmp_path / "out").exists()
