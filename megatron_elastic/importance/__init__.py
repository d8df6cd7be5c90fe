"""Importance estimation: calibration statistics, per-axis rankings, iterative layer ranking, and
the function-preserving weight permutation that makes every nested prefix the most important."""

from megatron_elastic import platform

platform.apply()  # before megatron's Mamba mixer is imported

# ruff: noqa: E402
from megatron_elastic.importance.calibration import ActivationStats, collect_activation_stats
from megatron_elastic.importance.permute import apply_ranking, block_interleave
from megatron_elastic.importance.scores import Ranking, iterative_layer_ranking, rank_from_stats

__all__ = [
    "ActivationStats",
    "Ranking",
    "apply_ranking",
    "block_interleave",
    "collect_activation_stats",
    "iterative_layer_ranking",
    "rank_from_stats",
]
