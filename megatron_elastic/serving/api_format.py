"""OpenAI response bodies from the events of a job (:mod:`megatron_elastic.serving.scheduler`):
completions and chat completions, whole or as stream chunks, with their log-probabilities in
each endpoint's format."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_elastic.data.tokenizers import Tokenizer
from megatron_elastic.serving.engine import TokenLogprob

__all__ = [
    "ChoiceResult",
    "chat_logprobs",
    "completion_logprobs",
    "new_id",
    "text_length",
    "usage",
]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


@dataclass
class ChoiceResult:
    """What the events of one choice add up to (a whole response's choice)."""

    prompt: list[int]
    prompt_text: str
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None

    def add(self, event: dict[str, Any]) -> None:
        if "prompt_logprobs" in event:
            self.prompt_logprobs = event["prompt_logprobs"]
        self.text += event.get("text", "")
        self.tokens += event.get("tokens", [])
        self.logprobs += event.get("logprobs", [])
        self.finish_reason = event.get("finish_reason", self.finish_reason)


def _top(tok: Tokenizer, entry: TokenLogprob) -> dict[str, float]:
    """Text -> logprob of the top tokens and the chosen one (always there). Tokens that decode
    to the same text (bytes of an incomplete UTF-8 character all read "\ufffd") keep the most
    likely one's logprob."""
    top: dict[str, float] = {}
    for t, lp in entry.top:
        top.setdefault(tok.decode([t]), lp)
    top.setdefault(tok.decode([entry.token]), entry.logprob)
    return top


def text_length(tok: Tokenizer, tokens: Sequence[int]) -> int:
    """Characters of ``tokens`` decoded one by one (how ``text_offset`` counts)."""
    return sum(len(tok.decode([t])) for t in tokens)


def completion_logprobs(
    tok: Tokenizer,
    tokens: Sequence[int],
    entries: Sequence[TokenLogprob | None],
    offset: int = 0,
) -> dict[str, Any]:
    """``/v1/completions``' log-probabilities of ``tokens``: ``tokens`` (their text),
    ``token_logprobs``, ``top_logprobs`` (text -> logprob; None where a token has no
    probability: the first of a prompt) and ``text_offset`` (from ``offset``)."""
    texts = [tok.decode([t]) for t in tokens]
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": [None if e is None else _top(tok, e) for e in entries],
        "text_offset": offsets,
    }


def _token(tok: Tokenizer, token: int, logprob: float) -> dict[str, Any]:
    text = tok.decode([token])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(
    tok: Tokenizer, entries: Sequence[TokenLogprob | None], top: int | None
) -> dict[str, Any]:
    """``/v1/chat/completions``' log-probabilities: ``{"content": [{token, logprob, bytes,
    top_logprobs: [...]}]}``."""
    content = []
    for e in entries:
        assert e is not None, "generated tokens always have a log-probability"
        item = _token(tok, e.token, e.logprob)
        item["top_logprobs"] = [_token(tok, t, lp) for t, lp in e.top[: top or 0]]
        content.append(item)
    return {"content": content}


def usage(results: Sequence[ChoiceResult]) -> dict[str, int]:
    prompt = sum(len(r.prompt) for r in results)
    completion = sum(len(r.tokens) for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
