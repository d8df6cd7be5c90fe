"""Which budget each micro-batch trains: sampled with the stage's probabilities, the same on every
rank of a model replica (no communication: the draw depends only on seed, step and micro-batch)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["validate_budget_probs", "BudgetSampler"]


def validate_budget_probs(probs: Mapping[str, float], budgets: Mapping[str, float]) -> None:
    """Raise ``ValueError`` unless ``probs`` is a distribution over trained budget names."""
    if not probs:
        raise ValueError("budget sampling probabilities are empty; give one per budget")
    unknown = sorted(set(probs) - set(budgets))
    if unknown:
        raise ValueError(
            f"budget sampling names unknown budgets {unknown}; trained budgets are "
            f"{sorted(budgets)}"
        )
    bad = {k: v for k, v in probs.items() if not isinstance(v, int | float) or v < 0}
    if bad:
        raise ValueError(f"budget sampling probabilities must be >= 0, got {bad}")
    total = float(sum(probs.values()))
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValueError(
            f"budget sampling probabilities {dict(probs)} sum to {total:.6g}, not 1; e.g. the "
            "paper's stage 1 is uniform (1/3 each) and stage 2 is 0.5/0.3/0.2 (largest first)"
        )


class BudgetSampler:
    """Deterministic per-micro-batch budget draws: ``sample(step, micro_batch)`` is a pure
    function of ``(seed, step, micro_batch)``, so every TP/PP rank of a replica (same seed) draws
    the same budget; give data-parallel replicas different seeds to vary their budgets."""

    def __init__(self, probs: Mapping[str, float], budgets: Mapping[str, float], seed: int) -> None:
        validate_budget_probs(probs, budgets)
        self.names = sorted(probs, key=lambda n: -budgets[n])  # largest budget first
        self.probs = torch.tensor([float(probs[n]) for n in self.names], dtype=torch.float64)
        self.seed = seed

    def sample(self, step: int, micro_batch: int) -> str:
        # An explicit 64-bit mix (not Python's hash) so the seed is the same in every process.
        mixed = self.seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + micro_batch
        g = torch.Generator().manual_seed(mixed % 2**63)
        return self.names[int(torch.multinomial(self.probs, 1, generator=g))]
