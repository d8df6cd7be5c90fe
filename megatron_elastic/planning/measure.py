"""Measured peak memory on CPU: the CPU allocator's live bytes at torch.profiler events.

One helper for ``benchmarks/bench_memory_worker.py`` (training steps, checked against the plan of
:mod:`megatron_elastic.planning.memory`), the trainer's per-step memory log
(:class:`CpuPeakWindow`, ``training/step_log.py``) and the tests that measure how memory grows
with the sequence length.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["CpuPeakWindow", "cpu_peak", "measure_cpu_peak", "track_all_threads"]


def track_all_threads(enabled: bool = True) -> bool:
    """Make torch's CPU allocator count the frees (and allocations) of every thread (``False``:
    back to torch's default, where only profiled threads are counted); returns the previous
    setting, for a caller to restore.

    The profiler records an allocator event only on threads that carry its thread-local state;
    gloo runs collectives on its own worker threads, which do not. A gloo ``Work`` holds the
    tensors of its collective (its inputs, outputs and gloo's copies, e.g. the clone of the input
    in ``_reduce_scatter_base``) and is often destroyed on the worker thread, so the last
    reference, and the free, of such a tensor falls there: the profiler's event stream then has
    the allocation but never the free, and a replay of its byte deltas drifts upward by
    whichever tensors lost that race (timing-dependent: 7-54 MiB per rank in 3 steps of the
    two-rank configurations; none at one rank). With ``FLAGS_caffe2_report_cpu_memory_usage``
    set, ``ProfiledCPUMemoryReporter`` keeps its size table and live-bytes counter on every
    thread, and every recorded event carries that counter as ``total_allocated``. (The flag's
    log lines are at INFO, below c10's default level.) On CUDA the caching allocator's
    statistics are process-wide already."""
    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))
    flag = ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage")
    previous, flag.value = bool(flag.value), enabled
    return previous


def _cpu_allocations(prof) -> list[tuple[int, int, int]]:
    """``(time ns, bytes (negative: a free), allocator live bytes after it)`` of every CPU
    allocation event of the profile, in time order."""
    from torch._C._profiler import _EventType

    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            f = e.extra_fields
            allocations.append((e.start_time_ns, f.alloc_size, f.total_allocated))
    allocations.sort()
    return allocations


def cpu_peak(prof, window: str) -> dict:
    """Peak of the CPU allocator's live bytes (all threads, since the profile began) inside
    ``window`` (a ``record_function`` name), the live bytes when it began (``start_bytes``), the
    ops running at the peak (outermost first), and the byte-delta replay for comparison."""
    allocations = _cpu_allocations(prof)
    events = prof.profiler.kineto_results.events()
    span = next(e for e in events if e.name() == window)
    start, end = span.start_ns(), span.start_ns() + span.duration_ns()
    peak = replay_peak = live = 0
    start_bytes = None
    when = start
    for ts, delta, total in allocations:
        live += delta
        if ts < start:
            start_bytes = total
        elif ts <= end:
            if start_bytes is None:  # no event before the window: the counter before its first
                start_bytes = total - delta  # (not 0: a trainer may have left counting on)
            if total > peak:
                peak, when = total, ts
            replay_peak = max(replay_peak, live)
    ops = sorted(
        (e.start_ns(), e.name())
        for e in events
        if e.name() not in ("[memory]", window)
        and e.start_ns() <= when <= e.start_ns() + e.duration_ns()
    )
    return {
        "peak_bytes": peak,
        "start_bytes": start_bytes or 0,
        "peak_ops": [name for _, name in ops],
        "replay_peak_bytes": replay_peak,
        # the counter less the replay (from the counter's value before the first event)
        "untracked_free_bytes": (
            allocations[0][2] - allocations[0][1] + live - allocations[-1][2] if allocations else 0
        ),
    }


@contextlib.contextmanager
def measure_cpu_peak(window: str = "measured") -> Iterator[dict]:
    """``with measure_cpu_peak() as m: ...``; afterwards ``m`` holds :func:`cpu_peak` of the block
    and ``m["growth_bytes"]``, its peak above the live bytes when it began."""
    from torch.profiler import ProfilerActivity, profile, record_function

    result: dict = {}
    previous = track_all_threads()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with record_function(window):
                yield result
    finally:
        track_all_threads(previous)  # a live CpuPeakWindow keeps counting every thread
    result.update(cpu_peak(prof, window))
    _release(prof)
    result["growth_bytes"] = result["peak_bytes"] - result["start_bytes"]


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block (C++ log lines; Python's own stderr is
    flushed first and unaffected otherwise)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class CpuPeakWindow:
    """The CPU allocator's peak live bytes over ``start()`` .. ``stop()`` windows, counted on all
    threads from construction on (:func:`track_all_threads` stays on), less what was live then
    (``baseline_bytes``: 0 in a fresh process). Construct it before what it should count (the
    trainer: before its model). Unreachable objects are collected before the baseline is read:
    a cycle collected later (holding, say, an earlier model's tensors) would lower the counter
    below the baseline and hide the peak. A window runs ``torch.profiler`` with memory events
    only (no op events: measured on 300 matmul+tanh layers and their backward, 1.55 s against 1.67 s
    unprofiled, where recording the ops too took 2.7 s)."""

    def __init__(self) -> None:
        self._prof = None
        self.baseline_bytes = 0
        with _native_stderr_silenced():
            # c10 logs "Memory block of unknown size was allocated before the profiling
            # started" for the first (and every 1000th) free of a tensor it did not count:
            # spend that first one here. And kineto's first start on a CUDA build without a GPU
            # logs "gpuGetDeviceCount failed". Neither would mean anything to the user.
            gc.collect()
            uncounted = torch.empty(1)
            track_all_threads()
            del uncounted
            self.start()
            torch.empty(1)  # one allocation event: the counter's value now
            self.baseline_bytes = self.stop() if self.running else 0

    @property
    def running(self) -> bool:
        return self._prof is not None

    def start(self) -> None:
        """Open a window; none (``running`` stays False) under another profiler, which kineto
        cannot nest (e.g. ``benchmarks/bench_memory_worker.py`` profiles the trainer itself)."""
        from torch.profiler import profile

        assert self._prof is None, "window already open"
        if torch.autograd._profiler_enabled():
            return
        self._prof = profile(activities=[], profile_memory=True)
        self._prof.__enter__()

    def close(self) -> None:
        """Close the window, if open, without reading it (a step that raised): kineto allows one
        profiler per process, so a window left open would stop every later one."""
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.__exit__(None, None, None)
            _release(prof)

    def stop(self) -> int:
        """Peak live bytes of the window less the baseline (when nothing was allocated in it:
        0)."""
        assert self._prof is not None, "no window open"
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        allocations = _cpu_allocations(prof)
        _release(prof)
        return max((total for _, _, total in allocations), default=0) - self.baseline_bytes


def _release(prof) -> None:
    """Drop a finished profile's events now. torch's profile object sits in a reference cycle, so
    without this its events (~150 MB a tiny-recipe training step) live until Python's full
    collection, which a training loop rarely triggers: a trainer logging every step grew by that
    much per step (10 GB by step 90 of a study stage)."""
    prof.profiler = None
