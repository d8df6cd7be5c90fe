"""Data for training: generated token streams for smoke runs and tests."""

from megatron_elastic.data.synthetic import MarkovTokenSource

__all__ = ["MarkovTokenSource"]
