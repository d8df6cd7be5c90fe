"""What the user sees: the one place that silences expected third-party output.

Each entry below is a message a dependency prints on every run that says nothing actionable to
our users; each is matched by its text and its category (warnings) or logger (log records),
never by a blanket filter. ``MEGATRON_ELASTIC_VERBOSE=1`` (every tool's ``--verbose`` sets it,
and child processes inherit it) turns all of it back on. :mod:`.cli` applies it when a tool
starts; :func:`.platform.apply` for library use.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator

__all__ = [
    "VERBOSE_ENV",
    "drop_native_output",
    "expected_warnings",
    "quiet",
    "set_verbose",
    "verbose",
]

VERBOSE_ENV = "MEGATRON_ELASTIC_VERBOSE"

# (message regex, category, only where CUDA is absent): Python warnings.
_EXPECTED_WARNINGS = (
    # megatron-core at import, without Transformer Engine / Apex (expected on CPU)
    ("Transformer Engine and Apex are not installed", UserWarning, True),
    ("Apex is not installed", UserWarning, True),
    # megatron-core notes on features we do not use
    ("MimoModelConfig is experimental", UserWarning, False),
    ("full scope is deprecated", UserWarning, False),
    # torch.distributed.checkpoint as called by megatron's dist_checkpointing in one process
    ("torch.distributed is disabled, unavailable or uninitialized", UserWarning, False),
    ("The argument order of load has been changed", UserWarning, False),
    # ... and for the ShardedTensors megatron-core writes MoE experts' weights as
    ("Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning, False),
)

# (logger, message regex, only where CUDA is absent): log records.
_EXPECTED_LOG_RECORDS = (
    # torch at import when nvcc exists but no CUDA runtime does
    ("torch.utils.cpp_extension", "No CUDA runtime is found", True),
    # megatron's torch_dist save strategy, once per process
    (
        "megatron.core.dist_checkpointing.strategies.torch",
        "MCore's async save is deprecated",
        False,
    ),
    # transformers' NemotronH without mamba-ssm / causal-conv1d kernels (the CPU path)
    ("transformers.integrations.hub_kernels", r"`\w+` is falling back to its reference", True),
)

# Native (C++) lines on stdout: gloo's report of each new process group, when it is healthy
# (connected == expected); any other gloo line is kept.
_GLOO_CONNECTED = re.compile(
    rb"\[Gloo\] Rank \d+ is connected to (\d+) peer ranks\. "
    rb"Expected number of connected peer ranks is : \1\r?\n?$"
)


def verbose() -> bool:
    """Whether the user asked for everything (``--verbose`` or ``MEGATRON_ELASTIC_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """Record the user's choice for this process (before :func:`quiet`) and its children."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def _cuda_absent() -> bool:
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def expected_warnings() -> list[tuple[str, type[Warning]]]:
    """The (message regex, category) of the expected third-party warnings on this machine (the
    CPU-only ones only where CUDA is absent); the test suite filters exactly these."""
    cpu = _cuda_absent()
    return [(m, c) for m, c, cpu_only in _EXPECTED_WARNINGS if cpu or not cpu_only]


def quiet() -> None:
    """Install the filters above (idempotent; a no-op when verbose). Call it before the
    third-party imports whose import-time output it silences."""
    if verbose():
        return
    cpu = _cuda_absent()
    for message, category in expected_warnings():
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, message, cpu_only in _EXPECTED_LOG_RECORDS:
        logger = logging.getLogger(name)
        if (cpu or not cpu_only) and not any(
            isinstance(f, _DropMessages) and f.pattern.pattern == message for f in logger.filters
        ):
            logger.addFilter(_DropMessages(message))
    # transformers' "Loading weights" bars (read by huggingface_hub at import)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@contextlib.contextmanager
def drop_native_output() -> Iterator[None]:
    """Run the body with this process's stdout (file descriptor 1, where native libraries print)
    captured, then replay it without gloo's healthy-connection lines. A no-op when verbose."""
    if verbose():
        yield
        return
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            libc.fflush(None)  # C stdio buffers (std::cout writes through them)
            os.dup2(saved, 1)
            os.close(saved)
            capture.seek(0)
            kept = b"".join(line for line in capture if not _GLOO_CONNECTED.match(line))
            view = memoryview(kept)
            while view:
                view = view[os.write(1, view) :]
