"""Step-by-step cached decoding of a batch of independent requests, for the HTTP server.

:func:`megatron_elastic.serving.cached_generate` decodes a batch that shares one sampling setup
and tells the host the tokens at the end. A server needs more per row: its own sampling and seed,
its own token limit, the log-probabilities of the chosen and top tokens, those of the prompt
(``echo``), and each token as soon as it is chosen (streaming, stop strings, cancellation). So
:func:`decode_batch` runs the same steps as ``cached_generate`` (prefill each prompt at its own
length, stack the states, decode every row one token per step with :func:`forward` and
:func:`pick`) and hands every token to its row through :class:`DecodeRow` callbacks.

Each row samples from its own generator seeded with its own seed, so a row's tokens do not
depend on what it is batched with: greedy tokens equal ``cached_generate``'s (tested), and a
seeded sample equals ``cached_generate`` of that prompt alone with the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_elastic.serving.forward import forward
from megatron_elastic.serving.generate import SamplingConfig, pick
from megatron_elastic.serving.net import ServingNet
from megatron_elastic.serving.state import InferenceState

__all__ = ["DecodeRow", "TokenLogprob", "batch_capacity", "decode_batch", "prompt_logprobs"]


@dataclass(frozen=True)
class TokenLogprob:
    """A token with its log-probability under the model (raw log-softmax, before temperature or
    top-p) and the ``top`` most likely tokens at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    """(token, logprob) of the most likely tokens, most likely first."""


class DecodeRow(Protocol):
    """One prompt of a batch and where its tokens go (called on the decoding thread)."""

    prompt: Sequence[int]
    max_tokens: int
    sampling: SamplingConfig
    top_logprobs: int | None
    """None: no log-probabilities; k >= 0: the chosen token's and the k most likely."""
    echo: bool
    """Also score the prompt (:meth:`on_prompt`)."""

    @property
    def cancelled(self) -> bool:
        """True once nobody waits for the row any more (it is dropped at the next step)."""

    def on_prompt(self, logprobs: list[TokenLogprob | None]) -> None:
        """The prompt's tokens with their log-probabilities (None for the first token)."""

    def on_token(self, token: int, logprob: TokenLogprob | None) -> bool:
        """A generated token (never the end-of-sequence one); True ends the row (a stop
        string)."""

    def finish(self, reason: str) -> None:
        """The row ends: ``stop`` (end of sequence or a stop string seen by :meth:`on_token`),
        ``length`` (``max_tokens``) or ``cancelled``."""


def _entries(
    logits: torch.Tensor, chosen: torch.Tensor, k: int, vocab_size: int | None
) -> list[TokenLogprob]:
    """Log-probabilities of ``chosen`` (n,) under ``logits`` (n, V) and the top ``k`` per row."""
    logp = torch.log_softmax(logits[:, :vocab_size].float(), dim=-1)
    picked = logp.gather(1, chosen[:, None]).squeeze(1).tolist()
    if k > 0:
        values, ids = logp.topk(k, dim=-1)
        tops = [
            tuple(zip(i, v, strict=True))
            for i, v in zip(ids.tolist(), values.tolist(), strict=True)
        ]
    else:
        tops = [()] * len(picked)
    return [
        TokenLogprob(t, lp, top) for t, lp, top in zip(chosen.tolist(), picked, tops, strict=True)
    ]


def batch_capacity(rows: Sequence[DecodeRow]) -> int:
    """Positions a batch of ``rows`` needs: its longest prompt plus its largest token limit."""
    return max(len(r.prompt) for r in rows) + max(r.max_tokens for r in rows)


def prompt_logprobs(
    logits: torch.Tensor, prompt: Sequence[int], k: int, vocab_size: int | None
) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it, from the prompt's logits
    (s, V); the first token has none."""
    if len(prompt) < 2:
        return [None]
    chosen = torch.tensor(list(prompt[1:]), device=logits.device)
    return [None, *_entries(logits[:-1], chosen, k, vocab_size)]


@torch.no_grad()
def decode_batch(
    net: ServingNet,
    rows: Sequence[DecodeRow],
    *,
    eos_id: int | None,
    vocab_size: int | None,
) -> None:
    """Decode every row to its end (end of sequence, ``max_tokens``, a stop string, or
    cancellation), calling its callbacks as tokens are chosen. Rows that ended are fed padding
    until the last one ends, so the longest prompt plus the largest ``max_tokens`` must fit the
    model (:func:`batch_capacity`; the scheduler batches only rows that fit)."""
    device = net.device
    capacity = batch_capacity(rows)
    assert capacity <= net.max_sequence_length, "the scheduler batched rows that do not fit"
    live: list[DecodeRow] = []
    states, last = [], []
    for row in rows:  # prefill: each prompt at its own length
        if row.cancelled:
            row.finish("cancelled")
            continue
        state = InferenceState(net, 1, capacity)
        ids = torch.tensor([list(row.prompt)], dtype=torch.long, device=device)
        logits = forward(net, ids, state, last_only=not row.echo)
        if row.echo:
            row.on_prompt(prompt_logprobs(logits[0], row.prompt, row.top_logprobs or 0, vocab_size))
        if row.max_tokens == 0:
            row.finish("length")
            continue
        live.append(row)
        states.append(state)
        last.append(logits[:, -1])
    if not live:
        return
    state = InferenceState.stack(states) if len(states) > 1 else states[0]
    logits = torch.cat(last)  # (b, V)
    generators = [
        None if r.sampling.greedy else torch.Generator(device=device).manual_seed(r.sampling.seed)
        for r in live
    ]
    done = [False] * len(live)
    produced = [0] * len(live)
    pad = eos_id if eos_id is not None else 0
    while True:
        chosen = torch.stack(
            [
                torch.tensor(pad, device=device)
                if done[i]
                else pick(logits[i : i + 1], r.sampling, vocab_size, generators[i])[0]
                for i, r in enumerate(live)
            ]
        )
        k = max((r.top_logprobs or 0) for r in live)
        wants = any(r.top_logprobs is not None for r in live)
        entries = _entries(logits, chosen, k, vocab_size) if wants else [None] * len(live)
        for i, (row, token) in enumerate(zip(live, chosen.tolist(), strict=True)):
            if done[i]:
                continue
            done[i] = True
            produced[i] += 1
            if row.cancelled:
                row.finish("cancelled")
            elif eos_id is not None and token == eos_id:
                row.finish("stop")
            else:
                entry = entries[i]
                if entry is not None and row.top_logprobs is not None:
                    entry = TokenLogprob(entry.token, entry.logprob, entry.top[: row.top_logprobs])
                if row.on_token(token, entry):
                    row.finish("stop")
                elif produced[i] >= row.max_tokens:
                    row.finish("length")
                else:
                    done[i] = False
        if all(done):
            return
        logits = forward(net, chosen[:, None], state, last_only=True)[:, -1]
