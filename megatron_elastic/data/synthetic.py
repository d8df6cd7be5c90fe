"""A generated, learnable token stream: a sparse first-order Markov chain over the vocabulary.

Each token has ``branching`` possible successors, so a model that learns the chain reaches a loss
of about ``log(branching)`` nats, far below the ``log(vocab)`` of an untrained model: a quick,
offline signal that training works.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

__all__ = ["MarkovTokenSource"]


class MarkovTokenSource:
    """Deterministic (seeded) batches of ``tokens``/``labels``/``loss_mask``."""

    def __init__(self, vocab_size: int, *, branching: int = 4, seed: int = 0) -> None:
        if branching < 1 or branching > vocab_size:
            raise ValueError(f"branching must be in [1, vocab_size={vocab_size}], got {branching}")
        self.vocab_size = vocab_size
        self.branching = branching
        g = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(0, vocab_size, (vocab_size, branching), generator=g)
        self._generator = torch.Generator().manual_seed(seed + 1)

    @property
    def entropy(self) -> float:
        """Loss (nats/token) of a model that has learned the chain perfectly."""
        return math.log(self.branching)

    def sample(self, batch_size: int, seq_length: int) -> dict[str, torch.Tensor]:
        g = self._generator
        tokens = torch.empty(batch_size, seq_length + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.vocab_size, (batch_size,), generator=g)
        choice = torch.randint(0, self.branching, (batch_size, seq_length), generator=g)
        for t in range(seq_length):
            tokens[:, t + 1] = self.successors[tokens[:, t], choice[:, t]]
        return {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": torch.ones(batch_size, seq_length),
        }

    def batches(self, batch_size: int, seq_length: int) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.sample(batch_size, seq_length)
