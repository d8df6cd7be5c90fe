"""Training on megatron-core: pipeline-scheduled forward/backward and the language-model loss."""

from megatron_elastic.training.budget_sampling import BudgetSampler, validate_budget_probs
from megatron_elastic.training.lm_step import forward_backward, lm_loss

__all__ = ["BudgetSampler", "forward_backward", "lm_loss", "validate_budget_probs"]
