"""What a training step logs beyond its losses: peak memory per pipeline stage against the
planner, a step-time breakdown, tokens/s and MFU, and the router's choices.

* **Timers** (:class:`StepTimers`) plug into megatron-core's ``TransformerConfig.timers``, the
  hook its pipeline schedules and ``finalize_model_grads`` call, so megatron's own phases are
  timed where megatron draws them: ``forward`` (``forward-compute``: each micro-batch's forward
  step: the router's decision hook, the frozen teacher's forward, the student's forward and the
  loss), ``backward`` (``backward-compute``), ``pipeline p2p`` (the schedule's sends and
  receives: the pipeline bubble shows here), ``grads sync`` (``finalize_model_grads``: the
  data-parallel gradient all-reduce and the embedding/layer-norm reductions). The trainer adds
  ``data`` (reading and moving the step's micro-batches) and ``optimizer`` (megatron's optimizer
  step, LR schedules, the router's step). ``teacher`` (forward hooks on the frozen teacher) lies
  inside ``forward`` and is reported as its own line. Only steps that are logged are timed: on
  CPU with the wall clock; on CUDA with events recorded on the current stream (no host sync
  per micro-batch) that are read once, after one ``synchronize`` at the end of the logged step
  (and one at its start, so the step's time is its own). The disjoint timers (all but
  ``teacher``) sum to at most ``step``.
* **Peak memory** (:class:`PeakMemory`) over the step up to its statistics reduction (data,
  forward, backward, gradient reduction; the optimizer update after it is not in the window):
  CUDA ``torch.cuda.max_memory_allocated``, reset at every step's start (host-side counters,
  no sync); CPU the CPU allocator's live bytes on all threads (:mod:`~megatron_elastic.planning.
  measure`, the counter ``benchmarks/bench_memory.py`` reads), profiled on logged steps only.
  Each rank's peak rides in the step's one all-reduce (one slot per rank); rank 0 takes the max
  over each pipeline stage's ranks and logs it next to the planner's prediction for the same
  recipe (:func:`~megatron_elastic.planning.memory.plan_memory`, once at start, the profile
  preflight plans: ``cpu-fp32`` on CPU, else by ``train.precision``). A stage whose measured peak
  exceeds its prediction by more than ``logging.memory_warning_ratio`` is warned about once per
  stage per run (every step's ratio stays in ``metrics.jsonl``).
* **Throughput** over the steps since the last log (their wall times; evaluation and checkpoints
  excluded): tokens/s, and FLOP/s from :mod:`~megatron_elastic.planning.flops` with each
  budget's current deterministic architecture weighted by the micro-batches drawn for it; MFU
  (model FLOPs) and HFU (with recomputation) against the device's peak (``n/a`` on CPU unless
  ``logging.peak_tflops`` is set).
* **Draws** (:class:`~megatron_elastic.training.metrics.DrawCounts`) over the same steps: the
  micro-batches of each budget (from the sampler, all replicas) and of each architecture the
  router ran for it (gathered from the data-parallel replicas at the logged step).
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron_elastic import platform
from megatron_elastic.planning.flops import StepFlops, peak_flops
from megatron_elastic.planning.measure import CpuPeakWindow
from megatron_elastic.training.metrics import DrawCounts, StepRecord

__all__ = ["PeakMemory", "StepLog", "StepTimers", "router_scalars"]

GIB = 1024**3
_MEGATRON_TIMERS = {
    "forward-compute": "forward",
    "backward-compute": "backward",
    "all-grads-sync": "grads sync",
    "conditional-embedder-grads-all-reduce": "grads sync",
    "non-tensor-parallel-grads-all-reduce": "grads sync",
    "embedding-grads-all-reduce": "grads sync",
}
"""megatron's timer names -> ours; its send/receive timers (``*-send``, ``*-recv``) are
``pipeline p2p``, the rest (``forward-backward``, the whole schedule) are ignored."""
DISJOINT = ("data", "forward", "backward", "pipeline p2p", "grads sync", "optimizer")
"""Timers that never overlap (``teacher`` is inside ``forward``)."""


class _Timer:
    def __init__(self, owner: StepTimers, name: str) -> None:
        self.owner, self.name = owner, name

    def start(self, barrier: bool = False) -> None:  # megatron's signature; never a barrier
        self.owner._start(self.name)

    def stop(self, barrier: bool = False) -> None:
        self.owner._stop(self.name)


class StepTimers:
    """Accumulating named timers with megatron's ``Timers`` call interface
    (``timers(name, log_level=None).start()/.stop()``), for ``TransformerConfig.timers``. Idle
    (every call a no-op) outside :meth:`begin`/:meth:`end`. Why not megatron's ``Timers``: its
    timer calls ``torch.cuda.synchronize()`` at every start and stop (a host sync per
    micro-batch, and no CPU)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.active = False
        self._open: dict[str, object] = {}
        self._spans: list[tuple[str, object, object]] = []
        self._events: list[torch.cuda.Event] = []
        self._t0 = 0.0

    def __call__(self, name: str, log_level: int | None = None) -> _Timer:
        return _Timer(self, name)

    def _mark(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = self._events.pop() if self._events else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _start(self, name: str) -> None:
        if self.active:
            self._open[name] = self._mark()

    def _stop(self, name: str) -> None:
        if self.active and name in self._open:
            self._spans.append((name, self._open.pop(name), self._mark()))

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Time the block as ``name``."""
        self._start(name)
        try:
            yield
        finally:
            self._stop(name)

    def begin(self, enabled: bool) -> None:
        """Start a step; time it only if ``enabled``."""
        self.active = enabled
        self._spans.clear()
        self._open.clear()
        if enabled and self.cuda:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        """Host seconds since :meth:`begin` (synchronised only on timed steps)."""
        return time.perf_counter() - self._t0

    def end(self) -> dict[str, float]:
        """Finish the step: seconds per timer (ours and megatron's, merged by
        :data:`_MEGATRON_TIMERS`) and ``step``, its wall time; ``{}`` if it was not timed."""
        if not self.active:
            return {}
        self.active = False
        if self.cuda:
            torch.cuda.synchronize()
        out = {"step": time.perf_counter() - self._t0}
        for name, start, stop in self._spans:
            if self.cuda:
                seconds = start.elapsed_time(stop) / 1000
                self._events += [start, stop]
            else:
                seconds = stop - start
            if name.endswith(("-send", "-recv")):
                key = "pipeline p2p"
            else:
                key = _MEGATRON_TIMERS.get(name, name)
            if key != "forward-backward":
                out[key] = out.get(key, 0.0) + seconds
        return out


class PeakMemory:
    """This rank's peak allocated bytes over a window (see the module docstring). Construct it
    before the model: on CPU the allocator counts from then on, on every thread."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._cpu = None if cuda else CpuPeakWindow()

    def begin(self, measure: bool) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif measure:
            self._cpu.start()

    def close(self) -> None:
        """Drop an open window unread (the step raised)."""
        if self._cpu is not None:
            self._cpu.close()

    def read(self) -> float:
        """Peak bytes since :meth:`begin` (0.0: not measured)."""
        if self.cuda:
            return float(torch.cuda.max_memory_allocated())
        return float(self._cpu.stop()) if self._cpu.running else 0.0


def router_scalars(router, router_config, model_config, budgets, router_step: int):
    """Scalars, console text and each budget's deterministic architecture of the router."""
    from megatron_elastic.elastic.budget import subnet_param_count
    from megatron_elastic.model import count_parameters
    from megatron_elastic.router import temperature

    tau = temperature(router_config, router_step)
    scalars, choices, specs = {"router/temperature": tau}, [], {}
    for name in budgets:
        spec = specs[name] = router.decide(name, 0, None, deterministic=True).spec
        fraction = subnet_param_count(model_config, spec) / count_parameters(model_config)
        scalars[f"router/params_fraction/{name}"] = fraction
        # The inference architecture's cost against its target (params, memory or latency):
        # what "the router meets its budget" means.
        ratio = router.cost_ratio(spec, name)  # spec: the deployed decision
        scalars[f"router/target_ratio/{name}"] = ratio
        scalars[f"router/argmax_ratio/{name}"] = router.target_ratio(name, raw_argmax=True)
        choices.append(f"{name}->{fraction:.0%} ({ratio:.3f}x)")
    return scalars, f"tau {tau:.3f} router [{' '.join(choices)}]", specs


class StepLog:
    """Per-step timers, memory and throughput of a :class:`~megatron_elastic.training.trainer.
    Trainer`, and its log lines. Rank 0 logs; every rank measures."""

    def __init__(self, trainer, *, warn=print) -> None:
        t = self.trainer = trainer
        r = t.recipe
        self.cuda = platform.cuda_available()
        self.timers = StepTimers(self.cuda)
        self.memory = PeakMemory(self.cuda)
        self.warn = warn
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.planned, self.plan_note = self._plan(r)
        if self.planned is None and self.rank == 0:
            warn(f"[train] {self.plan_note}; peak memory is logged without a prediction")
        self._warned: set[int] = set()
        self.flops = StepFlops(
            r.model,
            seq_length=r.train.seq_length,
            micro_batch_size=r.train.micro_batch_size,
            teacher=r.distill.teacher != "none",
            recompute=r.train.recompute_activations,
            full_width=r.mode == "elastic" and r.elastic.mode == "mask",
        )
        name = torch.cuda.get_device_name() if self.cuda else None
        self.peak_flops = peak_flops(name, r.logging.peak_tflops)
        self._interval = {"seconds": 0.0, "tokens": 0.0, "steps": 0}
        self._draws: collections.Counter = collections.Counter()
        self._architectures: collections.Counter = collections.Counter()  # this replica's
        self._stage_peaks: dict[int, float] = {}
        self._times: dict[str, float] = {}

    def _plan(self, recipe) -> tuple[list[float] | None, str]:
        from megatron_elastic.planning import plan_config_from_recipe, plan_memory

        profile = None if self.cuda else "cpu-fp32"  # as preflight plans it
        try:
            cfg = plan_config_from_recipe(recipe, world_size=self.world, profile=profile)
        except ValueError as exc:
            return None, f"no memory plan: {exc}"
        return [s.peak for s in plan_memory(cfg).stages], f"{cfg.profile} plan"

    def attach(self, config, teacher) -> None:
        """Time megatron's phases (``config``: the student's ``TransformerConfig``) and the frozen
        ``teacher``'s forward (``None``: no separate teacher module)."""
        config.timers = self.timers
        if teacher is not None:
            teacher.register_forward_pre_hook(lambda *_: self.timers._start("teacher"))
            teacher.register_forward_hook(lambda *_: self.timers._stop("teacher"))

    def due(self, step: int) -> bool:
        """Whether ``step`` is logged (every ``log_interval``, the first and the last)."""
        r = self.trainer.recipe
        return step % r.logging.log_interval == 0 or step in (1, r.train.steps)

    # ------------------------------------------------------------------ inside train_step
    def begin(self, step: int) -> None:
        due = self.due(step)
        self.memory.begin(measure=due)
        self.timers.begin(enabled=due)

    def rank_values(self) -> list[float]:
        """This rank's values for the step's reduction: its peak bytes and pipeline stage."""
        return [self.memory.read(), float(self.trainer.pgs.pp.rank())]

    def reduced(self, step: int, per_rank: list[list[float]]) -> None:
        """Every rank's :meth:`rank_values` after the step's reduction: the max per stage,
        checked against the plan."""
        peaks: dict[int, float] = {}
        for peak, stage in per_rank:
            peaks[int(stage)] = max(peaks.get(int(stage), 0.0), peak)
        self._stage_peaks = {s: p for s, p in peaks.items() if p > 0}
        self._check_memory(step)

    def end(self, step: int, done: bool) -> None:
        """After the optimizer step (``done``: it was taken)."""
        t = self.trainer
        times = self.timers.end()
        if times:
            self._times = times
        if not done:
            return
        r = t.recipe
        self._interval["seconds"] += self.timers.elapsed
        self._interval["tokens"] += r.train.global_batch_size * r.train.seq_length
        self._interval["steps"] += 1
        draws = t.dp_size * t.num_micro
        if t.router is None:
            self._draws[None] += draws
        else:
            self._draws.update(t.sampler.sample(step, i) for i in range(draws))
            self._architectures.update(t.step_architectures)

    def _check_memory(self, step: int) -> None:
        if self.planned is None or self.rank != 0:
            return
        limit = self.trainer.recipe.logging.memory_warning_ratio
        for stage, peak in sorted(self._stage_peaks.items()):
            plan = self.planned[stage]
            if peak > limit * plan and stage not in self._warned:
                self._warned.add(stage)
                self.warn(
                    f"[train] warning: pipeline stage {stage} peaked at {peak / GIB:.3f} GiB at "
                    f"step {step}, {peak / plan:.2f}x the planner's {plan / GIB:.3f} GiB "
                    f"({self.plan_note}; over {limit:.2f}x). Said once per stage; every step's "
                    "ratio is in metrics.jsonl (memory/ratio/stage<i>)"
                )

    # ------------------------------------------------------------------ the log line
    def scalars(self, specs: dict | None) -> tuple[dict[str, float], str]:
        """Memory, timers and throughput scalars of the logged step, and their console text;
        ``specs``: each budget's current architecture (``None``: the parent). Resets the
        throughput interval."""
        scalars: dict[str, float] = {}
        parts = []
        for stage, peak in sorted(self._stage_peaks.items()):
            scalars[f"memory/peak_gib/stage{stage}"] = peak / GIB
            text = f"stage{stage} {peak / GIB:.3f}"
            if self.planned is not None:
                plan = self.planned[stage]
                scalars[f"memory/planned_gib/stage{stage}"] = plan / GIB
                scalars[f"memory/ratio/stage{stage}"] = peak / plan
                text += f"/{plan / GIB:.3f} ({peak / plan:.2f}x)"
            parts.append(text)
        memory = f"mem GiB {' '.join(parts)}" if parts else ""
        for key, seconds in self._times.items():
            scalars[f"time/{key.replace(' ', '_')}_s"] = seconds
        times = " ".join(f"{k} {v * 1000:.0f}" for k, v in self._times.items() if k != "step")
        interval, self._interval = self._interval, {"seconds": 0.0, "tokens": 0.0, "steps": 0}
        draws, self._draws = self._draws, collections.Counter()
        seconds = max(interval["seconds"], 1e-9)
        scalars["throughput/tokens_per_s"] = rate = interval["tokens"] / seconds
        model, hardware = self.flops.step({(specs or {}).get(name): n for name, n in draws.items()})
        scalars["throughput/tflops_per_gpu"] = model / seconds / self.world / 1e12
        mfu = "MFU n/a"
        if self.peak_flops:
            scalars["throughput/mfu"] = model / seconds / self.world / self.peak_flops
            scalars["throughput/hfu"] = hardware / seconds / self.world / self.peak_flops
            mfu = f"MFU {scalars['throughput/mfu']:.1%}"
        text = (
            f"{rate:,.0f} tok/s {scalars['throughput/tflops_per_gpu']:.3g} TFLOP/s/GPU {mfu}"
            + (f" | {memory}" if memory else "")
            + (f" | ms {times} (step {self._times['step'] * 1000:.0f})" if self._times else "")
        )
        self._times = {}
        return scalars, text

    def log(self, record: StepRecord) -> None:
        """The step's line and scalars (losses, router, memory, timers, throughput)."""
        t, step, grad_norm = self.trainer, record.step, record.grad_norm
        r = t.recipe
        scalars = {"grad_norm": grad_norm, "lr": t.optimizer.param_groups[0]["lr"]}
        parts = []
        for name, s in record.losses.items():
            scalars[f"loss/{name}"] = s.loss
            scalars[f"ce/{name}"] = s.ce
            parts.append(f"{name} {s.loss:.4f}")
        specs = None
        if t.router is not None:
            router, text, specs = router_scalars(
                t.router, r.router, r.model, sorted(t.elastic.budgets), t.progress.router_step
            )
            scalars.update(router)
            parts.append(text)
        counts = self.draw_counts() if t.router is not None else None
        extra, text = self.scalars(specs)
        scalars.update(extra)
        if counts is not None:
            scalars.update(counts.scalars())
        t.metrics.log(
            step,
            scalars,
            f"[train] {r.stage} step {step}/{r.train.steps} loss {' '.join(parts)} "
            f"gnorm {grad_norm:.3f} lr {scalars['lr']:.2e} {text}",
            extra=None if counts is None else counts.record(),
        )

    def draw_counts(self) -> DrawCounts:
        """Micro-batches per budget and per (budget, architecture) since the last log, over all
        replicas: the budgets from the sampler (a function of the step), the architectures
        gathered from every data-parallel replica (one small gather per logged step; every
        rank logs the same steps). Resets the architecture counts (:meth:`scalars` the
        budgets')."""
        local, self._architectures = self._architectures, collections.Counter()
        dp = self.trainer.pgs.dp
        gathered = [local]
        if dist.is_initialized() and dp.size() > 1:
            gathered = [None] * dp.size()
            dist.all_gather_object(gathered, local, group=dp)
        architectures: dict[str, dict[str, int]] = {}
        for counter in gathered:
            for (budget, name), n in counter.items():
                per = architectures.setdefault(budget, {})
                per[name] = per.get(name, 0) + n
        budgets = {name: n for name, n in self._draws.items() if name is not None}
        return DrawCounts(budgets=budgets, architectures=architectures)
