"""The one place that works around gaps of megatron-core and mamba-ssm on machines without CUDA.

Nothing else in this repository patches third-party code. :func:`apply` is idempotent and is a
no-op for the CUDA-only patches when CUDA is available; each patch says why it exists. The
mamba-ssm import shim is the exception that also applies on GPU, because the project installs
mamba-ssm without compiling its CUDA extension there too
(docs/background.md#mamba-ssm-without-its-cuda-extension).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import Any

import torch

from megatron_elastic import console

__all__ = [
    "apply",
    "cuda_available",
    "default_device",
    "lower_right_causal_attention",
    "seed_model_parallel_rng",
    "use_torch_nemotron_h_kernels",
]

_APPLIED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def default_device() -> torch.device:
    """Device of this process's model: its CUDA device when there is one, else the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def lower_right_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Causal attention of the last ``Lq`` of ``Lk`` positions: q (b, h, Lq, d) attends to k, v
    (b, h, Lk, d), ``Lq <= Lk``, query ``i`` to keys ``0..Lk-Lq+i`` (bottom-right aligned).

    On CUDA, torch's ``causal_lower_right`` dispatches to the flash / memory-efficient kernels.
    Elsewhere it materialises an (Lq, Lk) mask and the math kernel's scores, so the queries are
    left-padded with zeros to ``Lk`` rows and run through the causal flash kernel (top-left
    aligned, linear memory); the padded rows are dropped (they get no gradient). Costs up to
    ``Lk/Lq`` times the compute, which only the CPU context-parallel tests pay.
    """
    lq, lk = q.size(-2), k.size(-2)
    if lq == lk:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale
        )
    if q.device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(lq, lk)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale
        )
    padded = torch.cat([q.new_zeros(*q.shape[:-2], lk - lq, q.size(-1)), q], dim=-2)
    out = torch.nn.functional.scaled_dot_product_attention(
        padded, k, v, is_causal=True, scale=scale
    )
    return out[..., lk - lq :, :]


def _register_mamba_ssm_without_extension() -> None:
    """mamba-ssm's package ``__init__`` imports ``selective_scan_cuda`` (a compiled Mamba-1 op),
    which does not exist when mamba-ssm is installed with ``MAMBA_SKIP_CUDA_BUILD``. The Mamba-2
    pieces megatron-core needs (``ops.triton.ssd_combined``, ``ops.triton.layernorm_gated``) are
    pure Python/Triton, so we register the package without running its ``__init__``."""
    if "mamba_ssm" in sys.modules:
        return
    try:
        importlib.import_module("mamba_ssm")
        return
    except ImportError:
        for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
            del sys.modules[name]
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        return  # not installed: megatron's MambaMixer will say so when built
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    package.__spec__ = spec
    sys.modules["mamba_ssm"] = package


class _CpuStream:
    """A CUDA stream stand-in: work on the CPU is already ordered, so waiting is a no-op."""

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` for the shimmed modules: DDP's gradient buckets order their all-reduce
    against the current CUDA stream (``current_stream().wait_event``, ``with cuda.stream(s)``)."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    def current_stream(self, device: Any = None) -> _CpuStream:
        return _CpuStream()

    def stream(self, stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _CpuDeviceTorch(types.ModuleType):
    """Stands in for ``torch`` inside a few megatron-core modules that hard-code ``device="cuda"``
    (default causal masks, pipeline token counters, p2p shape buffers) or CUDA streams (DDP's
    gradient buckets). Every attribute is torch's, except that tensor factories map a CUDA device
    to the CPU and ``torch.cuda`` streams are no-ops."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in self._FACTORIES:

            def factory(*args: Any, **kwargs: Any) -> torch.Tensor:
                device = kwargs.get("device")
                if device is not None and torch.device(device).type == "cuda":
                    kwargs["device"] = "cpu"
                return attr(*args, **kwargs)

            return factory
        return attr


_CPU_DEVICE_MODULES = (
    # get_default_causal_mask / sliding-window masks: torch.ones(..., device="cuda")
    "megatron.core.transformer.utils",
    "megatron.core.fusions.fused_softmax",
    # forward_backward_*: total_num_tokens = torch.zeros([], device="cuda")
    "megatron.core.pipeline_parallel.schedules",
    # FP32Optimizer / grad clipping keep scale, found-inf and norm scalars on "cuda"
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    # local_multi_tensor_l2_norm (the no-apex fallback used for grad norms) returns a "cuda" tensor
    "megatron.core.utils",
    # DDP gradient sync (finalize_model_grads): torch.cuda.current_stream() / torch.cuda.stream()
    "megatron.core.distributed.param_and_grad_buffer",
)


class _CpuRngStatesTracker:
    """megatron's ``CudaRNGStatesTracker`` keeps named CUDA generator states and forks into them
    while initialising tensor-parallel weights; ``torch.cuda.get_rng_state`` fails without CUDA.
    This tracker keeps named CPU generator states with the same names, seeds and ``fork``
    semantics, so weight initialisation and dropout draw from per-rank streams on CPU too."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _clip_grad_by_total_norm_cpu(
    parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
) -> None:
    """megatron's ``clip_grad_by_total_norm_fp32`` asserts ``grad.type() ==
    'torch.cuda.FloatTensor'``; the same in-place scaling for CPU gradients."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(clip_coeff, torch.Tensor):
        clip_coeff = clip_coeff.clamp_max(1.0)
    elif clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = getattr(param, attr, None)
        if grad is not None:
            grad.detach().mul_(clip_coeff)


@contextlib.contextmanager
def _cpu_tensors_typed_as_cuda() -> Iterator[None]:
    """``Tensor.type()`` (the no-argument form) names a CPU tensor's CUDA type while active:
    ``torch.BFloat16Tensor`` reads ``torch.cuda.BFloat16Tensor``. Conversions are untouched."""
    original = torch.Tensor.type
    own = "type" in torch.Tensor.__dict__

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kw: Any) -> Any:
        if dtype is None and not kw and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kw)

    torch.Tensor.type = type_  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own:
            torch.Tensor.type = original  # type: ignore[method-assign]
        else:
            del torch.Tensor.type


def _mixed_precision_optimizer_on_cpu() -> None:
    """megatron's bf16 optimizer (``Float16OptimizerWithFloat16Params``: fp32 main weights and
    gradients for bf16 parameters) sorts its parameters by ``param.type()``, accepting only the
    strings ``torch.cuda.{BFloat16,Half,Float}Tensor`` and raising ``TypeError`` for CPU
    tensors. Its construction runs with CPU tensors named as CUDA ones; the rest of the class
    (main-grad copy, unscale, main-param copy-back) is device-agnostic once its "cuda" scalars
    are made on the CPU (``megatron.core.optimizer.optimizer`` is in ``_CPU_DEVICE_MODULES``)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    # The distributed optimizer sorts its shards by ``param.type()`` the same way.
    for cls in (Float16OptimizerWithFloat16Params, DistributedOptimizer):
        init = cls.__init__

        @functools.wraps(init)
        def cpu_init(self: Any, *args: Any, _init: Any = init, **kwargs: Any) -> None:
            with _cpu_tensors_typed_as_cuda():
                _init(self, *args, **kwargs)

        cls.__init__ = cpu_init  # type: ignore[method-assign]


def seed_model_parallel_rng(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """Seed the default and the named model-parallel RNG streams, on GPU or CPU.

    Same seeds as megatron's ``model_parallel_cuda_manual_seed``: data-parallel stream ``seed``,
    tensor-parallel stream ``seed + 2718 + tp_rank``, expert stream ``seed + 1024 + 100 *
    ep_rank + etp_rank`` (each expert-parallel rank initialises its own experts differently).
    """
    from megatron.core.tensor_parallel import random as mp_random

    torch.manual_seed(seed)
    if cuda_available():
        mp_random.model_parallel_cuda_manual_seed(
            seed, tp_rank=tp_rank, ep_rank=ep_rank, etp_rank=etp_rank
        )
        return
    apply()
    tracker = mp_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    expert_seed = seed + 1024 + 100 * ep_rank + etp_rank
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, expert_seed)


def apply() -> None:
    """Install the workarounds this machine needs. Safe to call any number of times."""
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True
    console.quiet()
    _register_mamba_ssm_without_extension()
    if cuda_available():
        return

    # MambaMixer allocates conv1d/dt/A/D/norm with device=torch.cuda.current_device(), and p2p
    # communication sizes its shape buffers the same way; on a CPU-only machine that call raises.
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    # p2p communication synchronises the CUDA stream after batched isend/irecv; gloo is synchronous.
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]

    shim = _CpuDeviceTorch()
    for module_name in _CPU_DEVICE_MODULES:
        module = importlib.import_module(module_name)
        module.torch = shim  # type: ignore[attr-defined]

    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import random as mp_random

    for module in (clip_grads, optimizer):  # optimizer.py imported the function by name
        module.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu  # type: ignore[attr-defined]
    _mixed_precision_optimizer_on_cpu()

    # megatron wraps its activations in torch.compile at import. On CPU, inductor builds C++ for
    # every new shape (seconds each, and slice-mode FFN widths change per micro-batch) to fuse
    # one elementwise op: run them eagerly instead.
    from megatron.core import activations

    for name in ("squared_relu", "quick_gelu", "fast_gelu"):
        eager = getattr(getattr(activations, name, None), "_torchdynamo_orig_callable", None)
        if eager is not None:
            setattr(activations, name, eager)

    # The same for the MoE router's expert-bias token count (TopKRouter._apply_expert_bias is
    # @jit_fuser, i.e. torch.compile): ~13 s of C++ compilation on the first training forward of
    # a model with moe_router_enable_expert_bias, and again per new shape, for one add.
    from megatron.core.transformer.moe.router import TopKRouter

    eager = getattr(TopKRouter._apply_expert_bias, "_torchdynamo_orig_callable", None)
    if eager is not None:
        TopKRouter._apply_expert_bias = eager  # type: ignore[method-assign]

    # get_cuda_rng_tracker() returns this module-level singleton; on CPU it must not touch CUDA.
    mp_random._CUDA_RNG_STATE_TRACKER = _CpuRngStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _expert_weights_from_the_expert_stream()


def _expert_weights_from_the_expert_stream() -> None:
    """On GPU megatron draws expert weights from the expert-parallel RNG stream (seeded per EP
    rank); its CPU initialisation (``use_cpu_initialization``) draws every weight from the
    default generator, so each EP rank's local expert ``i`` would start equal. Build expert
    linears inside the expert stream on CPU too (the default stream, and so every replicated
    weight, is left as if they were not drawn)."""
    from megatron.core.tensor_parallel import layers
    from megatron.core.tensor_parallel import random as mp_random

    for cls in (layers.ColumnParallelLinear, layers.RowParallelLinear):
        init = cls.__init__

        @functools.wraps(init)
        def expert_init(self, *args: Any, _init=init, **kwargs: Any) -> None:
            if not kwargs.get("is_expert", False):
                return _init(self, *args, **kwargs)
            with mp_random.get_cuda_rng_tracker().fork(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME):
                return _init(self, *args, **kwargs)

        cls.__init__ = expert_init  # type: ignore[method-assign]


def use_torch_nemotron_h_kernels() -> None:
    """CPU only: make transformers' NemotronH take its pure-torch Mamba path in this process.

    transformers picks mamba-ssm's Triton kernels, at the import of its NemotronH module, when
    ``mamba_ssm`` imports; megatron-elastic registers it (for megatron's mixer) even without CUDA,
    and the kernels fail on CPU tensors. Call before loading a stock NemotronH in such a process.
    """
    name = "transformers.models.nemotron_h.modeling_nemotron_h"
    if name in sys.modules or cuda_available():
        return
    saved = {k: v for k, v in sys.modules.items() if k == "mamba_ssm" or k.startswith("mamba_ssm.")}
    sys.modules["mamba_ssm"] = None  # type: ignore[assignment]  # import now raises ImportError
    try:
        importlib.import_module(name)
    finally:
        del sys.modules["mamba_ssm"]
        sys.modules.update(saved)
