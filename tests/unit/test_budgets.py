"""The one parser of budgets named on a command line (``megatron_elastic.budgets``), used by
export_budget.py, evaluate.py and generate.py: every accepted form and every refusal, each a
one-line ``ValueError`` listing the trained budgets."""

from __future__ import annotations

import pytest

from megatron_elastic.budgets import parse_budgets

TRAINED = ["full", "75%", "50%"]  # recipe order, as a router lists them
LISTED = "trained budgets: ['50%', '75%', 'full']"


@pytest.mark.parametrize(
    "texts,kwargs,expected",
    [
        ("all", {}, ["full", "75%", "50%"]),  # every trained budget, recipe order
        ("50%", {}, ["50%"]),
        ("50%, full", {}, ["50%", "full"]),  # comma list, spaces ignored, order kept
        (["full", "50%,full", "all"], {}, ["full", "50%", "75%"]),  # repeated flags, each once
        ("0.6", {}, [0.6]),  # a fraction between trained budgets (router interpolation)
        ("full,0.6", {"interpolate": True}, ["full", 0.6]),
        ("75%", {"allow_fractions": False, "interpolate": False}, ["75%"]),
        ("full", {"single": True}, ["full"]),
        ("0.6", {"single": True, "interpolate": True}, [0.6]),
        (["50%"], {"single": True}, ["50%"]),
    ],
)
def test_accepted_forms(texts, kwargs, expected) -> None:
    got = parse_budgets(texts, TRAINED, **kwargs)
    assert got == expected
    assert [type(b) for b in got] == [type(b) for b in expected]


@pytest.mark.parametrize(
    "texts,kwargs,message",
    [
        ("7B", {}, f"unknown budget '7B'; {LISTED}"),
        ("full,7B", {}, f"unknown budget '7B'; {LISTED}"),
        ("0.6", {"allow_fractions": False}, f"unknown budget '0.6'; {LISTED}"),
        (
            "0.6",
            {"interpolate": False},
            "0.6 is not a trained budget (['50%', '75%', 'full']); pass --interpolate to run it "
            "through router interpolation (untrained)",
        ),
        ("0.6", {"interpolate": False, "verb": "export"}, "pass --interpolate to export it"),
        ("", {}, "no budget given; trained budgets: ['50%', '75%', 'full'] (or 'all')"),
        ([" , "], {}, "no budget given"),
        ("all", {"single": True}, f"unknown budget 'all'; {LISTED}"),
        ("50%,full", {"single": True}, f"unknown budget '50%,full'; {LISTED}"),
        (["50%", "full"], {"single": True}, "give one budget, not ['50%', 'full']"),
    ],
)
def test_refusals_are_one_line(texts, kwargs, message) -> None:
    with pytest.raises(ValueError) as info:
        parse_budgets(texts, TRAINED, **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
