"""The OpenAI API's request bodies (pydantic models, validated once) and error objects, as the
server (:mod:`megatron_elastic.serving.api`) accepts them.

Fields of OpenAI's API that the server does not implement are refused when set to anything but
their neutral value (``n`` > 1, ``best_of`` > 1, penalties, ``logit_bias``); fields it has no use
for (``user``, ``metadata``, ...) are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ApiError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "DetokenizeRequest",
    "StreamOptions",
    "TokenizeRequest",
    "error_body",
]


class ApiError(Exception):
    """A request the server refuses: becomes ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = (
            message,
            status,
            param,
            code,
            kind,
        )

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    """Options of a streamed response."""

    include_usage: bool = False
    """Send a last chunk with the token counts (and no choices) before ``[DONE]``."""


class _Request(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    """A served model (``GET /v1/models``): ``elastic@<budget>``."""
    temperature: float = Field(1.0, ge=0, le=2)
    """0: greedy; > 0: sample from softmax(logits / temperature) (OpenAI's default 1)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    seed: int | None = Field(None, ge=0)
    """Sampling seed (same seed, same tokens); default: a random one."""
    n: int = 1
    """Completions per prompt: only 1."""
    stop: str | list[str] | None = None
    """Text that ends the completion (not included in it); up to 4 strings."""
    stream: bool = False
    """Send the completion as server-sent events, token by token."""
    stream_options: StreamOptions | None = None
    frequency_penalty: float = 0.0
    """Not supported: must be 0."""
    presence_penalty: float = 0.0
    """Not supported: must be 0."""
    logit_bias: dict[str, float] | None = None
    """Not supported: must be empty."""
    budget_schedule: dict[str, str] | None = None
    """Extension: a served model per phase of the request, ``{"think": "elastic@50%",
    "answer": "elastic@full"}`` (and optionally ``"marker"``, the text that ends the thinking;
    default ``####``, the reasoning data's answer mark): the worked solution at one budget until
    the marker, the answer re-prefilled at the other (:mod:`megatron_elastic.serving.schedule`);
    greedy, without log-probabilities. ``model`` then only names the request."""

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is served, got {n}; send one request per completion")
        return n

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported; leave it 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported; leave it empty")
        return value

    @field_validator("budget_schedule")
    @classmethod
    def _phases(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and not {"think", "answer"} <= set(value) <= {
            "think",
            "answer",
            "marker",
        }:
            raise ValueError(
                f"give a model for 'think' and for 'answer' (and optionally a 'marker'), got "
                f"{sorted(value)}"
            )
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stops)}")
        return [s for s in stops if s]

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    """Text, token ids, or a list of either (one choice per prompt)."""
    max_tokens: int | None = Field(16, ge=0)
    """Tokens to generate at most (0 with ``echo``: score the prompt only; null: up to the
    context)."""
    echo: bool = False
    """Return the prompt before the completion (with its log-probabilities under ``logprobs``)."""
    logprobs: int | None = Field(None, ge=0, le=20)
    """Log-probabilities of each token and of the ``logprobs`` most likely ones at its place."""
    best_of: int | None = None
    """Only 1."""
    suffix: str | None = None
    """Not supported."""

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError(f"only best_of=1 is served, got {value}")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported")
        return value

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one prompt")
        return value


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    """Tokens to generate at most; default: up to the model's context."""
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name of ``max_tokens`` (it wins if both are given)."""
    logprobs: bool = False
    """Return the log-probability of each generated token."""
    top_logprobs: int | None = Field(None, ge=0, le=20)
    """With ``logprobs``: also the most likely tokens at each place."""

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM's tokenizer endpoint, which lm-evaluation-harness's ``remote``
    tokenizer calls)."""

    model_config = ConfigDict(extra="ignore")
    prompt: str
    """Text to tokenize."""
    add_special_tokens: bool = False
    """Refused when true: the models were trained on text without added special tokens."""
    model: str | None = None
    """Ignored (every budget shares the tokenizer)."""

    @field_validator("add_special_tokens")
    @classmethod
    def _no_special(cls, value: bool) -> bool:
        if value:
            raise ValueError("add_special_tokens: the tokenizer adds none; send false")
        return value


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``."""

    model_config = ConfigDict(extra="ignore")
    tokens: list[int]
    """Token ids to turn back into text."""
    model: str | None = None
    """Ignored (every budget shares the tokenizer)."""
