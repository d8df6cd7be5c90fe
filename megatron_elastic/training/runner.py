"""What runs a training micro-batch through megatron's schedule: the model alone (plain training,
or elastic training without a teacher) or a student/teacher
:class:`~megatron_elastic.distill.pair.DistillationPair`. The trainer sees only :class:`Runner`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from megatron_elastic.distill.pair import DistillationPair
from megatron_elastic.elastic.model import SubnetWeights
from megatron_elastic.elastic.subnet import SubnetSpec
from megatron_elastic.training.lm_step import Batch, distill_forward, lm_forward
from megatron_elastic.training.metrics import LossSums
from megatron_elastic.training.recipe import TrainRecipe

__all__ = ["MIX", "PLAIN", "DistillRunner", "ModelRunner", "Runner", "build_runner"]

PLAIN = "parent"
"""The single "budget" name of plain (parent) training in logs."""
MIX = "all"
"""The loss name of elastic training without a teacher (budgets mixed in one number)."""


@runtime_checkable
class Runner(Protocol):
    """What the trainer needs of the thing that runs a micro-batch."""

    module: nn.Module
    """What megatron's schedule runs (its ``config``, ``set_input_tensor``, forward)."""
    teacher: nn.Module | None
    """A separate frozen teacher module (its forward is timed on its own), or None."""
    p2p_batch_factor: int
    """Micro-batches' worth of rows in the tensor pipeline stages exchange."""
    budgets: list[str]
    """The names its losses are reported under, sorted."""

    def forward(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-token training loss of one micro-batch on the last stage (hidden states
        elsewhere): :func:`~megatron_elastic.training.lm_step.forward_backward`'s
        ``model_forward``."""
        ...

    def set_subnet(self, spec: SubnetSpec | None, weights: SubnetWeights | None) -> None:
        """The sub-network the trainable model runs for the next micro-batch."""
        ...

    def begin_step(self) -> None:
        """Forget the previous step's micro-batches."""
        ...

    def losses(
        self, drawn: list[str], loss: torch.Tensor | None, batches: list[Batch], counted: bool
    ) -> dict[str, list[LossSums]]:
        """This rank's token-summed losses of the step per budget name: ``drawn`` names each
        micro-batch's budget, ``loss`` is the schedule's token-mean loss (None off the last
        stage), ``counted``: this rank counts the micro-batches (context-parallel rank 0)."""
        ...


class ModelRunner:
    """The model alone: cross entropy, one loss for the step under the name ``name`` (``parent``
    for plain training, ``all`` for the mix of budgets of elastic training without a teacher)."""

    teacher = None
    p2p_batch_factor = 1

    def __init__(self, module: nn.Module, model: nn.Module, name: str) -> None:
        self.module, self.model, self.budgets = module, model, [name]

    def forward(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        return lm_forward(module, batch)

    def set_subnet(self, spec: SubnetSpec | None, weights: SubnetWeights | None) -> None:
        self.model.set_subnet(spec, weights)

    def begin_step(self) -> None:
        pass

    def losses(
        self, drawn: list[str], loss: torch.Tensor | None, batches: list[Batch], counted: bool
    ) -> dict[str, list[LossSums]]:
        if loss is None or not counted:  # the CP-reduced mean: counted on CP rank 0 only
            return {}
        tokens = sum(b["loss_mask"].sum() for b in batches).cpu()
        summed = loss.detach().cpu() * tokens
        count = torch.tensor(float(len(batches)))
        return {self.budgets[0]: [LossSums(summed, summed, tokens, count)]}


class DistillRunner:
    """A :class:`DistillationPair`: KD loss, per budget from the pair's per-micro-batch records."""

    p2p_batch_factor = 2  # student and teacher hidden states stacked along the batch

    def __init__(self, pair: DistillationPair, budgets: list[str]) -> None:
        self.module, self.budgets = pair, sorted(budgets)

    @property
    def teacher(self) -> nn.Module | None:
        return self.module.teacher

    def forward(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        return distill_forward(module, batch)

    def set_subnet(self, spec: SubnetSpec | None, weights: SubnetWeights | None) -> None:
        self.module.set_student(spec, weights)

    def begin_step(self) -> None:
        self.module.records.clear()

    def losses(
        self, drawn: list[str], loss: torch.Tensor | None, batches: list[Batch], counted: bool
    ) -> dict[str, list[LossSums]]:
        # Under CP each rank's records hold its share of a micro-batch's tokens (summed over the
        # CP ranks by the reduction); the micro-batch itself is counted on CP rank 0 only.
        out: dict[str, list[LossSums]] = {}
        for name, rec in zip(drawn, self.module.records, strict=False):
            count = torch.full_like(rec.tokens, float(counted))
            row = torch.stack([rec.kd, rec.ce, rec.tokens, count]).cpu()  # one copy to host
            out.setdefault(name, []).append(LossSums(*row.unbind()))
        return out


def build_runner(
    recipe: TrainRecipe,
    module: nn.Module,
    model: nn.Module,
    teacher: nn.Module | None,
    budgets: list[str],
    tp_group: Any,
) -> Runner:
    """The recipe's runner around ``module`` (the DDP-wrapped ``model``): the model alone in plain
    training and without a teacher, else a distillation pair with ``teacher`` (None: the
    student's own full budget teaches) reporting each of ``budgets`` (``tp_group``: the
    tensor-parallel group its vocab-parallel losses reduce over)."""
    if recipe.mode == "plain" or recipe.distill.teacher == "none":
        return ModelRunner(module, model, PLAIN if recipe.mode == "plain" else MIX)
    d = recipe.distill
    pair = DistillationPair(
        module,
        teacher,
        temperature=d.temperature,
        ce_weight=d.ce_weight,
        tp_group=tp_group,
        num_loss_chunks=d.num_loss_chunks,
    )
    return DistillRunner(pair, budgets)
