"""Cached generation at any budget: each new token costs one step of the active sub-network.

    session = ServingSession(open_checkpoint("runs/elastic", pgs))
    out = cached_generate(session.net("50%"), prompts, max_new_tokens=256)

Prompts of different lengths are prefilled one at a time (each its own length, exact) and then
decoded together: every row advances one token per step at its own position. Greedy, or sampling
with a temperature and top-p from a seeded generator. The host learns the tokens at the end,
apart from an "all rows stopped?" check every ``stop_check_interval`` steps when an
end-of-sequence id is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_elastic.eval.generate import Generation
from megatron_elastic.serving.forward import forward
from megatron_elastic.serving.net import ServingNet, build_serving_net
from megatron_elastic.serving.state import InferenceState

__all__ = ["SamplingConfig", "ServingSession", "cached_generate", "check_lengths", "pick"]


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from the logits."""

    temperature: float = 0.0
    """0: greedy (argmax); > 0: sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Sample only from the smallest set of tokens whose probability reaches ``top_p``."""
    seed: int = 0
    """Seed of the sampling generator (same seed, same tokens)."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def pick(
    logits: torch.Tensor,
    sampling: SamplingConfig,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row from logits (b, V): argmax or a top-p sample, among the first
    ``vocab_size`` ids (the tokenizer's; the model's vocabulary may be padded)."""
    logits = logits[:, :vocab_size]
    if sampling.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above
        sorted_probs = sorted_probs.masked_fill(before >= sampling.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_lengths(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, max_sequence_length: int
) -> None:
    """``ValueError`` (with the fix) unless every prompt plus ``max_new_tokens`` fits."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("give at least one prompt, each of at least one token")
    longest = max(len(p) for p in prompts)
    if longest > max_sequence_length:
        raise ValueError(
            f"a prompt of {longest} tokens is longer than the model's max_sequence_length "
            f"{max_sequence_length}; shorten the prompt"
        )
    if longest + max_new_tokens > max_sequence_length:
        raise ValueError(
            f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{longest + max_new_tokens} exceeds the model's max_sequence_length "
            f"{max_sequence_length}; shorten the prompt or lower max_new_tokens"
        )


class ServingSession:
    """One loaded checkpoint serving any of its budgets: the decodable network of a budget is
    built on first use from the loaded weights (views, or copies of non-contiguous slices) and
    kept while in use; at most ``keep`` budgets (e.g. a verifier and its draft) are held."""

    def __init__(self, checkpoint, keep: int = 2) -> None:
        self.checkpoint, self.keep = checkpoint, keep
        self._nets: dict[str | float, ServingNet] = {}

    def net(self, budget: str | float) -> ServingNet:
        """The network of ``budget`` (a trained name, or a fraction on an elastic checkpoint)."""
        if budget not in self._nets:
            ckpt = self.checkpoint
            spec = ckpt.spec(budget)  # ValueError for an unknown budget
            while len(self._nets) >= self.keep:
                self._nets.pop(next(iter(self._nets)))
            self._nets[budget] = build_serving_net(ckpt.model, ckpt.model_config, spec)
        return self._nets[budget]


@torch.no_grad()
def cached_generate(
    net: ServingNet,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None = None,
    pad_id: int | None = None,
    vocab_size: int | None = None,
    sampling: SamplingConfig | None = None,
    stop_check_interval: int = 8,
) -> Generation:
    """Continue each token-id prompt with cached decoding (see the module docstring).

    Under greedy sampling the tokens are those of :func:`megatron_elastic.eval.greedy_generate`
    (full recomputation) on the same network. ``pad_id`` fills finished rows (default
    ``eos_id``, else 0).
    """
    sampling = sampling or SamplingConfig()
    if stop_check_interval < 1:
        raise ValueError(f"stop_check_interval must be >= 1, got {stop_check_interval}")
    check_lengths(prompts, max_new_tokens, net.max_sequence_length)
    device, b = net.device, len(prompts)
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    generator = None
    if not sampling.greedy:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    capacity = max(len(p) for p in prompts) + max_new_tokens
    out = torch.full((b, max_new_tokens), pad, dtype=torch.long, device=device)
    if max_new_tokens == 0:
        return Generation(tokens=[[] for _ in prompts], stopped=[False] * b)
    rows, last = [], []
    for prompt in prompts:  # prefill: each prompt at its own length
        row = InferenceState(net, 1, capacity)
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        last.append(forward(net, ids, row, last_only=True)[:, -1])
        rows.append(row)
    state = InferenceState.stack(rows) if b > 1 else rows[0]
    logits = torch.cat(last)  # (b, V)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    steps = 0
    for step in range(max_new_tokens):
        nxt = pick(logits, sampling, vocab_size, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        out[:, step] = nxt
        steps = step + 1
        if eos_id is not None:
            finished |= nxt == eos_id
            if steps % stop_check_interval == 0 and bool(finished.all()):
                break
        if steps < max_new_tokens:
            logits = forward(net, nxt[:, None], state, last_only=True)[:, -1]
    return _result(out[:, :steps], eos_id)


def _result(out: torch.Tensor, eos_id: int | None) -> Generation:
    steps = out.size(1)
    if eos_id is not None:
        is_eos = out == eos_id
        stopped = is_eos.any(1)
        keep = torch.where(
            stopped, is_eos.int().argmax(1), torch.full_like(stopped, steps, dtype=torch.long)
        )
    else:
        stopped = torch.zeros(out.size(0), dtype=torch.bool, device=out.device)
        keep = torch.full((out.size(0),), steps, dtype=torch.long, device=out.device)
    rows, keep_list = out.tolist(), keep.tolist()  # results reach the host here, once
    return Generation(
        tokens=[row[:k] for row, k in zip(rows, keep_list, strict=True)],
        stopped=stopped.tolist(),
    )
