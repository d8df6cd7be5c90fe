"""``tools/preflight.py`` and ``megatron_elastic/preflight.py``: every check's failure line and
exit status 2, on CPU, with fakes only for what a CPU lacks (a GPU, NCCL, a full disk) and
hidden modules (``sys.modules[name] = None``) for missing packages; the CPU run of the tiny
recipe says what it could not check."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_elastic import platform, preflight
from megatron_elastic.training.recipe import load_train_recipe

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny" / "stage1.yaml"
GIB = 1024**3


def _tool():
    spec = importlib.util.spec_from_file_location("preflight_tool", ROOT / "tools" / "preflight.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run(tmp_path, capsys):
    """The tool on the tiny stage-1 recipe saving under ``tmp_path``: (exit status, stdout)."""
    tool = _tool()

    def go(*extra: str) -> tuple[int, str]:
        status = tool.main(["--recipe", str(TINY), f"checkpoint.save={tmp_path}/save", *extra])
        return status, capsys.readouterr().out

    return go


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CPU process that looks like one with a CUDA device of ``memory`` bytes."""
    platform.apply()  # the CPU workarounds stay installed while torch.cuda claims a device

    def install(memory: int = 80 * GIB) -> None:
        props = types.SimpleNamespace(name="Fake GPU", total_memory=memory)
        for name, value in {
            "is_available": lambda: True,
            "current_device": lambda: 0,
            "device_count": lambda: 1,
            "get_device_name": lambda index=None: "Fake GPU",
            "get_device_capability": lambda index=None: (9, 0),
            "get_device_properties": lambda index=None: props,
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)
        monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 27, 3))
        monkeypatch.setattr(dist, "is_nccl_available", lambda: True)

    return install


def _line(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line[5:].startswith(f"{name}:"))


def test_cpu_run_of_the_tiny_recipe_says_what_it_could_not_check(run):
    status, out = run()
    assert status == 0, out
    assert _line(out, "CUDA").startswith("note CUDA: not available")
    assert "could not check the GPU, NCCL or device memory" in out
    assert _line(out, "NCCL") == "note NCCL: not checked (CPU run: gloo is used)"
    memory = _line(out, "memory")
    assert memory.startswith("ok   memory: CPU: cpu-fp32 plan") and "GiB per GPU" in memory
    assert _line(out, "disk").startswith("ok   disk:")
    assert out.splitlines()[-1] == "preflight: all required checks passed"


def test_a_gpu_that_passes(run, fake_gpu):
    fake_gpu()
    status, out = run()
    assert status == 0, out
    assert _line(out, "CUDA") == (
        f"ok   CUDA: Fake GPU, capability 9.0, 1 device(s) (torch {torch.__version__}, CUDA "
        f"{torch.version.cuda})"
    )
    assert _line(out, "NCCL") == "ok   NCCL: available, version 2.27.3"
    assert "gpu-bf16 plan" in _line(out, "memory") and "of 80.0 GiB (Fake GPU" in out
    assert "bf16 weights + 12 B optimizer: Adam moments + fp32 main weights" in out


def test_too_little_gpu_memory(run, fake_gpu):
    fake_gpu(memory=GIB // 10)
    status, out = run()
    assert status == 2
    line = _line(out, "memory")
    assert line.startswith("FAIL memory: planned peak") and "does not fit" in line
    assert "train.recompute_activations=true" in line
    assert out.splitlines()[-1] == "preflight: 1 required check(s) failed: memory"


def test_no_nccl(run, fake_gpu, monkeypatch):
    fake_gpu()
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    status, out = run()
    assert status == 2
    assert _line(out, "NCCL").startswith("FAIL NCCL: torch")
    assert "install a CUDA build of torch" in out


def test_a_recipe_too_large_for_this_host_needs_gpus(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "_host_memory", lambda: 64 * GIB)
    recipe = ROOT / "examples" / "nemotron_nano_12b" / "stage1_8k.yaml"
    status = _tool().main(["--recipe", str(recipe), f"checkpoint.save={tmp_path}"])
    out = capsys.readouterr().out
    assert status == 2
    assert _line(out, "memory").endswith("does not fit; run it on GPUs")


def test_missing_mamba_ssm_is_required(run, monkeypatch):
    for name in ("mamba_ssm", *preflight.MAMBA_MODULES):
        monkeypatch.setitem(sys.modules, name, None)
    status, out = run()
    assert status == 2
    line = _line(out, "mamba-ssm")
    assert line.startswith("FAIL mamba-ssm: mamba_ssm.ops.triton.ssd_combined does not import")
    assert line.endswith(preflight.MAMBA_FIX)


def test_causal_conv1d_is_optional(run, monkeypatch):
    """The line follows the route the Mamba mixer takes: what mamba-ssm found of causal-conv1d."""
    from mamba_ssm.ops.triton import ssd_combined

    for name in ("causal_conv1d_fwd_function", "causal_conv1d_bwd_function"):
        monkeypatch.setattr(ssd_combined, name, None)
    status, out = run()
    assert status == 0
    line = _line(out, "causal-conv1d")
    assert line.startswith(f"note causal-conv1d: {preflight.FALLBACK_CONV}")
    assert line.endswith("pip install causal-conv1d for the fused path")
    for name in ("causal_conv1d_fwd_function", "causal_conv1d_bwd_function"):
        monkeypatch.setattr(ssd_combined, name, lambda *args: None)
    assert preflight.check_causal_conv1d(cuda=True).line() == (
        f"ok   causal-conv1d: {preflight.FUSED_CONV}"
    )


def test_transformer_engine_missing_is_a_note_broken_is_a_failure(run, fake_gpu, monkeypatch):
    fake_gpu()
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    status, out = run()
    assert status == 0
    assert _line(out, "Transformer Engine") == (
        "note Transformer Engine: not installed: the local spec (megatron-core local modules) "
        "is used; pip install transformer-engine[pytorch] for TE's fused kernels"
    )
    broken = types.ModuleType("transformer_engine")
    broken.__spec__ = importlib.machinery.ModuleSpec("transformer_engine", None)
    monkeypatch.setitem(sys.modules, "transformer_engine", broken)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    status, out = run()
    assert status == 2
    line = _line(out, "Transformer Engine")
    assert line.startswith("FAIL Transformer Engine: installed but does not import")
    assert "pip uninstall transformer-engine" in line


def test_too_little_disk(tmp_path, run, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    seen = []

    def full(path):
        seen.append(Path(path))
        return usage._replace(free=1024)

    monkeypatch.setattr(shutil, "disk_usage", full)
    status, out = run("checkpoint.save=" + str(tmp_path / "a" / "b"))
    assert status == 2
    line = _line(out, "disk")
    assert line.startswith(f"FAIL disk: 0.0 GiB free at {tmp_path};")  # nearest existing parent
    assert "3 more checkpoint(s)" in line and "fp32 weights + 8 B optimizer" in line
    assert line.endswith("or lower checkpoint.keep_last")
    assert seen == [tmp_path]


def test_checkpoint_size_counts_weights_optimizer_and_router():
    recipe = load_train_recipe(TINY)
    params = preflight.count_parameters(recipe.model)
    fp32, _ = preflight.checkpoint_bytes(recipe, bf16=False)
    bf16, _ = preflight.checkpoint_bytes(recipe, bf16=True)
    assert bf16 - fp32 == 2 * params  # -2 B weights, +4 B fp32 main weights per parameter
    assert 0 < fp32 - 12 * params < 1e6  # the router and its Adam state


def test_require_environment_stops_with_one_line(fake_gpu, tmp_path):
    fake_gpu(memory=GIB // 10)
    recipe = load_train_recipe(TINY, [f"checkpoint.save={tmp_path}"])
    lines = []
    with pytest.raises(ValueError, match=r"^preflight failed: memory: planned peak") as info:
        preflight.require_environment(recipe, preflight.PreflightConfig(), log=lines.append)
    assert "\n" not in str(info.value)
    assert lines[-1] == "preflight: 1 required check(s) failed: memory"


def test_memory_check_plans_an_expert_parallel_recipe_without_a_world_size(fake_gpu):
    """Without a world size the check plans the smallest world that runs the recipe: the 30B
    stage-1 layout (TP 1 x PP 2, EP 8 carved out of DP x CP) needs DP 8, 16 ranks; at 128 ranks
    (its 16 x 8 H100) the experts' Adam state is sharded 8 ways and it fits."""
    fake_gpu()
    recipe = load_train_recipe(ROOT / "examples" / "nemotron3_nano_30b" / "stage1_8k.yaml")
    alone = preflight.check_memory(recipe, preflight.PreflightConfig(), cuda=True)
    assert "could not plan" not in alone.message and "world 16)" in alone.message, alone.message
    full = preflight.check_memory(recipe, preflight.PreflightConfig(world_size=128), cuda=True)
    assert full.ok and "world 128)" in full.message, full.message
