"""Greedy decoding with a megatron-core language model: a plain ``HybridModel`` or an elastic one
at whatever sub-network :meth:`ElasticHybridModel.set_subnet` last chose.

Every step recomputes the whole sequence (no KV / SSM-state cache): the elastic sub-networks run
without megatron's inference context, and for the small models this is used on the recompute is
cheap. Cost is O(steps x length) forward tokens, so it is not meant for long generations of
large models.

Prompts of different lengths are *right*-padded: each row writes its next token at its own
position. Attention and Mamba are both causal, so the padding after a row's last token never
influences that row's logits and no attention mask is needed (Mamba has none). The host only
learns the result at the end, apart from an "all rows stopped?" check every
``stop_check_interval`` steps (one sync each) when an end-of-sequence id is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from megatron_elastic.training.lm_step import position_ids_like

__all__ = ["Generation", "greedy_generate"]


@dataclass(frozen=True)
class Generation:
    """What :func:`greedy_generate` produced for each prompt."""

    tokens: list[list[int]]
    """Generated ids per prompt, without the prompt and without the end-of-sequence token."""
    stopped: list[bool]
    """Whether the prompt's generation ended with the end-of-sequence token (else it hit
    ``max_new_tokens``)."""


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None = None,
    pad_id: int | None = None,
    max_sequence_length: int | None = None,
    vocab_size: int | None = None,
    stop_check_interval: int = 8,
) -> Generation:
    """Greedy (argmax) continuation of each token-id prompt, all prompts in one batch.

    ``model`` is called as ``model(tokens, position_ids, None)`` and must return logits (b, s, V)
    with the whole vocabulary on this rank (no pipeline split). Generation of a row stops at
    ``eos_id`` (the tokenizer's end-of-document id) or after ``max_new_tokens``. ``pad_id`` fills
    the unused tail of each row (default ``eos_id``, else 0); its value never matters (causal
    model). ``max_sequence_length``: refuse prompt + new tokens longer than the model's context.
    ``vocab_size``: pick among the first ``vocab_size`` ids only (the tokenizer's; the model's
    vocabulary may be padded beyond it, and those rows never decode to text).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if stop_check_interval < 1:
        raise ValueError(f"stop_check_interval must be >= 1, got {stop_check_interval}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("give at least one prompt, each of at least one token")
    pre, post = getattr(model, "pre_process", True), getattr(model, "post_process", True)
    if not (pre and post):
        raise ValueError("generation needs the whole model on this rank (pipeline parallel size 1)")
    lengths = [len(p) for p in prompts]
    total = max(lengths) + max_new_tokens
    if max_sequence_length is not None and total > max_sequence_length:
        raise ValueError(
            f"longest prompt ({max(lengths)} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{total} exceeds the model's max_sequence_length {max_sequence_length}; shorten the "
            "prompt or lower max_new_tokens"
        )
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    device = _model_device(model)
    b = len(prompts)
    buffer = torch.full((b, total), pad, dtype=torch.long)  # (b, total), right-padded
    for i, p in enumerate(prompts):
        buffer[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    buffer = buffer.to(device)
    pos = torch.tensor(lengths, device=device)  # (b,) where each row writes its next token
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    out = torch.full((b, max_new_tokens), pad, dtype=torch.long, device=device)
    steps = 0
    for step in range(max_new_tokens):
        width = max(lengths) + step  # known on the host: no sync to size the input
        tokens = buffer[:, :width]
        logits = model(tokens, position_ids_like(tokens), None, runtime_gather_output=True)
        last = (pos - 1).view(b, 1, 1).expand(b, 1, logits.size(-1))
        nxt = logits.gather(1, last).squeeze(1)[:, :vocab_size].argmax(-1)  # (b,)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        out[:, step] = nxt
        buffer.scatter_(1, pos.unsqueeze(1), nxt.unsqueeze(1))
        pos += 1
        steps = step + 1
        if eos_id is not None:
            finished |= nxt == eos_id
            if steps % stop_check_interval == 0 and bool(finished.all()):
                break
    out = out[:, :steps]
    if eos_id is not None:
        is_eos = out == eos_id  # (b, steps)
        stopped = is_eos.any(1)
        # first eos per row; rows that never stopped keep all their tokens
        keep = torch.where(stopped, is_eos.int().argmax(1), torch.full_like(pos, steps))
    else:
        stopped = torch.zeros(b, dtype=torch.bool, device=device)
        keep = torch.full_like(pos, steps)
    rows, keep_list = out.tolist(), keep.tolist()  # results reach the host here, once
    return Generation(
        tokens=[row[:k] for row, k in zip(rows, keep_list, strict=True)],
        stopped=stopped.tolist(),
    )
