"""Per-micro-batch budget sampling: the stage's distribution, the same on every rank."""

from __future__ import annotations

import pytest

from megatron_elastic.training import BudgetSampler

BUDGETS = {"12B": 1.0, "9B": 0.75, "6B": 0.5}


def test_draws_follow_the_stage_probabilities() -> None:
    sampler = BudgetSampler({"12B": 0.5, "9B": 0.3, "6B": 0.2}, BUDGETS, seed=0)
    counts = {n: 0 for n in BUDGETS}
    for step in range(2500):
        for mb in range(4):
            counts[sampler.sample(step, mb)] += 1
    total = sum(counts.values())
    for name, p in {"12B": 0.5, "9B": 0.3, "6B": 0.2}.items():
        assert abs(counts[name] / total - p) < 0.02, counts


def test_same_draw_on_every_rank_and_seed_dependence() -> None:
    probs = {n: 1 / 3 for n in BUDGETS}
    a, b = BudgetSampler(probs, BUDGETS, seed=7), BudgetSampler(dict(probs), BUDGETS, seed=7)
    draws = [a.sample(s, m) for s in range(50) for m in range(3)]
    assert draws == [b.sample(s, m) for s in range(50) for m in range(3)]
    other = BudgetSampler(probs, BUDGETS, seed=8)
    assert draws != [other.sample(s, m) for s in range(50) for m in range(3)]
    assert len(set(draws)) == 3


@pytest.mark.parametrize(
    "probs,match",
    [
        ({"12B": 0.5, "9B": 0.3, "6B": 0.3}, "sum to 1.1"),
        ({"12B": 0.5, "9B": 0.5, "3B": 0.0}, r"unknown budgets \['3B'\]"),
        ({"12B": 1.2, "9B": -0.2}, ">= 0"),
        ({}, "empty"),
    ],
)
def test_bad_distributions_are_rejected(probs, match) -> None:
    with pytest.raises(ValueError, match=match):
        BudgetSampler(probs, BUDGETS, seed=0)
