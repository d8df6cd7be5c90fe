"""Every default of every ``tools/*.py`` option is stated once: an option that feeds a keyword
parameter of the library function (or config dataclass) the tool calls has exactly that
parameter's default, so a default changed in the library is the tool's default too, and a tool
that restates one (and so could drift from it) fails here. The few defaults that exist only on
the command line are listed below with their values."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest

from megatron_elastic import cli

TOOLS = Path(__file__).parents[2] / "tools"

LIBRARY: dict[str, tuple[str, dict[str, str]]] = {
    "estimate_importance.py": ("megatron_elastic.importance.run:rank_parent", {}),
    "evaluate.py": (
        "megatron_elastic.eval.run:evaluate_checkpoint,megatron_elastic.eval.run:EvalInputsConfig",
        {},
    ),
    "export_budget.py": ("megatron_elastic.export.run:export_budgets", {}),
    "generate.py": ("megatron_elastic.serving.run:generate_from_checkpoint", {}),
    "inspect_budgets.py": ("megatron_elastic.elastic.budget:subnet_memory", {}),
    "make_lm_eval_tasks.py": ("megatron_elastic.eval.lm_eval_tasks:write_lm_eval_tasks", {}),
    "make_tiny_corpus.py": (
        "megatron_elastic.data.reasoning:generate_records",
        {"problem_size": "size"},
    ),
    "plan_memory.py": ("megatron_elastic.planning:plan_config_from_recipe", {}),
    "preflight.py": ("megatron_elastic.preflight:PreflightConfig", {}),
    "prepare_data.py": ("megatron_elastic.data.prepare:prepare_dataset", {}),
    "profile_latency.py": ("megatron_elastic.serving.profile:profile_latency", {}),
    "sweep_budgets.py": (
        "megatron_elastic.eval.sweep:sweep_budgets,megatron_elastic.eval.sweep:SpeedConfig,"
        "megatron_elastic.eval.run:EvalInputsConfig",
        {},
    ),
    "serve.py": ("megatron_elastic.serving.api:serve", {}),
    "convert_hf_to_megatron.py": ("megatron_elastic.export.megatron_lm:save_megatron_lm", {}),
}
"""Tool -> the library callables (comma-separated: a function and the config dataclasses it takes)
whose keyword defaults its options take (``{option: parameter}`` where the names differ)."""

NO_LIBRARY = ("convert_megatron_lm.py", "convert_megatron_to_hf.py", "inspect_model.py")
NO_LIBRARY += ("quickstart.py",)
"""Tools whose options feed no library keyword default (only flags, paths and required values)."""

CLI_ONLY: dict[tuple[str, str], object] = {
    ("convert_hf_to_megatron.py", "format"): "megatron",
    ("inspect_budgets.py", "seq_length"): 8192,
    ("plan_memory.py", "world_size"): 128,
    ("make_tiny_corpus.py", "seed"): 0,
    ("quickstart.py", "output"): "runs/quickstart",
}
"""Defaults that exist only on the command line (the library parameter has none)."""


class _Parser(Exception):
    """Carries the tool's parser out of ``main`` at ``parse_args`` (nothing runs)."""


def _parser(tool: str, monkeypatch) -> argparse.ArgumentParser:
    def capture(self, args=None, namespace=None):
        raise _Parser(self)

    monkeypatch.setattr(cli.ArgumentParser, "parse_args", capture)
    spec = importlib.util.spec_from_file_location(f"tool_{Path(tool).stem}", TOOLS / tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(_Parser) as caught:
        module.main([])
    return caught.value.args[0]


def _library_defaults(tool: str) -> dict[str, object]:
    """``{option dest: default}`` of the tool's library callable."""
    if tool not in LIBRARY:
        return {}
    targets, renamed = LIBRARY[tool]
    dest = {parameter: option for option, parameter in renamed.items()}
    defaults = {}
    for target in targets.split(","):
        module, name = target.split(":")
        parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
        for p in parameters.values():
            if p.default is not p.empty:
                assert dest.get(p.name, p.name) not in defaults, (tool, p.name)  # stated once
                defaults[dest.get(p.name, p.name)] = p.default
    return defaults


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value  # nargs options give lists


def test_every_tool_default_is_the_librarys_or_listed(monkeypatch) -> None:
    tools = sorted(p.name for p in TOOLS.glob("*.py"))
    assert tools == sorted([*LIBRARY, *NO_LIBRARY]), "classify every tool in LIBRARY/NO_LIBRARY"
    followed = {}
    for tool in tools:
        library = _library_defaults(tool)
        for action in _parser(tool, monkeypatch)._actions:
            default = action.default
            if action.dest in library:
                expected = _plain(library[action.dest])
                assert default == expected, (
                    f"{tool} --{action.dest}: default {default!r}, the library's {expected!r}"
                )
                followed[tool] = followed.get(tool, 0) + 1
            elif default not in (None, False, argparse.SUPPRESS):
                assert CLI_ONLY.get((tool, action.dest), ...) == default, (
                    f"{tool} --{action.dest}: default {default!r} is neither a library default "
                    "nor listed in CLI_ONLY"
                )
    # each mapped tool has at least one option following its library (the map is not stale)
    assert set(followed) == set(LIBRARY), set(LIBRARY) - set(followed)
