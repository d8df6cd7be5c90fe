"""The server's model thread: requests for the same budget that arrive within a short window run
as one batch (:func:`megatron_elastic.serving.engine.decode_batch`), one batch at a time.

The HTTP event loop never runs the model: it tokenizes a request into a :class:`Job` (one
:class:`Choice` per prompt), hands it to :meth:`Scheduler.submit` and awaits the job's events
(text deltas, log-probabilities, finish reasons) which the model thread posts back with
``loop.call_soon_threadsafe``. The worker takes the oldest waiting job, waits up to
``window_s`` after its arrival for more jobs of the same budget (up to ``max_batch`` prompts
whose longest prompt plus largest token limit fit the model), and decodes them together; jobs
of other budgets wait for the next batch. This is batching per arrival window, not continuous
batching: a request that arrives while a batch decodes joins the next one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_elastic.data.tokenizers import Tokenizer
from megatron_elastic.serving.engine import TokenLogprob, batch_capacity
from megatron_elastic.serving.generate import SamplingConfig

__all__ = ["BatchRecord", "Choice", "Job", "Scheduler"]

_REPLACEMENT = "\ufffd"  # what a byte-level tokenizer decodes an incomplete UTF-8 sequence to


class Choice:
    """One prompt of a request as the decoder sees it (:class:`~.engine.DecodeRow`): turns its
    tokens into text, ends it at a stop string, and posts what a client may see as events
    ``{"index", "text", "tokens", "logprobs", "finish_reason"?}`` to its job. Text that could
    still become a stop string, or an incomplete UTF-8 character, is held back until it cannot."""

    def __init__(
        self,
        job: Job,
        index: int,
        prompt: Sequence[int],
        *,
        max_tokens: int,
        sampling: SamplingConfig,
        top_logprobs: int | None,
        echo: bool,
        stop: Sequence[str],
        tokenizer: Tokenizer,
    ) -> None:
        self.job, self.index, self.prompt = job, index, list(prompt)
        self.max_tokens, self.sampling = max_tokens, sampling
        self.top_logprobs, self.echo = top_logprobs, echo
        self.stop, self.tokenizer = [s for s in stop if s], tokenizer
        self.tokens: list[int] = []
        self._text = ""
        self._sent = 0  # characters of _text already posted

    @property
    def cancelled(self) -> bool:
        return self.job.cancelled

    def on_prompt(self, logprobs: list[TokenLogprob | None]) -> None:
        self.job.post({"index": self.index, "prompt_logprobs": logprobs})

    def on_token(self, token: int, logprob: TokenLogprob | None) -> bool:
        self.tokens.append(token)
        before = len(self._text)
        self._text = self.tokenizer.decode(self.tokens)
        hit = self._find_stop(before)
        if hit is not None:
            self._text = self._text[:hit]
        event = {"index": self.index, "text": self._release(final=hit is not None)}
        event.update(tokens=[token], logprobs=[logprob])
        self.job.post(event)
        return hit is not None

    def finish(self, reason: str) -> None:
        self.job.post(
            {"index": self.index, "text": self._release(final=True), "finish_reason": reason}
        )

    def _find_stop(self, before: int) -> int | None:
        """Where the earliest stop string starts in the text, if one ends in the new part."""
        hits = [
            at for s in self.stop if (at := self._text.find(s, max(0, before - len(s) + 1))) >= 0
        ]
        return min(hits) if hits else None

    def _release(self, final: bool) -> str:
        end = len(self._text)
        if not final:
            while end > self._sent and self._text[end - 1] == _REPLACEMENT:
                end -= 1
            for s in self.stop:  # keep back a tail that may grow into a stop string
                for n in range(min(len(s) - 1, end - self._sent), 0, -1):
                    if self._text[end - n : end] == s[:n]:
                        end -= n
                        break
        delta, self._sent = self._text[self._sent : end], max(self._sent, end)
        return delta


@dataclass(eq=False)
class Job:
    """One request: its budget, its choices, and the queue its events reach the event loop by."""

    budget: str | float
    loop: asyncio.AbstractEventLoop
    choices: list[Choice] = field(default_factory=list)
    cancelled: bool = False
    """Set when the client has gone or the server stops: its rows end at the next step."""
    arrived: float = field(default_factory=time.monotonic)
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def post(self, event: dict[str, Any]) -> None:
        """From the model thread: hand ``event`` to the waiting request."""
        self.loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def fail(self, error: BaseException) -> None:
        self.post({"error": error})

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The job's events until every choice has finished; re-raises a failure."""
        open_choices = len(self.choices)
        while open_choices:
            event = await self._queue.get()
            if "error" in event:
                raise event["error"]
            open_choices -= "finish_reason" in event
            yield event


@dataclass(frozen=True)
class BatchRecord:
    """One batch the worker ran (kept in ``Scheduler.batches``: what tests and benchmarks see)."""

    budget: str | float
    rows: int
    tokens: int
    seconds: float


class Scheduler:
    """One worker thread that runs ``run_batch(budget, choices)`` over batches of waiting jobs."""

    def __init__(
        self,
        run_batch: Callable[[str | float, list[Choice]], None],
        *,
        capacity: int,
        window_s: float = 0.01,
        max_batch: int = 16,
    ) -> None:
        if window_s < 0:
            raise ValueError(f"batch window must be >= 0 seconds, got {window_s}")
        if max_batch < 1:
            raise ValueError(f"max batch must be >= 1 prompt, got {max_batch}")
        self.run_batch, self.capacity = run_batch, capacity
        self.window_s, self.max_batch = window_s, max_batch
        self.batches: list[BatchRecord] = []
        self._pending: list[Job] = []
        self._running: list[Job] = []
        self._stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._pending.append(job)
            self._cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, cancel the waiting ones and the running batch, join the thread."""
        with self._cond:
            self._stopping = True
            for job in self._pending:
                job.cancelled = True
                job.fail(RuntimeError("the server is shutting down"))
            self._pending.clear()
            for job in self._running:
                job.cancelled = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._pending[0]
            deadline = first.arrived + self.window_s
            while not self._stopping and (left := deadline - time.monotonic()) > 0:
                same = sum(len(j.choices) for j in self._pending if j.budget == first.budget)
                if same >= self.max_batch:
                    break
                self._cond.wait(left)
            batch: list[Job] = []
            rows: list[Choice] = []
            for job in self._pending:
                if job.budget != first.budget:
                    continue
                grown = rows + job.choices
                if batch and (len(grown) > self.max_batch or batch_capacity(grown) > self.capacity):
                    continue
                batch.append(job)
                rows = grown
            self._pending = [j for j in self._pending if all(j is not b for b in batch)]
            self._running = batch
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            rows = [c for job in batch for c in job.choices]
            start = time.perf_counter()
            try:
                self.run_batch(batch[0].budget, rows)
            except Exception as error:  # a bug: the requests get a 500, the server keeps serving
                for job in batch:
                    job.fail(error)
            produced = sum(len(c.tokens) for c in rows)
            seconds = time.perf_counter() - start
            self.batches.append(BatchRecord(batch[0].budget, len(rows), produced, seconds))
