"""Student and frozen teacher as one model for megatron's pipeline schedules.

Both run on the same micro-batch on every pipeline stage. Between stages the schedule sends one
tensor of shape (seq, micro_batch, hidden); the pair sends the student's and the teacher's hidden
states stacked along the batch dimension, so the schedule only needs to be told a micro-batch
twice as large (``forward_backward(..., p2p_batch_factor=2)``). The teacher half is computed
without autograd: its gradient from the next stage is zeros and is dropped. On the last stage
the pair returns the per-token distillation loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatron_elastic.distill.losses import kd_and_ce_loss, kd_loss_with_ce
from megatron_elastic.elastic.model import ElasticHybridModel, SubnetWeights
from megatron_elastic.elastic.subnet import SubnetSpec

__all__ = ["DistillationPair", "TokenLosses"]


@dataclass(frozen=True)
class TokenLosses:
    """Token-summed losses of one micro-batch (detached; summed on device, no host sync)."""

    kd: torch.Tensor
    ce: torch.Tensor
    tokens: torch.Tensor


def _unwrap(module: nn.Module) -> nn.Module:
    while hasattr(module, "module"):  # megatron DDP / Float16Module
        module = module.module
    return module


class DistillationPair(nn.Module):
    """``student`` (trainable, possibly DDP-wrapped) distilled from ``teacher`` (a frozen model
    of the same pipeline layout) or, with ``teacher=None``, from the student's own full budget
    (``self`` teacher: the shared weights at full size, no gradient)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        temperature: float,
        ce_weight: float,
        tp_group,
        num_loss_chunks: int = 8,
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.temperature, self.ce_weight, self.tp_group = temperature, ce_weight, tp_group
        self.num_loss_chunks = num_loss_chunks
        # What megatron's schedules read from the model they are given.
        self.config = _unwrap(student).config
        self.model_type = _unwrap(student).model_type
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self._subnet: tuple[SubnetSpec | None, SubnetWeights | None] = (None, None)
        self.records: list[TokenLosses] = []
        self._inputs: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    @property
    def inner(self) -> ElasticHybridModel:
        return _unwrap(self.student)

    def set_student(self, spec: SubnetSpec | None, weights: SubnetWeights | None) -> None:
        """The sub-network the student runs for the next micro-batch."""
        self._subnet = (spec, weights)
        self.inner.set_subnet(spec, weights)

    def set_input_tensor(self, tensor) -> None:
        if isinstance(tensor, list | tuple):
            tensor = tensor[0]
        # (s, 2b, h) from the previous stage: student rows first, then the teacher's.
        self._inputs = (None, None) if tensor is None else tuple(tensor.chunk(2, dim=1))

    def _teacher_forward(self, tokens, position_ids) -> torch.Tensor:
        teacher_input = self._inputs[1]
        with torch.no_grad():
            if self.teacher is not None:
                self.teacher.set_input_tensor(teacher_input)
                return self.teacher(tokens, position_ids, None)
            inner = self.inner
            inner.set_subnet(None)  # the full budget of the shared weights
            inner.set_input_tensor(teacher_input)
            try:
                return inner(tokens, position_ids, None)
            finally:
                inner.set_subnet(*self._subnet)

    def forward(self, tokens, position_ids, attention_mask=None, labels=None, loss_mask=None):
        inner = self.inner
        teacher_out = self._teacher_forward(tokens, position_ids)
        inner.set_input_tensor(self._inputs[0])
        student_out = self.student(tokens, position_ids, None)
        if not inner.post_process:
            return torch.cat([student_out, teacher_out.detach()], dim=1)  # (s, 2b, h)
        # (b, s) each; the CE (megatron's vocab-parallel CE, from the same pass over the
        # student's logits) is logged always and trained only with a CE weight.
        kd, ce = kd_and_ce_loss(
            student_out, teacher_out, labels, self.temperature, self.tp_group, self.num_loss_chunks
        )
        per_token = kd_loss_with_ce(kd, ce, self.ce_weight)
        if loss_mask is not None:
            mask = loss_mask.float()
            with torch.no_grad():
                self.records.append(
                    TokenLosses(
                        kd=(kd.detach().float() * mask).sum(),
                        ce=(ce.detach().float() * mask).sum() if ce is not None else mask.sum() * 0,
                        tokens=mask.sum(),
                    )
                )
        return per_token
