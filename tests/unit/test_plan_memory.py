"""The memory planner (megatron_elastic/planning/memory.py, tools/plan_memory.py): per-category
figures equal hand-computed numbers for a small config; its CPU activation terms equal what
autograd really saves in the student's layers; its 12B stage-2 predictions move the right way;
the CLI reports user errors as ``error: ...`` with exit status 2; the benchmark's CPU peak
counts frees made on threads the profiler does not record. Measured peaks of whole training
steps: benchmarks/bench_memory.py (docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from megatron_elastic.config import ModelConfig, ParallelConfig
from megatron_elastic.model import count_parameters
from megatron_elastic.planning import (
    LayerShape,
    MemoryPlanConfig,
    format_plan,
    layer_activation_terms,
    plan_config_from_recipe,
    plan_memory,
)
from megatron_elastic.training.recipe import load_train_recipe

ROOT = Path(__file__).parents[2]
STAGE1 = ROOT / "examples" / "nemotron_nano_12b" / "stage1_8k.yaml"
STAGE2 = ROOT / "examples" / "nemotron_nano_12b" / "stage2_49k.yaml"
GIB = 1024**3

# Every dimension distinct, so a term with the wrong dimension cannot match by accident.
SMALL = ModelConfig(
    hybrid_pattern="M-*",
    hidden_size=96,
    ffn_hidden_size=160,
    num_attention_heads=6,
    num_query_groups=2,
    head_dim=24,
    mamba_num_heads=4,
    mamba_head_dim=20,
    mamba_num_groups=2,
    mamba_state_dim=12,
    vocab_size=512,
    mamba_chunk_size=32,
)


def _small(**kw) -> MemoryPlanConfig:
    base = dict(
        model=SMALL,
        parallel=ParallelConfig(),
        seq_length=128,
        micro_batch_size=1,
        num_micro_batches=2,
    )
    return MemoryPlanConfig(**{**base, **kw})


# --- hand-computed figures ----------------------------------------------------------------------


def test_small_config_static_figures_by_hand() -> None:
    # Parameters: embedding 512*96 + output 512*96 + final norm 96; Mamba: norm 96, in_proj
    # 96*(2*80 + 2*2*12 + 4) = 20352, conv (80+48)*(4+1) = 640, dt_bias/A_log/D 12, gated norm 80,
    # out_proj 80*96 = 7680 -> 28860; MLP 96 + 2*96*160 = 30816; attention 96 + 96*(6+2*2)*24 +
    # 6*24*96 = 36960.
    params = 49152 + 49152 + 96 + 28860 + 30816 + 36960
    assert params == count_parameters(SMALL) == 195036
    (stage,) = plan_memory(_small()).stages
    assert stage.static["student weights"] == 4 * params
    assert stage.static["gradients (fp32 buffer)"] == 4 * params
    assert stage.static["optimizer state"] == 8 * params  # Adam moments, fp32 weights
    assert stage.static["teacher weights"] == 4 * params
    # megatron's local attention: persistent (b*heads, s, s) fp32 score buffer of the teacher
    assert stage.static["megatron global buffer (scores / SP gather)"] == 4 * 1 * 6 * 128**2
    # bf16 on GPU: 2-byte weights, fp32 master + moments (12 B) sharded over DP 4
    (gpu,) = plan_memory(
        _small(profile="gpu-bf16", distributed_optimizer=True, data_parallel_size=4)
    ).stages
    assert gpu.static["student weights"] == 2 * params
    assert gpu.static["gradients (fp32 buffer)"] == 4 * params
    assert gpu.static["optimizer state"] == 12 * params / 4
    assert "megatron global buffer (scores / SP gather)" not in gpu.static  # TE fused attention


def test_small_config_activation_figures_by_hand() -> None:
    tokens = 128
    (stage,) = plan_memory(_small()).stages
    assert stage.in_flight == 1  # PP 1: one micro-batch at a time
    # MLP (4-byte units per token): norm input, normalised x, norm output, gate's f(x)-x (4h),
    # rsqrt (1), relu result, pow result, router-weighted result (3f).
    assert stage.activations["mlp layers"] == 4 * tokens * (4 * 96 + 1 + 3 * 160)
    # Attention: 4h + 1, q / SDPA output / weighted ctx / k, v per query head (5 * 6 * 24),
    # logsumexp per head (6).
    assert stage.activations["attention layers"] == 4 * tokens * (4 * 96 + 1 + 5 * 144 + 6)
    # Mamba: 4h + 1; in_proj output 212; conv output + silu 2 * 128 (+ conv padding 3/128);
    # x*dt and two copies 3 * 80; six inner-width tensors + group rsqrt 6 * 80 + 2; 4 heads x 4;
    # B/C per head 5 * 4 * 12; chunk states 4*12*20/32 * (1 + 5/4); L x L blocks 3 * 4 * 32;
    # plus the two (32, 32) bool masks and the (1, 4, 5, 5) fp32 chunk decay.
    per_token = 4 * 96 + 1 + 212 + 128 * (2 + 3 / 128) + 240 + 482 + 16 + 240 + 30 * 2.25 + 384
    assert stage.activations["mamba layers"] == pytest.approx(
        4 * tokens * per_token + 2 * 32 * 32 + 4 * 4 * 25
    )
    # Embedding output (4h) + token ids (8 B) and the final norm (12h + 4 B).
    assert stage.activations["embedding / final norm / pipeline buffers"] == tokens * (
        4 * 96 + 8 + 12 * 96 + 4
    )
    # Last stage: student + teacher logits and the KD forward's five fp32 (b, s, V) tensors.
    assert stage.transients["logits + KD temporaries"] == tokens * 512 * (2 * 4 + 20)


def test_recompute_keeps_two_hidden_tensors_per_layer() -> None:
    (stage,) = plan_memory(_small(recompute=True)).stages
    assert stage.activations["mlp layers"] == 2 * 4 * 128 * 96  # input + gate's f(x) - x
    assert stage.activations["mamba layers"] == 2 * 4 * 128 * 96


def test_pipeline_in_flight_and_parallel_shards() -> None:
    one = plan_memory(_small(num_micro_batches=4)).stages[0]
    plan = plan_memory(
        _small(
            model=ModelConfig(**{**SMALL.__dict__, "hybrid_pattern": "M-*-"}),
            parallel=ParallelConfig(pipeline_parallel_size=2),
            num_micro_batches=4,
        )
    )
    assert [s.in_flight for s in plan.stages] == [2, 1]  # 1F1B: stage i keeps PP - i
    assert plan.stages[0].activations["mamba layers"] == 2 * one.activations["mamba layers"]
    tp2 = plan_memory(_small(parallel=ParallelConfig(tensor_parallel_size=2))).stages[0]
    sp = plan_memory(
        _small(parallel=ParallelConfig(tensor_parallel_size=2, sequence_parallel=True))
    ).stages[0]
    # TP shards heads/neurons; SP also shards the hidden-width tensors' tokens.
    mlp = lambda s: s.activations["mlp layers"]
    assert mlp(tp2) == 4 * 128 * (4 * 96 + 1 + 3 * 80)
    assert mlp(sp) == 4 * 64 * (4 * 96 + 1) + 4 * 128 * 3 * 80
    cp = plan_memory(_small(parallel=ParallelConfig(context_parallel_size=2))).stages[0]
    assert mlp(cp) == mlp(one) / 2
    # CP 2 attention, 64 local tokens: 4h + 1, q / SDPA output / weighted ctx (3 * 6 * 24) and
    # logsumexp (6) per local token; k, v per query head (2 * 144) per gathered token (128);
    # the (64, 128) causal mask SDPA saves as an fp32 additive mask.
    assert cp.activations["attention layers"] == (
        4 * 64 * (4 * 96 + 1 + 3 * 144 + 6) + 4 * 128 * 2 * 144 + 4 * 64 * 128
    )


# --- the CPU terms are what autograd saves ------------------------------------------------------


def _saved_bytes_per_layer(net, tokens: torch.Tensor) -> list[float]:
    """Bytes of distinct storages autograd saved during each decoder layer's forward (weights
    excluded), found by walking the graph from the output."""
    owner: dict[int, int] = {}
    current = [-1]
    for i, layer in enumerate(net.decoder.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
    net.decoder.final_norm.register_forward_pre_hook(lambda m, a: current.__setitem__(0, -2))

    def pack(t):
        owner.setdefault(t.untyped_storage().data_ptr(), current[0])
        return t

    b, s = tokens.shape
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(tokens, torch.arange(s).expand(b, s), None)
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    per_layer = [0.0] * len(net.decoder.layers)
    seen_nodes, seen = set(), set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        names = [a for a in dir(node) if a.startswith("_saved_")]
        saved = []
        for name in names:
            try:
                saved.append(getattr(node, name))
            except RuntimeError:
                pass
        if not names and hasattr(node, "saved_tensors"):
            saved = list(node.saved_tensors)  # custom autograd Functions (megatron's linears)
        for value in saved:
            for t in value if isinstance(value, tuple | list) else [value]:
                if not isinstance(t, torch.Tensor):
                    continue
                key = t.untyped_storage().data_ptr()
                if key in weights or key in seen:
                    continue
                seen.add(key)
                if owner.get(key, -1) >= 0:
                    per_layer[owner[key]] += t.untyped_storage().nbytes()
        stack += [n for n, _ in node.next_functions]
    return per_layer


def test_cpu_terms_equal_what_autograd_saves(pgs) -> None:
    from megatron_elastic.elastic import (
        ElasticConfig,
        SubnetSpec,
        SubnetWeights,
        build_elastic_model,
    )

    torch.manual_seed(0)
    net = build_elastic_model(SMALL, ElasticConfig(budgets={"full": 1.0}), pgs)
    net.train()
    w = torch.ones((), requires_grad=True)
    n = SMALL.num_layers
    net.set_subnet(  # the training path: router scalars on every axis and depth gate
        SubnetSpec.full(SMALL),
        SubnetWeights(hidden=w * 1, layers=(w * 1,) * n, gates=(w * 1,) * n),
    )
    tokens = torch.randint(0, SMALL.vocab_size, (2, 96))
    measured = _saved_bytes_per_layer(net, tokens)
    cfg = _small(seq_length=96, micro_batch_size=2)
    predicted = [
        sum(layer_activation_terms(cfg, layer, SMALL.hidden_size).values())
        for layer in cfg.layers()
    ]
    assert predicted == pytest.approx(measured, rel=2e-3), (predicted, measured)


# --- the 12B recipes ----------------------------------------------------------------------------


def _peak(path: Path, *overrides: str) -> float:
    recipe = load_train_recipe(path, list(overrides))
    return plan_memory(plan_config_from_recipe(recipe, world_size=128)).peak / GIB


def test_12b_stage2_predictions_move_the_right_way() -> None:
    base = _peak(STAGE2)
    assert _peak(STAGE2, "parallel.sequence_parallel=false") > base  # SP lowers the peak
    assert _peak(STAGE2, "parallel.context_parallel_size=2") < base  # CP lowers it
    assert _peak(STAGE2, "train.recompute_activations=false") > base  # recompute lowers it
    bare = _peak(STAGE2, "parallel.sequence_parallel=false", "train.recompute_activations=false")
    assert bare > 80  # neither: does not fit an 80 GB H100
    assert base < 70  # the recipe's layout fits with headroom


def test_12b_recipes_fit_an_h100() -> None:
    for path in (STAGE1, STAGE2):
        assert _peak(path) < 70, path


def test_largest_budget_bounds_the_student() -> None:
    recipe = load_train_recipe(STAGE2)
    cfg = plan_config_from_recipe(recipe, world_size=128)
    assert cfg.student_hidden == recipe.model.hidden_size  # 12B: the parent itself
    assert all(layer.active for layer in cfg.student_layers)
    assert cfg.num_micro_batches == 512 // (1 * 128 // (8 * 2))
    assert cfg.router_params > 0


def test_bad_input_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not a multiple of TP x PP x CP"):
        plan_config_from_recipe(load_train_recipe(STAGE2), world_size=100)
    with pytest.raises(ValueError, match="profile="):
        _small(profile="tpu")
    with pytest.raises(ValueError, match="student_layers lists 1 layers"):
        _small(student_layers=(LayerShape("mlp", 160),))


# --- the CLI ------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plan_memory.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_prints_the_table_and_the_peak_last() -> None:
    done = _cli("--recipe", str(STAGE2))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("peak GiB per GPU: "), lines[-1]
    assert float(lines[-1].split(": ")[1]) == pytest.approx(_peak(STAGE2), abs=0.01)
    for label in ("student weights", "optimizer state", "teacher weights", "mamba layers"):
        assert any(label in line for line in lines), label
    assert "stage 0" in done.stdout and "stage 1" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["parallel.tensor_parallel_size=3"], "not divisible by tensor_parallel_size=3"),
        (["train.stpes=3"], "did you mean 'steps'"),
        (["--world-size", "100"], "not a multiple of TP x PP x CP"),
    ],
)
def test_cli_user_errors_exit_2(args: list[str], message: str, capsys) -> None:
    """In this process (the table test above runs the CLI as its own process): a user error
    returns 2 with one ``error:`` line and raises nothing."""
    path = ROOT / "tools" / "plan_memory.py"
    spec = importlib.util.spec_from_file_location("plan_memory_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--recipe", str(STAGE2), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_format_plan_ends_with_the_peak() -> None:
    text = format_plan(plan_memory(_small()))
    assert text.splitlines()[-1] == f"peak GiB per GPU: {plan_memory(_small()).peak / GIB:.2f}"


def _bench_worker():
    path = ROOT / "benchmarks" / "bench_memory_worker.py"
    spec = importlib.util.spec_from_file_location("bench_memory_worker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_peak_counts_frees_made_on_other_threads() -> None:
    """bench_memory_worker's CPU peak: a tensor whose last reference is dropped on a thread the
    profiler does not record (as gloo's worker threads drop the tensors of a collective) is
    freed there; the allocator's all-thread counter sees it, a replay of the profiler's byte
    deltas does not and keeps counting it."""
    from torch.profiler import ProfilerActivity, profile, record_function

    worker, mib = _bench_worker(), 1024**2
    try:
        worker._track_all_threads()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with record_function("window"):
                for _ in range(3):
                    held = [torch.empty(mib // 4)]  # 1 MiB of fp32, allocated here
                    thread = threading.Thread(target=held.clear)  # ... and freed there
                    thread.start()
                    thread.join()
    finally:
        worker._track_all_threads(False)
    result = worker._cpu_peak(prof, "window")
    assert result["peak_bytes"] == mib
    assert result["replay_peak_bytes"] == 3 * mib
    # at the last recorded event (the third allocation) the replay lacks the first two frees
    assert result["untracked_free_bytes"] == 2 * mib
