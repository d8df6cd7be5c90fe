"""Test scaffolding: run the project's CUDA Mamba path on CPU tensors, in Triton's interpreter.

``TRITON_INTERPRET=1`` makes ``@triton.jit`` build interpreted kernels that execute on CPU tensors
(numpy underneath). It is read when a kernel is *decorated*, i.e. when mamba-ssm's Triton modules
are imported, and megatron-core imports them early: so the emulated runs happen in a fresh
process (:func:`run_cases`), and the rest of the test suite never sees the interpreter.

Two kinds of stand-ins live here, and nowhere in the product:

- :func:`install_cpu_shims` covers what a CPU-only process lacks around the kernels (each shim is
  commented with the call it answers). None of it changes a kernel's arithmetic.
- :func:`causal_conv1d_fwd_double` / :func:`causal_conv1d_bwd_double` are test doubles of the
  compiled ``causal-conv1d`` extension (its ``cpp_functions``, with the signatures mamba-ssm 2.3.2's
  ``mamba_split_conv1d_scan_combined`` calls), written in torch, so that the fused route's real
  Triton kernels run here although causal-conv1d is not installed. :func:`fused_conv_route`
  installs them where mamba-ssm looks them up.

Run as a script (``python triton_emulation.py MODULE OUT.json``) it runs the ``CASES`` of the
test module ``MODULE`` under the interpreter and writes their results.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "causal_conv1d_bwd_double",
    "causal_conv1d_fwd_double",
    "fused_conv_route",
    "install_cpu_shims",
    "run_cases",
]


def install_cpu_shims() -> None:
    """Cover the four gaps between mamba-ssm's kernel launchers and a CUDA-less process
    (docs/background.md#gpu-kernels-on-cpu-under-tritons-interpreter). Call once, in the
    interpreter process, before any kernel runs."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("set TRITON_INTERPRET=1 before the process imports triton")
    from triton.runtime import autotuner, interpreter

    # 1. mamba-ssm wraps every launch in ``with torch.cuda.device(x.device.index)``; on CPU the
    #    index is None and torch refuses it ("invalid argument to exchangeDevice").
    torch.cuda.device = lambda index=None: contextlib.nullcontext()  # type: ignore[assignment]

    # 2. Backward launchers size their grids with ``get_device_properties(dev)``'s
    #    ``multi_processor_count`` (ssd_chunk_scan, layernorm_gated); any small count is valid.
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(  # type: ignore[assignment]
        multi_processor_count=4, name="triton-interpreter"
    )

    # 3. The autotuner times each config with a GPU benchmarker (needs a driver). Report every
    #    config as equally fast: the first one runs (all configs compute the same values).
    autotuner.Autotuner._bench = lambda self, *args, config, **meta: [0.0, 0.0, 0.0]

    # 4. At each launch the interpreter patches ``tl.tensor.__index__`` to ``int(handle.data)``,
    #    which numpy refuses for a one-element *block* (shape (1,), not a scalar) used as a
    #    ``range()`` bound in ``_chunk_state_fwd_kernel``. Take the single element instead.
    patch = interpreter._patch_lang_tensor
    if getattr(patch, "_emulation", False):
        return

    def patch_lang_tensor(tensor: Any) -> None:
        patch(tensor)
        tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])

    patch_lang_tensor._emulation = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_lang_tensor


def _conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool):
    """Depthwise causal conv of x (b, d, s) with weight (d, w), then optional silu."""
    width = weight.size(-1)
    out = F.conv1d(x, weight[:, None, :], bias, padding=width - 1, groups=x.size(1))
    out = out[..., : x.size(-1)]
    return F.silu(out) if silu else out


def causal_conv1d_fwd_double(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    final_states_out: torch.Tensor | None,
    silu_activation: bool,
) -> torch.Tensor:
    """TEST DOUBLE of ``causal_conv1d.cpp_functions.causal_conv1d_fwd_function``: x (b, d, s) ->
    (b, d, s). Only what mamba-ssm's training path uses (no seq_idx, no states)."""
    if seq_idx is not None or initial_states is not None or final_states_out is not None:
        raise NotImplementedError("the causal-conv1d test double has no seq_idx / states")
    with torch.no_grad():
        return _conv_silu(x.float(), weight.float(), _float(bias), silu_activation).to(x.dtype)


def causal_conv1d_bwd_double(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dout: torch.Tensor,
    seq_idx: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    dfinal_states: torch.Tensor | None,
    dx: torch.Tensor | None,
    return_dinitial_states: bool,
    silu_activation: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, None]:
    """TEST DOUBLE of ``causal_conv1d.cpp_functions.causal_conv1d_bwd_function``: returns
    (dx written into ``dx`` when given, dweight, dbias, None), weight/bias grads in their dtypes."""
    if seq_idx is not None or initial_states is not None or dfinal_states is not None:
        raise NotImplementedError("the causal-conv1d test double has no seq_idx / states")
    if return_dinitial_states:
        raise NotImplementedError("the causal-conv1d test double has no initial states")
    with torch.enable_grad():
        xs = x.detach().float().requires_grad_()
        ws = weight.detach().float().requires_grad_()
        bs = None if bias is None else bias.detach().float().requires_grad_()
        out = _conv_silu(xs, ws, bs, silu_activation)
        inputs = (xs, ws) if bs is None else (xs, ws, bs)
        grads = torch.autograd.grad(out, inputs, dout.float())
    dx_new = grads[0].to(x.dtype)
    if dx is None:
        dx = dx_new
    else:
        dx.copy_(dx_new)
    dbias = None if bias is None else grads[2].to(bias.dtype)
    return dx, grads[1].to(weight.dtype), dbias, None


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


@contextlib.contextmanager
def fused_conv_route(installed: bool) -> Iterator[list[str]]:
    """Make mamba-ssm see causal-conv1d as importable (the doubles above) or as missing, which is
    what :func:`megatron_elastic.model.mamba.cuda_conv_route` reads. Yields the list of calls made
    inside, so a test can tell which path really ran: ``"fwd"`` / ``"bwd"`` (the causal-conv1d
    doubles: the fused route), ``"scan"`` (mamba-ssm's Triton SSD forward, either route) and
    ``"norm"`` (its Triton ``rmsnorm_fn``)."""
    from mamba_ssm.ops.triton import layernorm_gated, ssd_combined

    calls: list[str] = []

    def counted(tag: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append(tag)
            return fn(*args, **kwargs)

        return wrapper

    fwd, bwd = causal_conv1d_fwd_double, causal_conv1d_bwd_double
    replace = [
        (ssd_combined, "causal_conv1d_fwd_function", counted("fwd", fwd) if installed else None),
        (ssd_combined, "causal_conv1d_bwd_function", counted("bwd", bwd) if installed else None),
        (ssd_combined, "_mamba_chunk_scan_combined_fwd", None),
        (layernorm_gated, "rmsnorm_fn", None),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in replace]
    for (module, name, new), (_, _, old) in zip(replace, saved, strict=True):
        tag = {"_mamba_chunk_scan_combined_fwd": "scan", "rmsnorm_fn": "norm"}.get(name)
        setattr(module, name, counted(tag, old) if tag else new)
    try:
        yield calls
    finally:
        for module, name, old in saved:
            setattr(module, name, old)


def run_cases(module: str) -> dict[str, Any]:
    """Run the ``CASES`` (name -> function) of ``module`` in this interpreter process: per case
    ``{"result": what it returned, "seconds": its run time}``."""
    install_cpu_shims()
    from megatron_elastic import platform

    platform.apply()
    cases = importlib.import_module(module).CASES
    results = {}
    for name, case in cases.items():
        t0 = time.perf_counter()
        out = case()
        results[name] = {"result": out, "seconds": round(time.perf_counter() - t0, 2)}
    return results


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    torch.set_num_threads(1)
    out_path = sys.argv[2]
    with open(out_path, "w") as f:
        json.dump(run_cases(sys.argv[1]), f, indent=1)
