"""What the torchrun workers share: their random micro-batches and the token-weighted loss mean
over data-parallel replicas (the trainer's logged loss). Imported by the worker scripts, whose
directory torchrun puts first on ``sys.path``."""

from __future__ import annotations

import torch
import torch.distributed as dist


def random_batches(
    vocab_size: int, *, seed: int, count: int, micro_batch_size: int, seq: int
) -> list[dict[str, torch.Tensor]]:
    """``count`` micro-batches of random tokens (next-token labels) and a random loss mask
    keeping ~80% of the positions, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, vocab_size, (micro_batch_size, seq + 1), generator=g)
        mask = (torch.rand(micro_batch_size, seq, generator=g) > 0.2).float()
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask})
    return out


def replica_mean_loss(loss: torch.Tensor, tokens: torch.Tensor, group) -> torch.Tensor:
    """The data-parallel replicas' token-weighted mean of their ``loss`` (each over ``tokens``
    counted tokens), as the trainer logs it."""
    totals = torch.stack([loss * tokens, tokens])
    dist.all_reduce(totals, group=group)
    return totals[0] / totals[1]
