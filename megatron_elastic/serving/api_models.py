"""The models one server serves: the loaded checkpoint, its tokenizer and chat template, and the
budget each model name runs (``elastic@<budget>``), all decoding from one copy of the weights
through one :class:`~megatron_elastic.serving.ServingSession`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from megatron_elastic.data.tokenizers import Tokenizer
from megatron_elastic.serving.api_format import now
from megatron_elastic.serving.api_schema import ApiError
from megatron_elastic.serving.engine import decode_batch
from megatron_elastic.serving.generate import ServingSession
from megatron_elastic.serving.schedule import BudgetSchedule, scheduled_generate
from megatron_elastic.serving.scheduler import Choice

__all__ = ["MODEL_PREFIX", "ServedModels", "check_checkpoint", "find_chat_template", "load_models"]

MODEL_PREFIX = "elastic@"


def find_chat_template(tokenizer_path: str | Path) -> str | None:
    """The chat template next to a tokenizer: ``chat_template.jinja`` or ``tokenizer_config.json``'s
    ``chat_template`` in its directory (the file's directory for a ``tokenizer.json``)."""
    path = Path(tokenizer_path)
    directory = path if path.is_dir() else path.parent
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    config = directory / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"cannot read {str(config)!r}: {e}") from e
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template
    return None


class ServedModels:
    """The loaded checkpoint, its tokenizer, and the budget each model name runs."""

    def __init__(
        self,
        checkpoint,
        tokenizer: Tokenizer,
        *,
        interpolate: Sequence[float] = (),
        chat_template: str | None = None,
    ) -> None:
        budgets: list[str | float] = list(checkpoint.budgets())
        for fraction in interpolate:
            checkpoint.spec(fraction)  # ValueError outside the trained range, or if exported
            budgets.append(float(fraction))
        self.checkpoint, self.tokenizer = checkpoint, tokenizer
        self.budgets = {f"{MODEL_PREFIX}{b}": b for b in budgets}
        self.params = {name: checkpoint.params(b) for name, b in self.budgets.items()}
        # every served budget's network is kept: interleaved requests never rebuild one
        self.session = ServingSession(checkpoint, keep=len(budgets))
        self.max_sequence_length: int = checkpoint.model_config.max_sequence_length
        self.created = now()
        self._template = None
        self.chat_template = chat_template
        """The Jinja chat template's source (None: none next to the tokenizer)."""
        if chat_template:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _template_error
            self._template = env.from_string(chat_template)

    def resolve(self, name: str, param: str = "model") -> str | float:
        if name not in self.budgets:
            raise ApiError(
                f"the model {name!r} does not exist; served: {sorted(self.budgets)}",
                status=404,
                param=param,
                code="model_not_found",
            )
        return self.budgets[name]

    def encode(self, prompt: str | list[int], param: str) -> tuple[str, list[int]]:
        """(text, token ids) of a text or token-id prompt."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        bad = [t for t in prompt if not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise ApiError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {self.tokenizer.vocab_size})",
                param=param,
            )
        return self.tokenizer.decode(prompt), list(prompt)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if self._template is None:
            raise ApiError(
                "this model's tokenizer has no chat template (chat_template.jinja or "
                "tokenizer_config.json's chat_template next to it); use /v1/completions",
                param="messages",
                code="no_chat_template",
            )
        eos = self.tokenizer.decode([self.tokenizer.eod])
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True, bos_token="", eos_token=eos
            )
        except ApiError:
            raise
        except Exception as e:  # jinja's errors: the template does not fit these messages
            raise ApiError(f"the chat template failed: {e}", param="messages") from e

    def run_batch(self, budget: str | float | BudgetSchedule, rows: list[Choice]) -> None:
        """On the model thread: decode ``rows`` at ``budget`` (or by its phases)."""
        tok = self.tokenizer
        if isinstance(budget, BudgetSchedule):
            for row in rows:
                self._run_scheduled(budget, row)
            return
        decode_batch(self.session.net(budget), rows, eos_id=tok.eod, vocab_size=tok.vocab_size)

    def _run_scheduled(self, schedule: BudgetSchedule, row: Choice) -> None:
        """One row through :func:`scheduled_generate`; its tokens reach the client when both
        phases are done (a stop string still ends the text where it starts)."""
        if row.cancelled:
            row.finish("cancelled")
            return
        tok = self.tokenizer
        out = scheduled_generate(
            self.session,
            schedule,
            [row.prompt],
            decode=tok.decode,
            max_new_tokens=row.max_tokens,
            eos_id=tok.eod,
            vocab_size=tok.vocab_size,
        ).generation
        for token in out.tokens[0]:
            if row.on_token(token, None):
                row.finish("stop")
                return
        row.finish("stop" if out.stopped[0] else "length")


def _template_error(message: str) -> None:
    raise ApiError(f"the chat template refused the messages: {message}", param="messages")


def check_checkpoint(checkpoint: str | Path, interpolate: Sequence[float] = ()) -> None:
    """``ValueError`` for what the server cannot serve, read from the manifest (no weights): a
    damaged or missing checkpoint, a Hugging Face directory (no cached path), fractions of an
    exported one."""
    from megatron_elastic.eval.loading import budget_params, checkpoint_budgets

    kind, _ = checkpoint_budgets(checkpoint)
    if kind not in ("elastic", "exported"):
        raise ValueError(
            f"{str(checkpoint)!r} is a {kind} directory; the server decodes megatron "
            "checkpoints (elastic or exported) with the cached path"
        )
    if interpolate and kind != "elastic":
        raise ValueError("--interpolate needs an elastic checkpoint (its router interpolates)")
    if interpolate:
        budget_params(checkpoint, list(interpolate))  # the router refuses an untrained range


def load_models(
    checkpoint: str | Path,
    pgs,
    *,
    interpolate: Sequence[float] = (),
    tokenizer: str | Path | None = None,
) -> ServedModels:
    """Open ``checkpoint`` (elastic or exported) and its tokenizer for serving. ``ValueError``
    for a Hugging Face directory (no cached path) or a bad fraction, before weights are read
    where possible."""
    from megatron_elastic.checkpoint import manifest_model
    from megatron_elastic.eval import open_checkpoint
    from megatron_elastic.eval.loading import (
        load_eval_tokenizer,
        recorded_tokenizer,
    )

    check_checkpoint(checkpoint, interpolate)
    ckpt = open_checkpoint(checkpoint, pgs)
    tok = load_eval_tokenizer(tokenizer, ckpt.manifest, manifest_model(ckpt.manifest))
    template = find_chat_template(tokenizer or recorded_tokenizer(ckpt.manifest))
    return ServedModels(ckpt, tok, interpolate=interpolate, chat_template=template)
