"""Budgets per phase of a request: the worked solution ("thinking") at one budget, the final
answer at another, from one copy of the weights.

    schedule = BudgetSchedule.parse("think=50%,answer=full", trained=["full", "75%", "50%"])
    out = scheduled_generate(session, schedule, prompts, decode=tok.decode, max_new_tokens=256)

The thinking phase decodes greedily at ``schedule.think`` until the generated text contains the
answer marker (``####``, how the reasoning problems write their final answer:
:data:`megatron_elastic.data.reasoning.ANSWER_MARK`), an end-of-sequence token or the token
limit; the tokens up to and including the one that completes the marker are the thinking. The
answer phase then prefills prompt + thinking at ``schedule.answer`` (caches are budget-specific:
another sub-network computes other keys, values and Mamba states, so none is reused) and decodes
the rest greedily, within the same ``max_new_tokens`` in all. A completion without the marker is
thinking only. Prompts are decoded one at a time (each switches budget at its own token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_elastic.data.reasoning import ANSWER_MARK
from megatron_elastic.eval.generate import Generation
from megatron_elastic.serving.forward import forward
from megatron_elastic.serving.generate import ServingSession, cached_generate, check_lengths
from megatron_elastic.serving.net import ServingNet
from megatron_elastic.serving.state import InferenceState

__all__ = ["PHASES", "BudgetSchedule", "ScheduledGeneration", "scheduled_generate"]

PHASES = ("think", "answer")
"""The phases of a request, in order."""


@dataclass(frozen=True)
class BudgetSchedule:
    """Which budget generates each phase of a request."""

    think: str | float
    """Budget of the worked solution, up to and including the answer marker."""
    answer: str | float
    """Budget of the final answer, after the marker (re-prefilled over prompt + thinking)."""
    marker: str = ANSWER_MARK
    """Text that ends the thinking phase."""

    def __post_init__(self) -> None:
        if not self.marker:
            raise ValueError("marker must be a non-empty text (the reasoning data's is '####')")

    @classmethod
    def parse(
        cls,
        text: str,
        trained: Sequence[str],
        *,
        allow_fractions: bool = True,
        interpolate: bool | None = None,
    ) -> BudgetSchedule:
        """``think=B1,answer=B2`` (each a trained budget name, or a fraction with
        ``allow_fractions``); ``ValueError`` naming the fix for anything else."""
        from megatron_elastic.budgets import parse_budgets

        example = "e.g. --budget-schedule think=50%,answer=full"
        phases: dict[str, str | float] = {}
        for item in (part.strip() for part in text.split(",")):
            key, eq, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not value:
                raise ValueError(f"budget schedule item {item!r} is not phase=budget; {example}")
            if key not in PHASES:
                raise ValueError(f"unknown phase {key!r} in the budget schedule; phases: {PHASES}")
            if key in phases:
                raise ValueError(f"phase {key!r} is given twice in the budget schedule; {example}")
            (phases[key],) = parse_budgets(
                value,
                trained,
                allow_fractions=allow_fractions,
                interpolate=interpolate,
                single=True,
            )
        missing = [p for p in PHASES if p not in phases]
        if missing:
            raise ValueError(f"the budget schedule has no {missing[0]!r} phase; {example}")
        return cls(**phases)


@dataclass(frozen=True)
class ScheduledGeneration:
    """What :func:`scheduled_generate` produced."""

    generation: Generation
    """The whole completion of each prompt (thinking + answer)."""
    thinking: list[int]
    """How many of each completion's tokens the thinking budget generated."""


def _think(
    net: ServingNet,
    prompt: list[int],
    limit: int,
    eos_id: int | None,
    vocab_size: int | None,
    done: Callable[[list[int]], bool],
) -> list[int]:
    """Greedy tokens after ``prompt`` until ``done(tokens)``, ``eos_id`` (kept) or ``limit``."""
    state = InferenceState(net, 1, len(prompt) + limit)
    ids = torch.tensor([prompt], dtype=torch.long, device=net.device)
    logits = forward(net, ids, state, last_only=True)[:, -1]
    out: list[int] = []
    while len(out) < limit:
        nxt = logits[:, :vocab_size].argmax(-1, keepdim=True)  # (1, 1)
        out.append(nxt.item())  # the host checks every token
        if out[-1] == eos_id or done(out) or len(out) == limit:
            break
        logits = forward(net, nxt, state, last_only=True)[:, -1]
    return out


@torch.no_grad()
def scheduled_generate(
    session: ServingSession,
    schedule: BudgetSchedule,
    prompts: Sequence[Sequence[int]],
    *,
    decode: Callable[[list[int]], str],
    max_new_tokens: int,
    eos_id: int | None = None,
    vocab_size: int | None = None,
) -> ScheduledGeneration:
    """Greedy continuation of each prompt, thinking at ``schedule.think`` and answering at
    ``schedule.answer`` (see the module docstring). ``decode`` turns token ids into text (to
    find the marker); ``session`` must keep both budgets' networks (``keep >= 2``)."""
    if session.keep < 2:
        raise ValueError(
            f"a budget schedule holds 2 budgets: open the session with keep >= 2, not "
            f"{session.keep}"
        )
    think_net, answer_net = session.net(schedule.think), session.net(schedule.answer)
    check_lengths(prompts, max_new_tokens, think_net.max_sequence_length)

    def done(tokens: list[int]) -> bool:
        return schedule.marker in decode(tokens)

    tokens, stopped, thinking = [], [], []
    for prompt in prompts:
        out = _think(think_net, list(prompt), max_new_tokens, eos_id, vocab_size, done)
        thinking.append(len(out))
        ended = eos_id is not None and out[-1:] == [eos_id]
        if not ended and len(out) < max_new_tokens:  # the marker: answer at the other budget
            answer = cached_generate(
                answer_net,
                [[*prompt, *out]],
                max_new_tokens=max_new_tokens - len(out),
                eos_id=eos_id,
                vocab_size=vocab_size,
            )
            out += answer.tokens[0]
            ended = answer.stopped[0]
        elif ended:
            out = out[:-1]
            thinking[-1] -= 1
        tokens.append(out)
        stopped.append(ended)
    return ScheduledGeneration(Generation(tokens=tokens, stopped=stopped), thinking)
