"""Test-suite wiring: the expected third-party warnings filtered by name (the console module's
list, which every tool filters too), and GPU tests skip themselves where there is no CUDA
device."""

from __future__ import annotations

from megatron_elastic import console

# Now, for the imports below and in tests/unit/conftest.py (pytest loads both conftests inside
# one warnings context) ...
console.quiet()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # ... and as pytest filters, which it applies anew around collection and every test.
    for message, category in console.expected_warnings():
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(optionalhook=True)  # (a pytest-xdist hook)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``make test``'s workers (pytest-xdist): a file's tests run on one worker, so its module
    fixtures are built once, and the files named ``*slurm*`` (they share the session's SLURM
    cluster, tests/e2e/conftest.py) run on one worker, which starts one cluster. (A scheduler,
    not ``xdist_group`` marks: xdist 3.8 renames node ids in a way pytest 9 ignores.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "slurm" if "slurm" in Path(path).name else path

    return FileScheduling(config, log)
