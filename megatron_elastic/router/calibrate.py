"""Meeting the budget at inference: the router's most probable architecture within tolerance.

The budget loss trains the cost of the *relaxed* samples towards the target. Once the temperature
is low the samples are one-hot and their gradients vanish, so the logits freeze wherever they are
then: the argmax architecture usually lands within a few percent of the target, but nothing bounds
how far. :func:`meet_target` closes that gap deterministically: when the argmax misses by more
than the tolerance, it returns the most probable architecture that does not.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping

import torch

__all__ = ["Indices", "meet_target"]

Indices = dict[str, tuple[int, ...]]
"""Per axis: the candidate index of each of its decisions."""


EXHAUSTIVE_LIMIT = 4096
"""Architectures up to which :func:`meet_target` scores every one (homogeneous routers: one
decision per axis); above it, the greedy search."""


def meet_target(
    log_probs: Mapping[str, torch.Tensor],
    start: Indices,
    cost: Callable[[Indices], float],
    target: float,
    tolerance: float,
) -> Indices:
    """``start`` (the argmax) if ``|cost / target - 1| <= tolerance``, else the most probable
    architecture within the tolerance.

    ``log_probs``: per axis, (decisions, candidates) log-probabilities (candidates ascending by
    size). With at most :data:`EXHAUSTIVE_LIMIT` architectures every one is scored: the most
    probable within the tolerance wins, or, if none is, the one closest to the target. Above
    it (heterogeneous routers, whose per-layer choices are fine-grained) a greedy descent from
    ``start``: each round takes the single move of one decision to a neighbouring candidate that
    gives up the least log-probability per unit of cost error it removes, until within the
    tolerance or no move gets closer.
    """
    lp = {a: t.detach().float().cpu() for a, t in log_probs.items()}
    if abs(cost(start) - target) <= tolerance * target:
        return start
    slots = [(a, d) for a, v in start.items() for d in range(len(v))]
    count = math.prod(lp[a].size(-1) for a, _ in slots)
    if count <= EXHAUSTIVE_LIMIT:
        return _exhaustive(lp, start, slots, cost, target, tolerance)
    return _greedy(lp, start, cost, target, tolerance)


def _exhaustive(lp, start: Indices, slots, cost, target: float, tolerance: float) -> Indices:
    best_key, best = None, start
    for combo in itertools.product(*(range(lp[a].size(-1)) for a, _ in slots)):
        indices = {a: [0] * len(v) for a, v in start.items()}
        for (a, d), k in zip(slots, combo, strict=True):
            indices[a][d] = k
        error = abs(cost(_frozen(indices)) - target) / target
        score = sum(float(lp[a][d, k]) for (a, d), k in zip(slots, combo, strict=True))
        # Within the tolerance: most probable first; outside: closest first.
        key = (0, -score) if error <= tolerance else (1, error)
        if best_key is None or key < best_key:
            best_key, best = key, _frozen(indices)
    return best


def _greedy(lp, start: Indices, cost, target: float, tolerance: float) -> Indices:
    current = {a: list(v) for a, v in start.items()}
    error = abs(cost(start) - target)
    while error > tolerance * target:
        best: tuple[float, str, int, int, float] | None = None
        for axis, choices in current.items():
            num_candidates = lp[axis].size(-1)
            for d, k in enumerate(choices):
                for move in (k - 1, k + 1):
                    if not 0 <= move < num_candidates:
                        continue
                    choices[d] = move
                    moved = abs(cost(_frozen(current)) - target)
                    choices[d] = k
                    if moved >= error:
                        continue
                    price = float(lp[axis][d, k] - lp[axis][d, move]) / (error - moved)
                    if best is None or price < best[0]:
                        best = (price, axis, d, move, moved)
        if best is None:
            break
        _, axis, d, move, error = best
        current[axis][d] = move
    return _frozen(current)


def _frozen(indices: Mapping[str, list[int]]) -> Indices:
    return {a: tuple(v) for a, v in indices.items()}
