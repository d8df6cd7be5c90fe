"""Per-step metrics: reduced once per step across ranks, printed, and written to TensorBoard
(and Weights & Biases when installed and asked for) by rank 0, plus a JSON-lines file that
tests and tools read."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["MetricsWriter", "reduce_step_stats"]


def reduce_step_stats(
    budgets: list[str],
    per_budget: dict[str, list[torch.Tensor]],
    flags: list[float],
    contribute: bool,
    device: torch.device | str,
) -> tuple[dict[str, dict[str, float]], list[float]]:
    """Sum per-budget ``[kd, ce, tokens, micro_batches]`` over the ranks that ``contribute``
    (one per replica: the last pipeline stage's first tensor-parallel rank) and ``flags`` over
    every rank, in ONE all-reduce (the step's only host sync besides the optimizer's).
    Returns per budget ``{"loss", "ce", "tokens", "micro_batches"}`` and the summed flags."""
    rows = []
    for name in budgets:
        values = per_budget.get(name)
        row = torch.stack(values).sum(0) if values and contribute else torch.zeros(4)
        rows.append(row.to(device=device, dtype=torch.float64))
    flat = torch.cat([*rows, torch.tensor(flags, dtype=torch.float64, device=device)])
    if dist.is_initialized():
        dist.all_reduce(flat)
    values = flat.tolist()
    out = {}
    for i, name in enumerate(budgets):
        kd, ce, tokens, count = values[4 * i : 4 * i + 4]
        if count:
            out[name] = {
                "loss": kd / max(tokens, 1),
                "ce": ce / max(tokens, 1),
                "tokens": tokens,
                "micro_batches": count,
            }
    return out, values[4 * len(budgets) :]


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
                self.wandb = wandb.init(project=wandb_project, name=run_name, config=config)

    def log(self, step: int, scalars: dict[str, float], line: str | None = None) -> None:
        if not self.enabled:
            return
        if line:
            print(line, flush=True)
        record = {"step": step, **{k: v for k, v in scalars.items() if math.isfinite(v)}}
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
