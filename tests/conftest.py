"""Test-suite wiring: the expected third-party warnings filtered by name (the console module's
list, which every tool filters too), and GPU tests skip themselves where there is no CUDA
device."""

from __future__ import annotations

from megatron_elastic import console

# Now, for the imports below and in tests/unit/conftest.py (pytest loads both conftests inside
# one warnings context) ...
console.quiet()

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # ... and as pytest filters, which it applies anew around collection and every test.
    for message, category in console.expected_warnings():
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")


@pytest.hookimpl(tryfirst=True)  # (before xdist reads the groups)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _group_by_file(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _group_by_file(items: list[pytest.Item]) -> None:
    """For ``make test``'s workers (pytest-xdist, ``--dist loadgroup``): a file's tests run on one
    worker, so its module fixtures are built once, and every file whose tests use the session's
    SLURM cluster (tests/e2e/conftest.py) runs on the same worker, which starts one cluster."""
    slurm = {item.path for item in items if "cluster" in getattr(item, "fixturenames", ())}
    for item in items:
        group = "slurm-cluster" if item.path in slurm else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))
