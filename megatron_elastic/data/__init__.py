"""Data: Megatron indexed datasets and generated token streams."""

from megatron_elastic.data.indexed import calibration_batches, check_prefix, write_indexed_dataset
from megatron_elastic.data.synthetic import MarkovTokenSource

__all__ = ["MarkovTokenSource", "calibration_batches", "check_prefix", "write_indexed_dataset"]
