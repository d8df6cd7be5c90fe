"""docs/testing.md maps every numerical invariant to its tests: each test it names exists, and
every test named ``*invariant*`` (what ``pytest -k invariant`` selects) is in the map."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "testing.md"
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)(?:\[[^\]`]*\])?`")


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def _table_refs(text: str) -> list[tuple[str, str]]:
    """``(file, test)`` of every test named in a table row of the document."""
    return [
        m.groups()
        for line in text.splitlines()
        if line.startswith("|")
        for m in TEST_REF.finditer(line)
    ]


def test_every_test_the_map_names_exists() -> None:
    refs = _table_refs(DOC.read_text())
    assert len(refs) >= 20, "docs/testing.md names too few tests; is its table format intact?"
    missing = [
        f"{file}::{name}"
        for file, name in refs
        if not (ROOT / file).is_file() or name not in _test_functions(ROOT / file)
    ]
    assert not missing, f"docs/testing.md names tests that do not exist: {missing}"


def test_every_test_k_selects_is_in_the_map() -> None:
    named = {f"{file}::{name}" for file, name in _table_refs(DOC.read_text())}
    invariant_tests = {
        f"{path.relative_to(ROOT).as_posix()}::{name}"
        for path in sorted((ROOT / "tests").rglob("test_*.py"))
        for name in _test_functions(path)
        if "invariant" in name
    }
    assert invariant_tests, "no test is named *invariant*"
    unmapped = sorted(invariant_tests - named)
    assert not unmapped, f"invariant tests missing from docs/testing.md: {unmapped}"


def test_the_checks_catch_a_wrong_name(tmp_path) -> None:
    """The parser finds table references (with or without a parameter id) and nothing else."""
    text = (
        "| test | tolerance | why |\n|---|---|---|\n"
        "| `tests/unit/test_testing_doc.py::test_every_test_the_map_names_exists` "
        "| exact | - |\n"
        "| `tests/unit/test_x.py::test_a[slice]`, `tests/unit/test_x.py::test_b` | 1e-6 | - |\n"
        "Prose naming `tests/unit/test_y.py::test_c` is not a table row.\n"
    )
    assert _table_refs(text) == [
        ("tests/unit/test_testing_doc.py", "test_every_test_the_map_names_exists"),
        ("tests/unit/test_x.py", "test_a"),
        ("tests/unit/test_x.py", "test_b"),
    ]
    here = _test_functions(Path(__file__))
    assert "test_the_checks_catch_a_wrong_name" in here and "_table_refs" not in here
