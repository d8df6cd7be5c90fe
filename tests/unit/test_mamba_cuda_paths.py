"""The CUDA Mamba path, run without a GPU: mamba-ssm's real Triton kernels in Triton's interpreter
on small CPU tensors (``triton_emulation.py``), against the CPU torch scan.

Every code path the project takes on CUDA tensors is forced here with the product's own switch
(``kernels="triton"`` / ``TorchScanMambaMixer.ssm_kernels``), on both conv routes of
``cuda_conv_route``: ``fused`` (mamba-ssm's ``mamba_split_conv1d_scan_combined``; causal-conv1d is
not installed here, so its compiled functions are test doubles in torch, while all of mamba-ssm's
Triton kernels run) and ``fallback`` (torch conv, then ``mamba_chunk_scan_combined``). The gated
group norm runs on mamba-ssm's Triton ``rmsnorm_fn`` on this path.

The interpreter must be on when mamba-ssm's kernels are decorated, i.e. before megatron imports
them, so all cases run in one child process (``CASES`` below); each test reads its case's figures.

Not covered here: the Triton kernels' GPU code generation (``tl.dot`` in TF32, block configs the
autotuner would pick; the interpreter computes in numpy at fp32/fp64), bf16 on a GPU, and
causal-conv1d's CUDA kernels themselves (doubled). ``test_gpu_paths.py`` (marked ``gpu``) runs
the same functions on a GPU. Elastic ``mask`` mode has no CUDA branch (torch on every device).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).parents[2]
TOL = 2e-5
"""Relative to each reference tensor's max |value| (outputs and every gradient). Measured worst:
8.0e-6 (the slice mixer's dt_bias gradient); kernel functions 5.1e-7, parent mixer 1.7e-6."""
ROUTES = ("fused", "fallback")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| relative to the reference's scale (max |want|)."""
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)


def _compare(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], kernel_calls: list[str]
) -> dict[str, Any]:
    """Per tensor, the relative error; and which kernels the run called (``fused_conv_route``)."""
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    errors = {name: _rel(got[name].float(), want[name].float()) for name in want}
    return {"errors": errors, "kernel_calls": sorted(set(kernel_calls))}


def _backward(fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor], seed: int):
    """fn(**inputs) and the gradients of <out, dout> (a fixed random dout) w.r.t. every input."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = fn(**leaves)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(dout)
    return {"out": out.detach(), **{k: v.grad for k, v in leaves.items()}}


# ------------------------------------------------------------------------ the kernel functions
def case_kernels(route: str, norm: bool) -> dict[str, Any]:
    """``mamba_ssm_cuda`` (or the un-normed ``_gated_ssm_cuda``) vs the torch functions, forward
    and every input's gradient. b 1, seq 64 (2 chunks of 32), 4 heads x 16, 2 groups, state 16."""
    from triton_emulation import fused_conv_route

    from megatron_elastic.model import mamba

    g = torch.Generator().manual_seed(0)
    b, length, heads, p, groups, n, kernel, chunk = 1, 64, 4, 16, 2, 16, 4, 32
    inner, conv = heads * p, heads * p + 2 * groups * n
    inputs = {
        "zxbcdt": torch.randn(b, length, inner + conv + heads, generator=g),
        "conv_weight": torch.randn(conv, kernel, generator=g) * 0.3,
        "conv_bias": torch.randn(conv, generator=g) * 0.1,
        "dt_bias": torch.randn(heads, generator=g) * 0.5,
        "A_log": torch.rand(heads, generator=g).log1p(),
        "D": torch.rand(heads, generator=g) + 0.5,
    }
    sizes = {"head_dim": p, "num_groups": groups, "state_dim": n, "chunk_size": chunk}
    if norm:
        inputs["norm_weight"] = torch.rand(inner, generator=g) + 0.5
        sizes |= {"norm_group_size": inner // groups, "norm_eps": 1e-5}
        cuda, ref = partial(mamba.mamba_ssm_cuda, route=route), mamba.mamba_ssm_torch
    else:
        cuda, ref = partial(mamba._gated_ssm_cuda, route=route), mamba._gated_ssm_torch
    want = _backward(partial(ref, **sizes), inputs, seed=1)
    with fused_conv_route(installed=route == "fused") as calls:
        got = _backward(partial(cuda, **sizes), inputs, seed=1)
    return _compare(got, want, calls)


# ------------------------------------------------------------------------ the mixers
def _mixer(seed: int = 0):
    """One Mamba mixer of the small hybrid (elastic, so it also runs sub-networks), with chunk 32
    and state 16, non-trivial D and norm weights; and its model (for ``set_subnet``)."""
    from megatron_elastic.config import ParallelConfig, load_model_config
    from megatron_elastic.elastic import ElasticConfig, build_elastic_model
    from megatron_elastic.elastic.mamba import ElasticMambaMixer
    from megatron_elastic.parallel import init_process_groups

    cfg = load_model_config(ROOT / "tests" / "fixtures" / "hybrid_small.yaml")
    cfg = dataclasses.replace(cfg, mamba_state_dim=16, mamba_chunk_size=32)
    pgs = init_process_groups(ParallelConfig(), seed=1234)
    torch.manual_seed(seed)
    model = build_elastic_model(cfg, ElasticConfig(budgets={"a": 1.0}), pgs)
    mixer = next(m for m in model.modules() if isinstance(m, ElasticMambaMixer))
    with torch.no_grad():
        mixer.D.uniform_(0.5, 1.5)
        mixer.norm.weight.uniform_(0.5, 1.5)
    return cfg, model, mixer


def _mixer_run(mixer, hidden: torch.Tensor, kernels: str) -> dict[str, torch.Tensor]:
    """The mixer's forward (megatron's ``forward``, or the elastic one when a sub-network is set)
    and the gradients of its input and of every parameter that gets one."""
    mixer.ssm_kernels = kernels
    mixer.zero_grad(set_to_none=True)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return mixer(hidden)[0]

    got = _backward(forward, {"hidden": hidden}, seed=3)
    params = {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None}
    assert len(params) >= 7, sorted(params)  # in_proj, conv w/b, dt_bias, A_log, D, norm, out
    return got | params


def case_mixer(route: str, subnet: bool, head_dim: int = 12) -> dict[str, Any]:
    """The parent's mixer (megatron's ``MambaMixer.forward`` with our ``_ssm_training``) or an
    elastic ``slice`` sub-network's (1 of 2 heads per group, ``head_dim`` 12: 88 conv channels;
    the hidden cut to 48): Triton kernels vs torch, seq 64, output and all gradients."""
    from triton_emulation import fused_conv_route

    from megatron_elastic.elastic import SubnetSpec

    cfg, model, mixer = _mixer()
    width = cfg.hidden_size
    if subnet:  # the mixer of a sub-network receives the hidden states already cut to 48
        width = 48
        spec = SubnetSpec.homogeneous(cfg, hidden=width, mamba_heads=2, mamba_head_dim=head_dim)
        model.set_subnet(spec, mode="slice")
    hidden = torch.randn(64, 1, width, generator=torch.Generator().manual_seed(2))
    want = _mixer_run(mixer, hidden, "torch")
    with fused_conv_route(installed=route == "fused") as calls:
        got = _mixer_run(mixer, hidden, "triton")
    return _compare(got, want, calls)


def case_megatron_training_call() -> dict[str, Any]:
    """Our ``_ssm_training`` on the fused route vs megatron's own ``MambaMixer._ssm_training``
    (which the parent's mixer no longer calls): the same kernel calls, so the same numbers."""
    from megatron.core.ssm.mamba_mixer import MambaMixer
    from triton_emulation import fused_conv_route

    _, _, mixer = _mixer()
    mixer.ssm_kernels = "triton"
    g = torch.Generator().manual_seed(4)
    zxbcdt = torch.randn(64, 1, mixer.in_proj.weight.size(0), generator=g)
    with fused_conv_route(installed=True) as calls:
        runs = []
        for fn in (MambaMixer._ssm_training, type(mixer)._ssm_training):
            mixer.zero_grad(set_to_none=True)
            out = _backward(partial(fn, mixer), {"zxBCdt": zxbcdt}, seed=5)
            runs.append(
                out | {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None}
            )
    return _compare(runs[1], runs[0], calls)


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    **{
        f"kernels/{r}/{'norm' if m else 'gated'}": partial(case_kernels, r, m)
        for r in ROUTES
        for m in (False, True)
    },
    **{f"parent_mixer/{r}": partial(case_mixer, r, False) for r in ROUTES},
    **{f"slice_mixer/{r}": partial(case_mixer, r, True) for r in ROUTES},
    # 2 heads x 10 + 2 groups x 2 x 16 = 84 conv channels: the fused kernel refuses it
    "slice_mixer/fused_84_channels": partial(case_mixer, "fused", True, head_dim=10),
    "megatron_training_call": case_megatron_training_call,
}


# ------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("triton_interpreter") / "cases.json"
    env = os.environ | {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    helper = Path(__file__).with_name("triton_emulation.py")
    done = subprocess.run(
        [sys.executable, str(helper), Path(__file__).stem, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def _check(emulated: dict[str, dict], case: str, fused: bool, tol: float = TOL) -> None:
    result = emulated[case]["result"]
    ran = result["kernel_calls"]  # the Triton path ran, on the route expected
    want = {"scan", "norm"} | ({"fwd", "bwd"} if fused else set())
    if case.endswith("/gated"):
        want.discard("norm")
    assert set(ran) == want, (case, ran)
    errors = result["errors"]
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, (case, worst, errors[worst], errors)


# The cases run in one child process of ~35 s CPU (under a minute on 2 busy cores), which the
# first test that asks for ``emulated`` carries: all of them are marked slow.
@pytest.mark.slow
@pytest.mark.parametrize("norm", ["gated", "norm"])
@pytest.mark.parametrize("route", ROUTES)
def test_invariant_triton_ssm_matches_torch_in_interpreter(emulated, route, norm) -> None:
    _check(emulated, f"kernels/{route}/{norm}", fused=route == "fused")


@pytest.mark.slow
@pytest.mark.parametrize("route", ROUTES)
def test_invariant_parent_mixer_cuda_path_matches_torch(emulated, route) -> None:
    _check(emulated, f"parent_mixer/{route}", fused=route == "fused")


@pytest.mark.slow
@pytest.mark.parametrize("route", [*ROUTES, "fused_84_channels"])
def test_invariant_slice_mixer_cuda_path_matches_torch(emulated, route) -> None:
    """``fused_84_channels``: causal-conv1d present, but a conv of 84 channels, which the fused
    kernel refuses: the fallback runs instead."""
    _check(emulated, f"slice_mixer/{route}", fused=route == "fused")


@pytest.mark.slow
def test_invariant_parent_mixer_is_megatrons_training_call(emulated) -> None:
    _check(emulated, "megatron_training_call", fused=True, tol=0.0)


def test_cuda_conv_route_follows_causal_conv1d() -> None:
    from megatron_elastic.model.mamba import cuda_conv_route

    route, reason = cuda_conv_route()
    try:
        import causal_conv1d  # noqa: F401
    except ImportError:
        assert route == "fallback" and "not installed" in reason
    else:
        assert route == "fused"
