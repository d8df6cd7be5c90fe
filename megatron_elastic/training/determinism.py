"""``train.deterministic`` on this machine: the one place the run's determinism is set."""

from __future__ import annotations

import os

import torch

from megatron_elastic import platform

__all__ = ["DETERMINISTIC_ENV", "set_deterministic"]

DETERMINISTIC_ENV = {
    # cuBLAS is deterministic only with a fixed workspace; without it, torch's deterministic
    # mode warns (warn_only) at every cuBLAS call and the matmuls stay non-deterministic. Read
    # when cuBLAS creates its handle: set before the first matmul on the GPU.
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    # megatron's deterministic_mode refuses Transformer Engine's attention unless TE may pick
    # only deterministic kernels.
    "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0",
}


def set_deterministic(enabled: bool) -> bool:
    """Deterministic algorithms on a GPU when ``enabled`` (the environment above unless the
    site set it; models built afterwards get megatron's ``deterministic_mode``, see
    :func:`~megatron_elastic.model.builder.transformer_config`). Returns whether it is on.

    On CPU nothing is changed: the kernels we use are deterministic already (the resume test
    checks it bit for bit); the flag would only swap index_add for a slower sort-based kernel."""
    if not enabled or not platform.cuda_available():
        return False
    for name, value in DETERMINISTIC_ENV.items():
        os.environ.setdefault(name, value)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return True
