"""Per-step metrics: reduced once per step across ranks, printed, and written to TensorBoard
(and Weights & Biases when installed and asked for) by rank 0, plus a JSON-lines file that
tests and tools read."""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "BudgetLoss",
    "DrawCounts",
    "LossSums",
    "MetricsWriter",
    "ReducedStep",
    "StepRecord",
    "reduce_step_stats",
    "wandb_run_id",
]


@dataclass(frozen=True)
class LossSums:
    """Token-summed losses of one budget over some micro-batches, before the step's reduction
    (on the ranks that report losses; tensors, so no host sync until the reduction)."""

    kd: torch.Tensor
    """Token-summed training loss: KD with a teacher, else cross entropy."""
    ce: torch.Tensor
    """Token-summed student cross entropy."""
    tokens: torch.Tensor
    """Loss tokens summed over."""
    micro_batches: torch.Tensor
    """Micro-batches summed over (counted on one context-parallel rank only)."""

    def row(self) -> torch.Tensor:
        """The four sums as one row of the step's reduction."""
        return torch.stack([self.kd, self.ce, self.tokens, self.micro_batches])


@dataclass(frozen=True)
class BudgetLoss:
    """One budget's losses over a step, summed over every replica."""

    loss: float
    """Token-mean training loss (KD with a teacher, else cross entropy)."""
    ce: float
    """Token-mean student cross entropy."""
    tokens: float
    """Loss tokens of the budget's micro-batches in the step."""
    micro_batches: float
    """Micro-batches drawn for the budget in the step."""


@dataclass(frozen=True)
class ReducedStep:
    """The result of a step's one all-reduce (:func:`reduce_step_stats`)."""

    losses: dict[str, BudgetLoss]
    """Per budget drawn in the step (budgets not drawn are left out)."""
    flags: dict[str, float]
    """Each flag summed over every rank (non-zero: raised on some rank)."""
    per_rank: list[list[float]]
    """Every rank's ``per_rank`` values, in rank order."""


@dataclass(frozen=True)
class DrawCounts:
    """Micro-batches trained per budget and per architecture over the steps since the previous
    logged step, summed over every data-parallel replica."""

    budgets: dict[str, int]
    """Budget name -> micro-batches."""
    architectures: dict[str, dict[str, int]]
    """Budget name -> architecture it ran (``ElasticRouter.architecture_name``) -> micro-batches."""

    def scalars(self) -> dict[str, float]:
        """``micro_batches/<budget>`` for the scalar writers."""
        return {f"micro_batches/{k}": float(v) for k, v in sorted(self.budgets.items())}

    def record(self) -> dict[str, Any]:
        """``metrics.jsonl`` only (variable keys: not a scalar series): ``architectures``."""
        return {
            "architectures": {
                b: dict(sorted(archs.items())) for b, archs in sorted(self.architectures.items())
            }
        }


@dataclass(frozen=True)
class StepRecord:
    """What one optimizer step reports: its result and what the step log writes."""

    step: int
    """The step's number in the stage (1-based)."""
    losses: dict[str, BudgetLoss]
    """Per budget drawn in the step (one entry, ``parent`` or ``all``, without a teacher)."""
    grad_norm: float
    """The gradient norm; NaN: a loss or the gradient was not finite and no step was taken."""
    preempted: bool
    """A preemption signal arrived on some rank: save and exit after this step."""

    @property
    def taken(self) -> bool:
        """Whether the optimizer step was taken (everything finite)."""
        return math.isfinite(self.grad_norm)


def reduce_step_stats(
    budgets: list[str],
    per_budget: dict[str, list[LossSums]],
    flags: dict[str, float],
    contribute: bool,
    device: torch.device | str,
    per_rank: list[float] = (),
) -> ReducedStep:
    """Sum per-budget :class:`LossSums` over the ranks that ``contribute`` (one per replica: the
    last pipeline stage's first tensor-parallel rank) and ``flags`` over every rank, and gather
    every rank's ``per_rank`` values (each rank fills its own slot of a world-sized table), in
    ONE all-reduce (the step's only host sync besides the optimizer's)."""
    rows = []
    for name in budgets:
        values = per_budget.get(name)
        row = torch.stack([v.row() for v in values]).sum(0) if values and contribute else None
        rows.append((torch.zeros(4) if row is None else row).to(device=device, dtype=torch.float64))
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    table = torch.zeros(world, len(per_rank), dtype=torch.float64)
    table[rank] = torch.tensor(per_rank, dtype=torch.float64)
    flag_values = torch.tensor(list(flags.values()), dtype=torch.float64, device=device)
    flat = torch.cat([*rows, flag_values, table.flatten().to(device)])
    if dist.is_initialized():
        dist.all_reduce(flat)
    values = flat.tolist()
    gathered = values[len(values) - table.numel() :]
    values = values[: len(values) - table.numel()]
    n = len(per_rank)
    out = {}
    for i, name in enumerate(budgets):
        kd, ce, tokens, count = values[4 * i : 4 * i + 4]
        if count:
            out[name] = BudgetLoss(kd / max(tokens, 1), ce / max(tokens, 1), tokens, count)
    return ReducedStep(
        losses=out,
        flags=dict(zip(flags, values[4 * len(budgets) :], strict=True)),
        per_rank=[gathered[i * n : (i + 1) * n] for i in range(world)],
    )


WANDB_ID_FILE = "wandb_id"
"""The W&B run id of a save directory (written once, read by every later job)."""


def wandb_run_id(directory: Path) -> str:
    """The W&B run id of the run that saves into ``directory``: read from
    ``<directory>/wandb_id``, or made and written there on the first call (atomically, so a
    requeued job, or a second writer racing the first, reads the same id)."""
    path = Path(directory) / WANDB_ID_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{WANDB_ID_FILE}.{os.getpid()}")
        tmp.write_text(uuid.uuid4().hex[:16] + "\n")
        try:
            os.link(tmp, path)  # fails if another writer was first: keep theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    run_id = path.read_text().strip()
    if not run_id:
        raise ValueError(f"{path} is empty; delete it to start a new W&B run")
    return run_id


class MetricsWriter:
    """Console lines, ``metrics.jsonl``, TensorBoard and optional W&B (rank 0 only)."""

    def __init__(
        self,
        directory: Path,
        *,
        enabled: bool,
        tensorboard: bool,
        wandb_project: str | None,
        run_name: str,
        config: dict[str, Any],
    ) -> None:
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        directory.mkdir(parents=True, exist_ok=True)
        self.jsonl = (directory / "metrics.jsonl").open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(directory / "tensorboard" / run_name))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("[train] wandb is not installed; logging.wandb_project ignored", flush=True)
            else:
                # One W&B run across requeues and resumes: the id lives in the save directory.
                self.wandb = wandb.init(
                    project=wandb_project,
                    name=run_name,
                    config=config,
                    id=wandb_run_id(directory),
                    resume="allow",
                )

    def log(
        self,
        step: int,
        scalars: dict[str, float],
        line: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Print ``line``, write ``scalars`` everywhere and ``extra`` (JSON data that is not a
        scalar series, e.g. :meth:`DrawCounts.record`) to ``metrics.jsonl`` only."""
        if not self.enabled:
            return
        if line:
            print(line, flush=True)
        record = {"step": step, **{k: v for k, v in scalars.items() if math.isfinite(v)}}
        record.update(extra or {})
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
