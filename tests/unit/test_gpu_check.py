"""scripts/gpu_check.sh and benchmarks/bench_gpu_step.py: on CPU, the script stops at once
without a GPU and the FLOP count (planning/flops.py, which the benchmark's cases use) matches
hand-computed numbers; on a GPU (marked ``gpu``), Transformer-Engine specs compute what local
specs compute and an exported HF model computes what the elastic model computes, on CUDA."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_elastic.config import load_model_config
from megatron_elastic.elastic.subnet import SubnetSpec
from megatron_elastic.planning.flops import forward_flops, layer_forward_flops

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_gpu_step import case_flops, stack_config  # noqa: E402


def _run_script(tmp_path: Path, path_dirs: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(
        PATH=os.pathsep.join([*path_dirs, "/usr/bin", "/bin"]),
        OUT=str(tmp_path / "out"),
        GPU_CHECK_PYTHON=sys.executable,
    )
    start = time.perf_counter()
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120
    )
    return done, time.perf_counter() - start


def test_script_fails_fast_without_nvidia_smi(tmp_path) -> None:
    done, seconds = _run_script(tmp_path, [])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "nvidia-smi not found" in lines[0], done.stderr
    assert seconds < 5
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "no_gpu" and summary["sections"] == {}


def test_script_fails_fast_when_torch_sees_no_gpu(tmp_path) -> None:
    """nvidia-smi lists a GPU but torch cannot use it (here: a stand-in nvidia-smi on CPU)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Stand-in (UUID: GPU-0)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    done, seconds = _run_script(tmp_path, [str(fake)])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "sees no CUDA device" in lines[0], done.stderr
    assert seconds < 30  # one `import torch`
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["status"] == "no_gpu"


def test_bench_refuses_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu_step.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "bench_gpu_step: needs a CUDA GPU (torch.cuda.is_available() is False)"
    ]


def _small_config():
    """tests/fixtures/hybrid_small.yaml's dims with pattern ``M-*``."""
    cfg = load_model_config(ROOT / "tests" / "fixtures" / "hybrid_small.yaml")
    return dataclasses.replace(cfg, hybrid_pattern="M-*")


def test_forward_flops_match_hand_count() -> None:
    # hidden 64, FFN 128, attention 4 heads x 16 in 2 groups, Mamba 4 heads x 16 in 2 groups,
    # state 8, conv 4, chunk 16, vocab 256; batch 2 x seq 32 = 64 tokens.
    cfg = _small_config()
    mamba, mlp, attention = (
        layer_forward_flops(cfg, layer, cfg.hidden_size, seq_length=32, batch=2)
        for layer in SubnetSpec.full(cfg).layers
    )
    # Mamba, per token: in_proj 2*64*(2*64 + 2*2*8 + 4) = 20992; conv 2*(64 + 32)*4 = 768;
    # SSD 64*(2*16 + 4*8) + 2*2*16*8 = 4096 + 512; out_proj 2*64*64 = 8192 -> 34560 x 64 tokens.
    assert mamba == {"gemm": (20992 + 8192) * 64, "conv": 768 * 64, "scan": (4096 + 512) * 64}
    assert sum(mamba.values()) == 2_211_840
    # Attention: QKV 2*64*16*(4 + 2*2) = 16384 and output 2*4*16*64 = 8192 per token (x 64),
    # causal scores + values 2*2*32*32*4*16 = 262144.
    assert attention == {"gemm": 1_572_864, "attention": 262_144}
    # MLP: 4*64*128 = 32768 per token; output layer 2*64*256 = 32768 per token.
    assert mlp == {"gemm": 2_097_152}
    total = forward_flops(cfg, None, seq_length=32, batch=2)
    assert total["gemm"] - mamba["gemm"] - attention["gemm"] - mlp["gemm"] == 2_097_152
    assert sum(total.values()) == 8_241_152


def test_case_flops_count_teacher_student_and_recompute() -> None:
    """The benchmark's cases run one sample: half the forward counted above (2 samples of 32
    tokens): 4_120_576, of which the output layer 1_048_576."""
    cfg = _small_config()
    full = SubnetSpec.full(cfg)
    on = case_flops(cfg, full, mode="slice", seq=32, recompute=True)
    off = case_flops(cfg, full, mode="slice", seq=32, recompute=False)
    # teacher forward + student forward and backward (2x) = 4 forwards; recompute adds the
    # student's layers (not the output layer) once more.
    assert off == {"model": 16_482_304, "hardware": 16_482_304}
    assert on == {"model": 16_482_304, "hardware": 16_482_304 + 4_120_576 - 1_048_576}
    # Mask mode computes at full width whatever the budget; slice mode at the budget's widths:
    # FFN 64 halves the student's MLP (4 x 64 x 64 per token x 32 tokens = 524288), 3 times.
    narrow = SubnetSpec.homogeneous(cfg, ffn=64)
    assert case_flops(cfg, narrow, mode="mask", seq=32, recompute=True) == on
    sliced = case_flops(cfg, narrow, mode="slice", seq=32, recompute=False)
    assert sliced == {"model": 16_482_304 - 3 * 524_288, "hardware": 16_482_304 - 3 * 524_288}


def test_flops_of_12b_stack_track_its_weights() -> None:
    """At one token per sequence the matmul FLOPs are 2 per weight, up to the scan's own work."""
    from megatron_elastic.model.param_count import count_parameters

    cfg = stack_config("M-*-")
    flops = sum(forward_flops(cfg, None, seq_length=1, batch=1).values())
    weights = count_parameters(cfg) - cfg.vocab_size * cfg.hidden_size  # no embedding matmul
    assert abs(flops / (2 * weights) - 1) < 0.01


@pytest.mark.gpu
def test_invariant_te_specs_match_local_specs(pgs, small_config) -> None:
    pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed")
    from megatron_elastic.importance.modelopt_backend import te_state_dict
    from megatron_elastic.model import build_hybrid_model
    from megatron_elastic.model.builder import mixer_params
    from megatron_elastic.model.specs import local_hybrid_stack_spec, te_hybrid_stack_spec
    from megatron_elastic.training.lm_step import position_ids_like

    torch.backends.cuda.matmul.allow_tf32 = False
    params = mixer_params(small_config)
    torch.manual_seed(0)
    local = build_hybrid_model(small_config, pgs, stack_spec=local_hybrid_stack_spec(params))
    te = build_hybrid_model(small_config, pgs, stack_spec=te_hybrid_stack_spec(params))
    missing, unexpected = te.load_state_dict(te_state_dict(local.state_dict()), strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected
    tokens = torch.randint(0, small_config.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        ref = local(tokens, position_ids_like(tokens), None)
        out = te(tokens, position_ids_like(tokens), None)
    assert (ref - out).abs().max().item() <= 2e-3


@pytest.mark.gpu
def test_invariant_exported_hf_matches_elastic_on_cuda(pgs, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from megatron_elastic.elastic import SubnetSpec, build_elastic_model, load_elastic_recipe
    from megatron_elastic.export.hf import export_subnet_to_hf
    from megatron_elastic.training.lm_step import position_ids_like

    torch.backends.cuda.matmul.allow_tf32 = False
    model_cfg, elastic = load_elastic_recipe(ROOT / "examples" / "tiny" / "elastic.yaml")
    torch.manual_seed(5)
    model = build_elastic_model(model_cfg, elastic, pgs)
    spec = SubnetSpec.homogeneous(model_cfg, hidden=192, ffn=512)
    export_subnet_to_hf(model, spec, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).cuda().eval()
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 48), device="cuda")
    with torch.no_grad():
        model.set_subnet(spec, mode="slice")
        ref = model(tokens, position_ids_like(tokens), None).float()
        model.set_subnet(None)
        out = hf(tokens, use_cache=False).logits.float()
    assert (ref - out).abs().max().item() <= 2e-3


def test_bench_eval_case_runs_the_full_budget_forward_on_cpu(pgs, small_config) -> None:
    """``eval/full`` on CPU (no peak there): the evaluation step's loss is the parent's cross
    entropy, through megatron's forward-only schedule, and the plan's working set is reported."""
    import argparse

    from bench_gpu_step import eval_case

    from megatron_elastic.elastic import ElasticConfig, build_elastic_model

    torch.manual_seed(0)
    model = build_elastic_model(small_config, ElasticConfig(budgets={"full": 1.0}), pgs)
    tokens = torch.randint(0, small_config.vocab_size, (1, 65))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, 64)}
    args = argparse.Namespace(seq=64, recompute=False)
    case = eval_case(model, model, pgs, batch, small_config, args, "cpu")
    with torch.no_grad():
        want = model(batch["tokens"], None, None, labels=batch["labels"]).mean().item()
    assert case["loss"] == pytest.approx(want, rel=1e-4) and case["planned_working_set_bytes"] > 0
