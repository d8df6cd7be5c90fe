"""megatron-elastic: many nested hybrid Mamba+attention models trained at once on megatron-core."""

__version__ = "0.1.0"
