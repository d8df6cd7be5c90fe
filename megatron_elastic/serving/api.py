"""An OpenAI-compatible HTTP server over the cached serving path: what ``tools/serve.py`` runs.

    serve("runs/quickstart/stage2/step_0000040", port=8000, interpolate=[0.6])

Every trained budget of the elastic checkpoint is a model, ``elastic@<budget>`` (``elastic@full``,
``elastic@75%``, ``elastic@6B``), and so is each ``interpolate`` fraction (``elastic@0.6``,
router interpolation: untrained). All of them decode from the one loaded copy of the weights
(:class:`~megatron_elastic.serving.ServingSession`). Endpoints: ``GET /v1/models``, ``POST
/v1/completions`` (text or token-id prompts, ``echo`` and ``logprobs`` for loglikelihood
scoring), ``POST /v1/chat/completions`` (the tokenizer's chat template), ``GET /health``.
Requests are tokenized on the event loop and decoded on one model thread that batches requests
of the same budget (:mod:`.scheduler`); bad requests get OpenAI's error objects.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from megatron_elastic.serving.api_format import (
    ChoiceResult,
    chat_logprobs,
    completion_logprobs,
    new_id,
    now,
    text_length,
    usage,
)
from megatron_elastic.serving.api_models import ServedModels, check_checkpoint, load_models
from megatron_elastic.serving.api_schema import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
)
from megatron_elastic.serving.generate import SamplingConfig, check_lengths
from megatron_elastic.serving.schedule import BudgetSchedule
from megatron_elastic.serving.scheduler import Choice, Job, Scheduler

__all__ = ["ServedModels", "create_app", "load_models", "serve"]


def _sampling(request: CompletionRequest | ChatCompletionRequest) -> SamplingConfig:
    seed = request.seed if request.seed is not None else secrets.randbits(62)
    return SamplingConfig(request.temperature, request.top_p, seed)


def _budget(
    models: ServedModels, request: CompletionRequest | ChatCompletionRequest
) -> str | float | BudgetSchedule:
    """The budget ``request`` runs at, or its :class:`BudgetSchedule` (``budget_schedule``)."""
    budget = models.resolve(request.model)
    phases = request.budget_schedule
    if phases is None:
        return budget
    if request.temperature != 0:
        raise ApiError("budget_schedule decodes greedily: send temperature 0", param="temperature")
    if getattr(request, "logprobs", None) or getattr(request, "echo", False):
        raise ApiError("budget_schedule returns no log-probabilities", param="logprobs")
    extra = {"marker": phases["marker"]} if "marker" in phases else {}
    try:
        return BudgetSchedule(
            think=models.resolve(phases["think"], "budget_schedule.think"),
            answer=models.resolve(phases["answer"], "budget_schedule.answer"),
            **extra,
        )
    except ValueError as e:  # an empty marker
        raise ApiError(str(e), param="budget_schedule.marker") from e


def _check(models: ServedModels, ids: list[list[int]], max_tokens: int, param: str) -> None:
    try:
        check_lengths(ids, max_tokens, models.max_sequence_length)
    except ValueError as e:
        code = "context_length_exceeded" if "max_sequence_length" in str(e) else None
        raise ApiError(str(e), param=param, code=code) from e


def _job(
    models: ServedModels,
    budget: str | float | BudgetSchedule,
    prompts: list[list[int]],
    *,
    max_tokens: int,
    request: CompletionRequest | ChatCompletionRequest,
    top_logprobs: int | None,
    echo: bool,
) -> Job:
    job = Job(budget, asyncio.get_running_loop())
    sampling = _sampling(request)
    job.choices = [
        Choice(
            job,
            i,
            ids,
            max_tokens=max_tokens,
            sampling=sampling,
            top_logprobs=top_logprobs,
            echo=echo,
            stop=request.stops,
            tokenizer=models.tokenizer,
        )
        for i, ids in enumerate(prompts)
    ]
    return job


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


def create_app(
    models: ServedModels, *, batch_window_s: float = 0.01, max_batch: int = 16
) -> FastAPI:
    """The FastAPI application serving ``models`` (its model thread runs while the app's
    lifespan does: ``with TestClient(app)``, or under uvicorn)."""
    scheduler = Scheduler(
        models.run_batch,
        capacity=models.max_sequence_length,
        window_s=batch_window_s,
        max_batch=max_batch,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop(timeout=30)

    app = FastAPI(title="megatron-elastic", lifespan=lifespan)
    app.state.models, app.state.scheduler = models, scheduler

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        where = f"{param}: " if param else ""
        return JSONResponse(
            error_body(f"{where}{message}", "invalid_request_error", param), status_code=400
        )

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(error.detail), "invalid_request_error"), status_code=error.status_code
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {error!r}", "server_error"), 500)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    def _card(name: str) -> dict[str, Any]:
        budget = models.budgets[name]
        return {
            "id": name,
            "object": "model",
            "created": models.created,
            "owned_by": "megatron-elastic",
            "budget": budget,
            "params": models.params[name],
            "interpolated": not isinstance(budget, str),
            "max_model_len": models.max_sequence_length,
        }

    # vLLM's tokenizer endpoints: lm-evaluation-harness's "remote" tokenizer backend uses them to
    # score log-likelihoods against a server whose tokenizer it does not have
    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        tok = models.tokenizer
        return {
            "eos_token": tok.decode([tok.eod]),
            "bos_token": None,
            "pad_token": None,
            "chat_template": models.chat_template,
            "model_max_length": models.max_sequence_length,
            "vocab_size": tok.vocab_size,
        }

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> dict[str, Any]:
        tokens = models.tokenizer.encode(request.prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": models.max_sequence_length}

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> dict[str, str]:
        _, ids = models.encode(request.tokens, "tokens")  # ids outside the vocabulary: an error
        return {"prompt": models.tokenizer.decode(ids)}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_card(n) for n in models.budgets]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        models.resolve(name)
        return _card(name)

    def _submit(job: Job) -> None:
        try:
            scheduler.submit(job)
        except RuntimeError as e:
            raise ApiError(str(e), status=503, kind="server_error") from e

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        budget = _budget(models, request)
        raw = request.prompt
        many = isinstance(raw, list) and raw and not isinstance(raw[0], int)
        encoded = [models.encode(p, "prompt") for p in (raw if many else [raw])]
        ids = [i for _, i in encoded]
        max_tokens = request.max_tokens
        if max_tokens is None:  # null: up to the context
            max_tokens = max(models.max_sequence_length - max(map(len, ids)), 0)
        _check(models, ids, max_tokens, "prompt")
        job = _job(
            models,
            budget,
            ids,
            max_tokens=max_tokens,
            request=request,
            top_logprobs=request.logprobs,
            echo=request.echo,
        )
        results = [ChoiceResult(i, text) for text, i in encoded]
        _submit(job)
        meta = {"id": new_id("cmpl"), "created": now(), "model": request.model}

        def choice(r: ChoiceResult, index: int, event: dict[str, Any] | None) -> dict[str, Any]:
            """A whole choice (event None) or the part of it that ``event`` adds."""
            lp = None
            if event is None:
                text = (r.prompt_text if request.echo else "") + r.text
                if request.logprobs is not None:
                    tokens, entries = list(r.tokens), list(r.logprobs)
                    if request.echo:
                        tokens, entries = r.prompt + tokens, (r.prompt_logprobs or []) + entries
                    lp = completion_logprobs(models.tokenizer, tokens, entries)
                return {
                    "index": index,
                    "text": text,
                    "logprobs": lp,
                    "finish_reason": r.finish_reason,
                }
            if "prompt_logprobs" in event:
                text = r.prompt_text
                if request.logprobs is not None:
                    lp = completion_logprobs(models.tokenizer, r.prompt, event["prompt_logprobs"])
            else:
                text = event.get("text", "")
                if request.logprobs is not None and event.get("tokens"):
                    # text_offset continues the choice's text (with the echoed prompt) as the
                    # whole response counts it: from the tokens already sent (r has this event)
                    before = r.tokens[: len(r.tokens) - len(event["tokens"])]
                    if request.echo:
                        before = r.prompt + before
                    at = text_length(models.tokenizer, before)
                    lp = completion_logprobs(
                        models.tokenizer, event["tokens"], event["logprobs"], offset=at
                    )
            reason = event.get("finish_reason")
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}

        if not request.stream:
            try:
                async for event in job.events():
                    results[event["index"]].add(event)
            finally:
                job.cancelled = True
            return {
                **meta,
                "object": "text_completion",
                "choices": [choice(r, i, None) for i, r in enumerate(results)],
                "usage": usage(results),
            }

        async def stream() -> AsyncIterator[str]:
            try:
                async for event in job.events():
                    r = results[event["index"]]
                    r.add(event)
                    body = choice(r, event["index"], event)
                    if body["text"] or body["logprobs"] or body["finish_reason"]:
                        yield _sse({**meta, "object": "text_completion", "choices": [body]})
                if request.stream_options and request.stream_options.include_usage:
                    yield _sse(
                        {
                            **meta,
                            "object": "text_completion",
                            "choices": [],
                            "usage": usage(results),
                        }
                    )
            except Exception as e:  # the batch failed midway: tell the client, end the stream
                yield _sse(error_body(f"internal error: {e!r}", "server_error"))
            finally:
                job.cancelled = True
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest):
        budget = _budget(models, request)
        messages = [{"role": m.role, "content": m.text} for m in request.messages]
        text, ids = models.encode(models.render_chat(messages), "messages")
        limit = request.token_limit
        max_tokens = limit if limit is not None else max(models.max_sequence_length - len(ids), 1)
        _check(models, [ids], max_tokens, "messages")
        if request.top_logprobs is not None and not request.logprobs:
            raise ApiError("top_logprobs needs logprobs: true", param="top_logprobs")
        top = (request.top_logprobs or 0) if request.logprobs else None
        job = _job(
            models,
            budget,
            [ids],
            max_tokens=max_tokens,
            request=request,
            top_logprobs=top,
            echo=False,
        )
        result = ChoiceResult(ids, text)
        _submit(job)
        meta = {"id": new_id("chatcmpl"), "created": now(), "model": request.model}

        def logprobs(entries) -> dict[str, Any] | None:
            return chat_logprobs(models.tokenizer, entries, top) if request.logprobs else None

        if not request.stream:
            try:
                async for event in job.events():
                    result.add(event)
            finally:
                job.cancelled = True
            return {
                **meta,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "logprobs": logprobs(result.logprobs),
                        "finish_reason": result.finish_reason,
                    }
                ],
                "usage": usage([result]),
            }

        async def stream() -> AsyncIterator[str]:
            chunk = {**meta, "object": "chat.completion.chunk"}
            first = {"role": "assistant", "content": ""}
            yield _sse(
                {
                    **chunk,
                    "choices": [
                        {"index": 0, "delta": first, "logprobs": None, "finish_reason": None}
                    ],
                }
            )
            try:
                async for event in job.events():
                    result.add(event)
                    delta = {"content": event["text"]} if event.get("text") else {}
                    lp = logprobs(event["logprobs"]) if event.get("tokens") else None
                    reason = event.get("finish_reason")
                    if delta or lp or reason:
                        body = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}
                        yield _sse({**chunk, "choices": [body]})
                if request.stream_options and request.stream_options.include_usage:
                    yield _sse({**chunk, "choices": [], "usage": usage([result])})
            except Exception as e:
                yield _sse(error_body(f"internal error: {e!r}", "server_error"))
            finally:
                job.cancelled = True
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def serve(
    checkpoint: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    interpolate: Sequence[float] = (),
    tokenizer: str | None = None,
    batch_window: float = 0.01,
    max_batch: int = 16,
    shutdown_timeout: float = 10.0,
    log: Callable[[str], None] = print,
) -> None:
    """Serve ``checkpoint`` on ``host:port`` until SIGTERM or SIGINT, then finish the requests in
    flight (for up to ``shutdown_timeout`` seconds, then cancel them) and return. Requests for
    one budget that arrive within ``batch_window`` seconds decode as one batch of up to
    ``max_batch`` prompts."""
    import uvicorn

    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups

    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    if shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0 seconds, got {shutdown_timeout}")
    start = time.perf_counter()
    check_checkpoint(checkpoint, interpolate)
    pgs = init_process_groups(ParallelConfig())
    try:
        models = load_models(checkpoint, pgs, interpolate=interpolate, tokenizer=tokenizer)
        app = create_app(models, batch_window_s=batch_window, max_batch=max_batch)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=shutdown_timeout,
        )
        server = uvicorn.Server(config)
        # uvicorn shuts down gracefully on SIGTERM/SIGINT and then re-raises the signal to the
        # handler that was there before it: a no-op one, so a graceful shutdown exits 0
        previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
        log(
            f"serving {', '.join(models.budgets)} on http://{host}:{port}/v1 "
            f"(loaded in {time.perf_counter() - start:.1f} s)"
        )
        try:
            server.run()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        log("server stopped")
    finally:
        destroy_process_groups()
