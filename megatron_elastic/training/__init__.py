"""Training on megatron-core: pipeline-scheduled forward/backward and the language-model loss."""

from megatron_elastic.training.lm_step import forward_backward, lm_loss

__all__ = ["forward_backward", "lm_loss"]
