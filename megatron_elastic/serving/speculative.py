"""Self-speculative decoding: a smaller budget of the *same* weights drafts ``k`` tokens, a larger
budget (the verifier) checks them in one pass, and both states roll back to the accepted prefix.

Greedy and lossless: every token is the verifier's own argmax given the tokens before it, so the
output equals the verifier's plain greedy output; the draft only decides how many verifier tokens
one pass yields (``m`` accepted drafts + the verifier's own next token).

One round, with ``committed`` the tokens so far (the verifier has fed all but the last)::

    draft:    feed the committed tokens it has not fed  -> d1, then d1 -> d2, ... (k picks)
    verifier: feed [last committed, d1 .. dk] (k+1 tokens, one pass)  -> g1 .. g(k+1)
    accept    m = length of the common prefix of d and g; commit d1 .. dm, g(m+1)
    rollback  verifier to committed + d1..dm; draft to committed + d1..d(min(m, k-1))

Prompts are decoded one at a time (batch 1: acceptance differs per row). ``k`` shrinks near the
end so that no more than ``max_new_tokens`` are produced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_elastic.eval.generate import Generation
from megatron_elastic.serving.forward import forward
from megatron_elastic.serving.generate import check_lengths
from megatron_elastic.serving.net import ServingNet
from megatron_elastic.serving.state import InferenceState

__all__ = ["SpeculativeStats", "speculative_generate"]


@dataclass(frozen=True)
class SpeculativeStats:
    """What the draft contributed."""

    proposed: int
    """Draft tokens proposed (sum of ``k`` over verification passes)."""
    accepted: int
    """Draft tokens the verifier accepted."""
    passes: int
    """Verification passes (each yields accepted + 1 tokens)."""
    generated: int
    """Tokens produced (before cutting at an end-of-sequence token)."""

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verification pass (accepted drafts + the verifier's own)."""
        return self.generated / self.passes if self.passes else 0.0


@torch.no_grad()
def speculative_generate(
    verifier: ServingNet,
    draft: ServingNet,
    prompts: Sequence[Sequence[int]],
    *,
    draft_tokens: int,
    max_new_tokens: int,
    eos_id: int | None = None,
    vocab_size: int | None = None,
    propose: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[Generation, SpeculativeStats]:
    """Greedy continuation of each prompt by ``verifier``, drafted by ``draft`` (see the module
    docstring). ``propose`` maps the draft's logits (1, V) to its token (default: argmax over the
    first ``vocab_size`` ids)."""
    if draft_tokens <= 0:
        raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
    check_lengths(prompts, max_new_tokens, verifier.max_sequence_length)
    propose = propose or (lambda logits: logits[:, :vocab_size].argmax(-1))
    totals = [0, 0, 0, 0]
    tokens, stopped = [], []
    for prompt in prompts:
        out, counts = _one(
            verifier, draft, list(prompt), draft_tokens, max_new_tokens, eos_id, vocab_size, propose
        )
        totals = [a + c for a, c in zip(totals, counts, strict=True)]
        cut = out.index(eos_id) if eos_id is not None and eos_id in out else None
        tokens.append(out if cut is None else out[:cut])
        stopped.append(cut is not None)
    return Generation(tokens=tokens, stopped=stopped), SpeculativeStats(*totals)


def _feed(net: ServingNet, ids: list[int] | torch.Tensor, state: InferenceState) -> torch.Tensor:
    """Logits (1, V) after feeding ``ids`` (host ids or a (1, s) tensor)."""
    if isinstance(ids, list):
        ids = torch.tensor([ids], dtype=torch.long, device=net.device)
    return forward(net, ids, state, last_only=True)[:, -1]


def _one(verifier, draft, prompt, k_max, max_new, eos_id, vocab_size, propose):
    capacity = len(prompt) + max_new
    v_state, d_state = InferenceState(verifier, 1, capacity), InferenceState(draft, 1, capacity)
    if len(prompt) > 1:  # both hold all but the last committed token
        _feed(verifier, prompt[:-1], v_state)
        _feed(draft, prompt[:-1], d_state)
    committed, out = list(prompt), []
    proposed = accepted = passes = 0
    while len(out) < max_new:
        k = min(k_max, max_new - len(out) - 1)
        drafts: list[torch.Tensor] = []  # (1,) each, kept on the device
        if k > 0:
            d_state.mark()
            logits = _feed(draft, committed[d_state.lengths[0] :], d_state)
            drafts.append(propose(logits))
            for _ in range(k - 1):
                logits = _feed(draft, drafts[-1][:, None], d_state)
                drafts.append(propose(logits))
        v_state.mark()
        chunk = torch.tensor([committed[v_state.lengths[0] :]], device=verifier.device)
        chunk = torch.cat([chunk, *(d[:, None] for d in drafts)], dim=1)  # (1, 1 + k)
        choice = forward(verifier, chunk, v_state)[0, :, :vocab_size].argmax(-1)  # (1 + k,)
        guess = torch.cat(drafts).tolist() if drafts else []
        verdict = choice.tolist()  # the one host sync of the round
        m = 0
        while m < k and guess[m] == verdict[m]:
            m += 1
        new = [*guess[:m], verdict[m]]
        v_state.rollback(len(committed) + m)  # all committed tokens + d1..dm
        if k > 0:
            d_state.rollback(len(committed) + min(m, k - 1))
        committed += new
        out += new
        proposed, accepted, passes = proposed + k, accepted + m, passes + 1
        if eos_id is not None and eos_id in new:
            break
    return out, (proposed, accepted, passes, len(out))
