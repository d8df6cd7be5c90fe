"""Export of trained budgets as standalone models."""

from megatron_elastic.export.standalone import standalone_config, standalone_state_dict

__all__ = ["standalone_config", "standalone_state_dict"]
