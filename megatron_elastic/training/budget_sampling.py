"""Which budget each micro-batch trains: drawn with the stage's probabilities, the same on every
rank of a model replica (no communication: the draw depends only on seed, step and micro-batch).

Three modes (``train.budget_sampling_mode``):

* ``independent`` (the paper's): every micro-batch draws its budget on its own. With few
  micro-batches per step the step's mix is noisy (3 micro-batches at 1/3 each: 22% of steps hold
  no micro-batch of a given budget).
* ``stratified``: a step of ``n`` micro-batches (over all data-parallel replicas) holds
  ``floor(p * n)`` of each budget; the ``r`` left over go one each to ``r`` distinct budgets,
  budget ``k`` with probability equal to its fractional part ``p_k * n - floor(p_k * n)``
  (systematic sampling over those parts), so every count is within one micro-batch of ``p * n``
  and its expectation is exactly ``p * n``, as in ``independent``. The order within the step is
  shuffled.
* ``sandwich`` (BigNAS / once-for-all's rule, not the paper's): every step trains the largest and
  the smallest budget of the stage (those with probability > 0), and its other ``n - 2``
  micro-batches are allocated as in ``stratified`` with the stage's probabilities; shuffled.
  Needs ``n >= 2``.

Every mode is a pure function of ``(seed, step, micro_batch)``: a resumed run draws the same
sequence as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["SAMPLING_MODES", "BudgetSampler", "validate_budget_probs", "validate_sampling_mode"]

SAMPLING_MODES = ("independent", "stratified", "sandwich")
"""Values of ``train.budget_sampling_mode``; ``independent`` is the paper's."""


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


def validate_sampling_mode(mode: str, per_step: int | None) -> None:
    """Raise ``ValueError`` unless ``mode`` is known and, for ``sandwich``, a step has at least
    two micro-batches (``per_step``: micro-batches per step over all replicas; None: unknown)."""
    if mode not in SAMPLING_MODES:
        raise ValueError(
            f"train.budget_sampling_mode={mode!r}; choose one of {SAMPLING_MODES} "
            "(independent is the paper's)"
        )
    if mode == "sandwich" and per_step is not None and per_step < 2:
        raise ValueError(
            f"train.budget_sampling_mode=sandwich trains the largest and the smallest budget in "
            f"every step, but a step has {per_step} micro-batch; raise train.global_batch_size "
            "to at least 2 x train.micro_batch_size"
        )


def _generator(seed: int, step: int, micro_batch: int) -> torch.Generator:
    # An explicit 64-bit mix (not Python's hash) so the seed is the same in every process.
    mixed = seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + micro_batch
    return torch.Generator().manual_seed(mixed % 2**63)


class BudgetSampler:
    """Deterministic per-micro-batch budget draws: ``sample(step, micro_batch)`` is a pure
    function of ``(seed, step, micro_batch)``, so every TP/PP rank of a replica (same seed) draws
    the same budget; data-parallel replicas pass distinct ``micro_batch`` indices (replica ``d``'s
    ``i``-th micro-batch is ``d * per_replica + i``). ``stratified`` and ``sandwich`` allocate
    the ``per_step`` micro-batches of a step together (see the module docstring)."""

    def __init__(
        self,
        probs: Mapping[str, float],
        budgets: Mapping[str, float],
        seed: int,
        *,
        mode: str = "independent",
        per_step: int | None = None,
    ) -> None:
        validate_budget_probs(probs, budgets)
        validate_sampling_mode(mode, per_step)
        if mode != "independent" and per_step is None:
            raise ValueError(f"budget sampling mode {mode!r} needs per_step (micro-batches/step)")
        self.names = sorted(probs, key=lambda n: -budgets[n])  # largest budget first
        self.probs = torch.tensor([float(probs[n]) for n in self.names], dtype=torch.float64)
        self.seed, self.mode, self.per_step = seed, mode, per_step
        trained = [n for n in self.names if probs[n] > 0]
        self.extremes = (trained[0], trained[-1])
        self._cached: tuple[int, list[str]] | None = None

    def sample(self, step: int, micro_batch: int) -> str:
        """The budget of micro-batch ``micro_batch`` (0-based over all replicas) of ``step``."""
        if self.mode == "independent":
            g = _generator(self.seed, step, micro_batch)
            return self.names[int(torch.multinomial(self.probs, 1, generator=g))]
        if not 0 <= micro_batch < self.per_step:
            raise ValueError(f"micro_batch {micro_batch} is outside the step's {self.per_step}")
        return self.step_budgets(step)[micro_batch]

    def step_budgets(self, step: int) -> list[str]:
        """Every micro-batch's budget of ``step``, in order (``per_step`` of them; in
        ``independent`` mode ``per_step`` must be known)."""
        if self.mode == "independent":
            return [self.sample(step, i) for i in range(self.per_step)]
        if self._cached is not None and self._cached[0] == step:
            return list(self._cached[1])
        g = _generator(self.seed, step, self.per_step)  # (index per_step: no independent draw's)
        if self.mode == "sandwich":
            top, bottom = self.extremes
            drawn = [top, bottom, *self._allocate(self.per_step - 2, g)]
        else:
            drawn = self._allocate(self.per_step, g)
        order = torch.randperm(len(drawn), generator=g).tolist()
        drawn = [drawn[i] for i in order]
        self._cached = (step, drawn)
        return list(drawn)

    def _allocate(self, n: int, g: torch.Generator) -> list[str]:
        """``n`` budgets: floor(p * n) each, the remainder by systematic sampling over the
        fractional parts (each budget at most one more; inclusion probability = its part)."""
        if n == 0:
            return []
        expected = self.probs * n
        counts = torch.floor(expected + 1e-9)  # (1/3 * 3 is 0.999...: floor it to 1)
        parts = (expected - counts).clamp(min=0.0)
        remainder = n - int(counts.sum())
        if remainder > 0:
            edges = torch.cumsum(parts, 0) * (remainder / float(parts.sum()))  # sum = remainder
            start = float(torch.rand((), generator=g, dtype=torch.float64))
            points = torch.arange(remainder, dtype=torch.float64) + start
            picked = torch.searchsorted(edges, points, right=True).clamp(max=len(self.names) - 1)
            counts += torch.bincount(picked, minlength=len(self.names)).to(counts.dtype)
        return [
            name for name, c in zip(self.names, counts.tolist(), strict=True) for _ in range(int(c))
        ]
