"""Router inputs and sampling: budget encoding, annealing schedules, Gumbel-softmax.

Everything here is a pure function of its arguments (the step and the random generator are passed
in), so every rank computes the same decision without any shared state.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from megatron_elastic.router.config import RouterConfig

__all__ = [
    "BudgetEncoding",
    "gumbel_softmax",
    "logit_scale",
    "prefix_weights",
    "straight_through",
    "temperature",
]


@dataclass(frozen=True)
class BudgetEncoding:
    """The routers' input: a one-hot over the trained budgets, sorted by fraction."""

    names: tuple[str, ...]
    """Trained budget names, ascending by fraction."""
    fractions: tuple[float, ...]
    """Their fractions of the parent, ascending and distinct."""

    @classmethod
    def from_budgets(cls, budgets: Mapping[str, float]) -> BudgetEncoding:
        order = sorted(budgets.items(), key=lambda kv: kv[1])
        for (a, fa), (b, fb) in itertools.pairwise(order):
            if math.isclose(fa, fb):
                raise ValueError(
                    f"budgets {a!r} and {b!r} share the fraction {fa}; give every budget its own "
                    "fraction so that fractions between them can be interpolated"
                )
        return cls(tuple(n for n, _ in order), tuple(float(f) for _, f in order))

    def __len__(self) -> int:
        return len(self.names)

    def _trained(self) -> str:
        return ", ".join(f"{n!r}={f:g}" for n, f in zip(self.names, self.fractions, strict=True))

    def fraction(self, budget: str | float) -> float:
        """The target fraction of a budget name, or of a fraction given directly."""
        if isinstance(budget, str):
            if budget not in self.names:
                raise ValueError(f"unknown budget {budget!r}; trained budgets: {self._trained()}")
            return self.fractions[self.names.index(budget)]
        lo, hi = self.fractions[0], self.fractions[-1]
        if not (lo <= budget <= hi or any(math.isclose(budget, f) for f in (lo, hi))):
            raise ValueError(
                f"budget fraction {budget} is outside the trained range [{lo:g}, {hi:g}]; "
                f"routers can only interpolate between trained budgets: {self._trained()}"
            )
        return float(budget)

    def encode(self, budget: str | float, device: torch.device | str | None = None) -> torch.Tensor:
        """(num_budgets,) float32: one-hot of a trained budget; a fraction strictly between two
        trained ones mixes their one-hots linearly."""
        code = torch.zeros(len(self), device=device)
        frac = self.fraction(budget)
        for i, f in enumerate(self.fractions):
            if math.isclose(frac, f):
                code[i] = 1.0
                return code
        hi = next(i for i, f in enumerate(self.fractions) if f > frac)
        t = (frac - self.fractions[hi - 1]) / (self.fractions[hi] - self.fractions[hi - 1])
        code[hi - 1], code[hi] = 1.0 - t, t
        return code


def temperature(config: RouterConfig, step: int) -> float:
    """Gumbel-softmax temperature at ``step``: linear from start to end over ``anneal_steps``.

    Linear (not geometric): gradients through the relaxed sample fade once the temperature is small
    against the noise gaps, so a linear schedule leaves most of the run for learning and sharpens
    at the end (a geometric one is below 0.3 after 40% of the run, and converged less reliably).
    """
    t = min(max(step, 0), config.anneal_steps) / config.anneal_steps
    return config.temperature_start + t * (config.temperature_end - config.temperature_start)


def logit_scale(config: RouterConfig, step: int) -> float:
    """Factor on the logits at ``step``: linear from start to end over ``anneal_steps``."""
    t = min(max(step, 0), config.anneal_steps) / config.anneal_steps
    return config.logit_scale_start + t * (config.logit_scale_end - config.logit_scale_start)


def gumbel_softmax(
    logits: torch.Tensor,
    *,
    tau: float,
    scale: float,
    generator: torch.Generator,
    hard: bool,
) -> torch.Tensor:
    """Sample over the last dim of ``logits`` (..., K) with noise from ``generator`` only.

    Soft: softmax((scale * logits + g) / tau) with Gumbel noise g. ``hard``: its
    :func:`straight_through` one-hot.
    """
    # Noise is drawn on the generator's device, so a CPU generator serves a GPU router alike.
    u = torch.rand(logits.shape, generator=generator, device=generator.device)
    u = u.clamp_(min=torch.finfo(u.dtype).tiny).to(device=logits.device, dtype=logits.dtype)
    gumbel = -torch.log(-torch.log(u))
    soft = torch.softmax((scale * logits + gumbel) / tau, dim=-1)
    return straight_through(soft) if hard else soft


def straight_through(soft: torch.Tensor) -> torch.Tensor:
    """One-hot of argmax(soft), exactly 1.0 on the choice, with the gradient of ``soft``."""
    one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    # (soft - soft.detach()) is exactly 0, so the chosen entry stays exactly 1.0.
    return one_hot + (soft - soft.detach())


def prefix_weights(probs: torch.Tensor, sizes: torch.Tensor, active: int) -> torch.Tensor:
    """Weight of each of the first ``active`` nested units: unit i is kept by every candidate
    larger than i, so w_i = sum_{k: sizes_k > i} probs_k. probs (..., K) -> (..., active)."""
    units = torch.arange(active, device=probs.device)
    keeps = (sizes.to(probs.device)[None, :] > units[:, None]).to(probs.dtype)  # (active, K)
    return probs @ keeps.T
