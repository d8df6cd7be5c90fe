"""tools/export_budget.py: the trained router's budgets exported as standalone megatron models
that compute what the elastic model computes; clear errors for unknown or untrained budgets."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_elastic.checkpoint import read_manifest

ROOT = Path(__file__).parents[2]
TOOL = ROOT / "tools" / "export_budget.py"


@pytest.fixture(scope="module")
def checkpoint(perturbed_checkpoint):
    return perturbed_checkpoint


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=600
    )


def test_invariant_all_budgets_export_and_match_the_elastic_model(
    checkpoint, pgs, tmp_path, check_exported_budgets
) -> None:
    path, model, router = checkpoint
    done = _run("--checkpoint", str(path), "--all", "--output", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    budgets = router.elastic_config.budgets
    for budget, (_, manifest) in check_exported_budgets(
        tmp_path, budgets, model, router, pgs
    ).items():
        assert manifest["metadata"]["budget"] == budget
        # the one line every format prints per budget (export/registry.py ExportOptions.exported)
        said = (
            rf"^exported budget {re.escape(budget)}: {manifest['metadata']['params']:,} params, "
            rf"pattern [-M*]+, hidden \d+ -> \S+$"
        )
        assert re.search(said, done.stdout, re.M), done.stdout


def test_unknown_and_untrained_budgets(checkpoint, tmp_path, run_cli) -> None:
    path, _, _ = checkpoint
    tool, ckpt = "tools/export_budget.py", ["--checkpoint", str(path), "--budget"]
    unknown, untrained, interpolated = run_cli(
        [
            (tool, [*ckpt, "7B", "--output", str(tmp_path / "a")]),
            (tool, [*ckpt, "0.6", "--output", str(tmp_path / "b")]),
            (tool, [*ckpt, "0.6", "--interpolate", "--output", str(tmp_path / "c")]),
        ]
    )
    done = unknown
    assert done["rc"] == 2 and "trained budgets: ['50%', '75%', 'full']" in done["stderr"]
    done = untrained
    assert done["rc"] == 2 and "--interpolate" in done["stderr"]
    assert not (tmp_path / "b").exists()
    done = interpolated
    assert done["rc"] == 0, done["stderr"][-3000:] + str(done["traceback"])
    assert "untrained" in done["stdout"]
    assert read_manifest(tmp_path / "c")["metadata"]["interpolated"] is True
