"""Distillation: KD losses on vocab-parallel logits."""

from megatron_elastic.distill.losses import kd_and_ce_loss, kd_kl_loss, kd_loss_with_ce

__all__ = ["kd_and_ce_loss", "kd_kl_loss", "kd_loss_with_ce"]
