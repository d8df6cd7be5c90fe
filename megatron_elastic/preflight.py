"""Environment checks before a training stage: can this machine run this recipe?

One line per check (``tools/preflight.py --recipe R``; the trainer runs the same checks at start
on CUDA and refuses to start when a required one fails):

* CUDA torch (device name, capability) and NCCL (version): required on GPU runs;
* Transformer Engine: optional, the local spec (megatron-core's local modules) replaces it;
* mamba-ssm's Triton kernels (``mamba_ssm.ops.triton.ssd_combined``, ``layernorm_gated``):
  required everywhere (megatron's ``MambaMixer`` refuses to build without them);
* causal-conv1d: optional, the Mamba conv takes its fused kernel or the fallback;
* the memory planner's peak per rank against the device's memory less a headroom (on CPU: the
  ``cpu-fp32`` plan against this host's memory shared by its ranks);
* free disk at the save directory against the checkpoints the stage keeps.

Exit policy on a machine without CUDA: the GPU-only checks (CUDA, NCCL, device memory) are
reported as not checked, not as failures, with the per-GPU figure the recipe would need; the
recipe is a CPU recipe when its ``cpu-fp32`` plan fits this host's memory, and then the tool
exits 0 if the rest passes. A recipe that does not fit (a 12B stage) fails the memory check
with "run it on GPUs" and the tool exits 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_elastic.model.param_count import count_parameters

__all__ = [
    "CheckResult",
    "PreflightConfig",
    "check_causal_conv1d",
    "check_cuda",
    "check_disk",
    "check_mamba_ssm",
    "check_memory",
    "check_nccl",
    "check_transformer_engine",
    "checkpoint_bytes",
    "format_results",
    "report",
    "require_environment",
    "run_checks",
]

GIB = 1024**3
FUSED_CONV = "fused (causal-conv1d)"
FALLBACK_CONV = "fallback (torch conv + mamba_chunk_scan_combined)"
MAMBA_MODULES = ("mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.layernorm_gated")
MAMBA_FIX = (
    "MAMBA_SKIP_CUDA_BUILD=TRUE pip install --no-build-isolation --no-deps mamba-ssm==2.3.2.post1"
)


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check."""

    name: str
    """What was checked (``CUDA``, ``NCCL``, ``memory``...)."""
    ok: bool
    """Passed; a check that could not run on this machine is not ok."""
    required: bool
    """A failure stops the run (exit 2); an optional one is a note."""
    message: str
    """What was found; for a failure, the fix."""

    @property
    def failed(self) -> bool:
        return self.required and not self.ok

    def line(self) -> str:
        status = "ok" if self.ok else ("FAIL" if self.required else "note")
        return f"{status:<5}{self.name}: {self.message}"


@dataclass(frozen=True)
class PreflightConfig:
    """What the checks assume about the job."""

    world_size: int | None = None
    """Ranks of the job (``None``: TP x PP x CP, i.e. data parallel 1, the most memory per rank:
    optimizer state unsharded and the most micro-batches per replica)."""
    headroom: float = 0.10
    """Fraction of a device's memory kept free beyond the planned peak: the CUDA context and
    NCCL buffers (1-3 GiB), the caching allocator's fragmentation, and the error of the
    ``gpu-bf16`` plan (not yet measured against a GPU)."""
    ranks_per_host: int | None = None
    """CPU: ranks sharing this host's memory (``None``: ``LOCAL_WORLD_SIZE``, else all)."""

    def __post_init__(self) -> None:
        if self.world_size is not None and self.world_size < 1:
            raise ValueError(f"world size must be >= 1, got {self.world_size}")
        if not 0 <= self.headroom < 1:
            raise ValueError(f"headroom must be in [0, 1), got {self.headroom}")


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


def check_cuda() -> CheckResult:
    """CUDA torch and the device of this process."""
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
        return CheckResult(
            "CUDA",
            False,
            False,
            f"not available (torch {torch.__version__}, {build}): CPU run; could not check "
            "the GPU, NCCL or device memory",
        )
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return CheckResult(
        "CUDA",
        True,
        True,
        f"{torch.cuda.get_device_name(index)}, capability {major}.{minor}, "
        f"{torch.cuda.device_count()} device(s) (torch {torch.__version__}, CUDA "
        f"{torch.version.cuda})",
    )


def check_nccl(cuda: bool) -> CheckResult:
    """torch.distributed's NCCL backend (GPU runs all-reduce over it)."""
    import torch.distributed as dist

    if not cuda:
        return CheckResult("NCCL", False, False, "not checked (CPU run: gloo is used)")
    if not dist.is_nccl_available():
        return CheckResult(
            "NCCL",
            False,
            True,
            f"torch {torch.__version__} has no NCCL backend: install a CUDA build of torch "
            "(pip install torch from the CUDA index)",
        )
    version = ".".join(str(v) for v in torch.cuda.nccl.version())
    return CheckResult("NCCL", True, True, f"available, version {version}")


def check_transformer_engine(cuda: bool) -> CheckResult:
    """Transformer Engine: optional; without it the model builds on the local spec."""
    local = "the local spec (megatron-core local modules) is used"
    if importlib.util.find_spec("transformer_engine") is None:
        return CheckResult(
            "Transformer Engine",
            False,
            False,
            f"not installed: {local}"
            + ("; pip install transformer-engine[pytorch] for TE's fused kernels" if cuda else ""),
        )
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as exc:  # (a broken install raises OSError, RuntimeError...)
        if not cuda:
            return CheckResult("Transformer Engine", False, False, f"not usable on CPU: {local}")
        # The builder picks the TE spec whenever the package is found: a broken one stops it.
        return CheckResult(
            "Transformer Engine",
            False,
            True,
            f"installed but does not import ({_error(exc)}): reinstall it, or pip uninstall "
            f"transformer-engine and {local}",
        )
    if not cuda:
        return CheckResult("Transformer Engine", False, False, f"importable, CPU run: {local}")
    return CheckResult("Transformer Engine", True, False, "importable: the TE spec is used")


def check_mamba_ssm() -> CheckResult:
    """mamba-ssm's Triton kernels, which megatron's Mamba mixer needs (also on CPU, where our
    torch path replaces them but megatron still refuses to build without them)."""
    from megatron_elastic import platform

    # Registers mamba_ssm without its compiled extension
    # (docs/background.md#mamba-ssm-without-its-cuda-extension).
    platform.apply()
    for name in MAMBA_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:
            return CheckResult(
                "mamba-ssm", False, True, f"{name} does not import ({_error(exc)}): {MAMBA_FIX}"
            )
    return CheckResult("mamba-ssm", True, True, "Triton kernels importable (ssd_combined)")


def check_causal_conv1d(cuda: bool) -> CheckResult:
    """The Mamba conv route on CUDA (:func:`~megatron_elastic.model.mamba.cuda_conv_route`, read
    where mamba-ssm looks causal-conv1d up): its fused kernel, else the fallback."""
    from megatron_elastic.model.mamba import cuda_conv_route

    try:
        route, _ = cuda_conv_route()
    except Exception as exc:  # mamba-ssm itself does not import: its own check says the fix
        return CheckResult("causal-conv1d", False, False, f"not checked ({_error(exc)})")
    if route == "fused":
        return CheckResult("causal-conv1d", True, False, FUSED_CONV)
    where = "" if cuda else " on GPU; CPU runs the pure-torch path"
    return CheckResult(
        "causal-conv1d",
        False,
        False,
        f"{FALLBACK_CONV}{where} (mamba-ssm found no causal_conv1d); pip install causal-conv1d "
        "for the fused path",
    )


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(recipe, config: PreflightConfig, cuda: bool) -> CheckResult:
    """The planner's peak per rank (``planning/memory.py``) against the device's memory less
    ``config.headroom``; on CPU against this host's memory divided among its ranks."""
    from megatron_elastic.planning import plan_config_from_recipe, plan_memory

    p = recipe.parallel
    # Unknown world: the smallest that runs the recipe (EP is carved out of DP x CP).
    ep, cp = p.expert_model_parallel_size, p.context_parallel_size
    world = config.world_size or p.model_parallel_size * (ep // math.gcd(ep, cp))
    keep = 1 - config.headroom

    def peak(profile: str | None) -> tuple[float, str]:
        cfg = plan_config_from_recipe(recipe, world_size=world, profile=profile)
        return plan_memory(cfg).peak, cfg.profile

    try:
        gpu_bytes, gpu_profile = peak(None)
        cpu_bytes = 0.0 if cuda else peak("cpu-fp32")[0]  # the CPU plan only serves a CPU run
    except ValueError as exc:
        return CheckResult("memory", False, False, f"could not plan: {exc}")
    fix = (
        "raise parallel.tensor/pipeline/context/expert_model_parallel_size, or set "
        "parallel.sequence_parallel=true, train.recompute_activations=true, "
        "optim.use_distributed_optimizer=true, or a smaller train.micro_batch_size"
    )
    plan = f"planned peak {gpu_bytes / GIB:.1f} GiB per GPU ({gpu_profile} plan, world {world})"
    if cuda:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        usable = props.total_memory * keep
        text = (
            f"{plan} vs {usable / GIB:.1f} GiB usable of {props.total_memory / GIB:.1f} GiB "
            f"({props.name}, {config.headroom:.0%} headroom)"
        )
        if gpu_bytes > usable:
            return CheckResult("memory", False, True, f"{text}: does not fit; {fix}")
        return CheckResult("memory", True, True, text)
    ranks = config.ranks_per_host or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    usable = _host_memory() * keep / ranks
    text = (
        f"CPU: cpu-fp32 plan {cpu_bytes / GIB:.2f} GiB per rank vs {usable / GIB:.1f} GiB "
        f"(host memory / {ranks} rank(s), {config.headroom:.0%} headroom); on GPUs: {plan}"
    )
    if cpu_bytes > usable:
        return CheckResult("memory", False, True, f"{text}: does not fit; run it on GPUs")
    return CheckResult("memory", True, True, text)


def checkpoint_bytes(recipe, bf16: bool) -> tuple[int, str]:
    """Bytes of one checkpoint of the stage (all ranks together) and what they include."""
    params = count_parameters(recipe.model)
    weights = 2 if bf16 else 4
    optimizer = 8 + (4 if bf16 else 0)  # Adam's two moments (+ fp32 main weights under bf16)
    total = params * (weights + optimizer)
    what = (
        f"{params:,} params x ({weights} B {'bf16' if bf16 else 'fp32'} weights + "
        f"{optimizer} B optimizer: Adam moments{' + fp32 main weights' if bf16 else ''})"
    )
    if recipe.mode == "elastic":
        from megatron_elastic.router import ElasticRouter

        module = ElasticRouter(recipe.model, recipe.elastic, recipe.router)
        router = sum(t.numel() for t in module.parameters())
        total += router * 12  # fp32 weights + Adam moments, in extra.pt
        what += f" + router {router:,} params x 12 B"
    return total, what


def check_disk(recipe, bf16: bool) -> CheckResult:
    """Free space at the save directory (its nearest existing parent) against the checkpoints on
    disk at once: ``keep_last`` plus the one being written, less those already there."""
    save = Path(recipe.checkpoint.save).absolute()
    where = save
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    size, what = checkpoint_bytes(recipe, bf16)
    existing = len([p for p in save.glob("step_*") if p.is_dir()]) if save.is_dir() else 0
    count = max(1, recipe.checkpoint.keep_last + 1 - existing)
    need = count * size
    text = (
        f"{free / GIB:.1f} GiB free at {where}; {count} more checkpoint(s) of "
        f"{size / GIB:.2f} GiB ({what}; logs not counted) need {need / GIB:.2f} GiB"
    )
    if need > free:
        return CheckResult(
            "disk",
            False,
            True,
            f"{text}: free space, or point checkpoint.save elsewhere or lower checkpoint.keep_last",
        )
    return CheckResult("disk", True, True, text)


def run_checks(recipe, config: PreflightConfig | None = None) -> list[CheckResult]:
    """Every check for ``recipe`` on this machine, in report order."""
    config = config or PreflightConfig()
    cuda_result = check_cuda()
    cuda = cuda_result.ok
    bf16 = recipe.train.resolved_precision(cuda) == "bf16"
    return [
        cuda_result,
        check_nccl(cuda),
        check_transformer_engine(cuda),
        check_mamba_ssm(),
        check_causal_conv1d(cuda),
        check_memory(recipe, config, cuda),
        check_disk(recipe, bf16),
    ]


def format_results(results: list[CheckResult]) -> str:
    """One line per check, then the verdict."""
    failed = [r.name for r in results if r.failed]
    verdict = (
        f"preflight: {len(failed)} required check(s) failed: {', '.join(failed)}"
        if failed
        else "preflight: all required checks passed"
    )
    return "\n".join([*(r.line() for r in results), verdict])


def report(recipe, config: PreflightConfig | None = None) -> int:
    """Print one line per check; return the exit status (0 passed, 2 a required check failed)."""
    results = run_checks(recipe, config)
    print(format_results(results), flush=True)
    return 2 if any(r.failed for r in results) else 0


def require_environment(
    recipe,
    config: PreflightConfig,
    *,
    log: Callable[[str], None] | None = None,
    device: torch.device | None = None,
) -> list[CheckResult]:
    """Run the checks (printing them through ``log`` when given); raise a one-line
    ``ValueError`` naming the fixes when a required one fails. With torch.distributed
    initialised, every rank checks its own node and every rank stops when any one fails (one
    all-reduce on ``device``), so no rank waits for one that has left."""
    import torch.distributed as dist

    results = run_checks(recipe, config)
    if log is not None:
        for line in format_results(results).splitlines():
            log(line)
    failed = [r for r in results if r.failed]
    elsewhere = False
    if dist.is_initialized():
        flag = torch.tensor([float(bool(failed))], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        elsewhere = bool(flag.item())
    if failed:
        raise ValueError("preflight failed: " + "; ".join(f"{r.name}: {r.message}" for r in failed))
    if elsewhere:
        raise ValueError("preflight failed on another rank (its log line says why)")
    return results
