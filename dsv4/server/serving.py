"""What both OpenAI endpoints share: the serving context, turning a request into engine requests (one per
choice), running them side by side, and cancelling them when the client goes away.

Cancellation has one mechanism: closing the engine's ``generate`` iterator aborts that request and frees
its cache. :func:`merge_choices` closes every choice's iterator when it is closed itself, which happens
when a streaming response is cancelled (Starlette cancels it on ``http.disconnect``) or when
:func:`unless_disconnected` sees the client of a non-streaming request disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from dsv4.engine.async_engine import EngineDeadError
from dsv4.engine.sampling_params import SamplingParams
from dsv4.server.errors import APIError
from dsv4.server.logprobs import TokenSpeller
from dsv4.server.metrics import ServerMetrics
from dsv4.server.protocol import GenerationRequest

log = logging.getLogger("dsv4.server")
T = TypeVar("T")


@dataclass
class ServingContext:
    """Everything a handler needs: the engine and the server's settings."""

    engine: Any  # dsv4.engine.async_engine.AsyncEngine, or anything with its interface
    model_names: tuple[str, ...]
    metrics: ServerMetrics
    chat_template: Any = None  # a ChatTemplate shipped with the model, or None for the official encoder
    speller: TokenSpeller = field(init=False)

    def __post_init__(self) -> None:
        self.speller = TokenSpeller(self.engine.tokenizer)

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def check_model(self, name: str | None) -> str:
        """The served name a request asked for (None: the default); 404 for any other."""
        if name is None or name in self.model_names:
            return name or self.model_name
        raise APIError(f"the model `{name}` does not exist; this server serves {', '.join(self.model_names)}",
                       status=404, type="not_found_error", param="model", code="model_not_found")

    def check_prompt_ids(self, ids: Sequence[int], param: str = "prompt") -> list[int]:
        vocab = self.engine.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(f"token ids out of range [0, {vocab}): {bad[:5]}", param=param)
        if not ids:
            raise APIError("the prompt is empty", param=param)
        return list(ids)


@dataclass
class ChoiceRun:
    """One engine request: choice ``index`` of a response."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str


def plan_choices(ctx: ServingContext, req: GenerationRequest, prompts: Sequence[list[int]],
                 logprobs: int | None, skip_special_tokens: bool, prefix: str,
                 prompt_param: str = "prompt") -> list[ChoiceRun]:
    """``n`` engine requests per prompt (choice index ``prompt * n + j``), each checked by the engine first,
    so a bad request fails with a 400 before anything starts."""
    base = uuid.uuid4().hex
    runs = []
    limit = ctx.engine.max_model_len
    for p, ids in enumerate(prompts):
        if len(ids) >= limit:  # said here because only here is it certain that the prompt is at fault
            raise APIError(f"the prompt is {len(ids)} tokens, but the context holds {limit} (max_model_len), "
                           "including at least one generated token", param=prompt_param,
                           code="context_length_exceeded")
        for j in range(req.n):
            try:
                params = req.sampling_params(j, len(ids), ctx.engine.max_model_len, logprobs, skip_special_tokens)
                ctx.engine.check_request(ids, params)
            except ValueError as e:
                raise APIError(str(e), param=_param_of(str(e))) from None
            runs.append(ChoiceRun(p * req.n + j, ids, params, f"{prefix}-{base}-{p * req.n + j}"))
    return runs


def _param_of(message: str) -> str | None:
    """Best guess of the request field an engine error is about (SamplingParams names its field)."""
    lowered = message.lower()
    for key, param in (("max_new_tokens", "max_tokens"), ("context", "max_tokens"), ("max_tokens", "max_tokens"),
                       ("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                       ("min_p", "min_p"), ("seed", "seed"), ("stop_token_ids", "stop_token_ids"),
                       ("stop", "stop"), ("logprobs", "logprobs"), ("prompt", "prompt")):
        if key in lowered:
            return param
    return None


_END = object()


async def merge_choices(ctx: ServingContext, runs: Sequence[ChoiceRun],
                        started: float | None = None) -> AsyncIterator[tuple[int, Any]]:
    """Run the choices concurrently and yield ``(choice index, RequestDelta)`` as outputs arrive.

    Closing this iterator (or an error in one choice) cancels every choice; each pump closes its engine
    iterator on the way out, which aborts the request in the engine. ``started`` (``time.perf_counter()``
    at the request's arrival) is where time to first token counts from.
    """
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(run: ChoiceRun) -> None:
        timer = ctx.metrics.timer(started)
        try:
            gen = ctx.engine.generate(run.prompt_ids, run.params, request_id=run.request_id)
            async with contextlib.aclosing(gen):
                async for delta in gen:
                    timer.tokens(len(delta.token_ids))
                    queue.put_nowait((run.index, delta))
            timer.done()
            queue.put_nowait((run.index, _END))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # handed to the consumer, which reports it
            queue.put_nowait((run.index, e))

    tasks = [asyncio.create_task(pump(r)) for r in runs]
    try:
        left = len(tasks)
        while left:
            index, item = await queue.get()
            if item is _END:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_disconnected(request: Request) -> None:
    # NOTE: the body has been read already, so the next ASGI message is http.disconnect: either the client
    # left, or the response was sent (then this task is cancelled first).
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


async def unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work()``; cancel it (aborting its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work())
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watch.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


@dataclass
class Accumulated:
    """One choice's whole output, gathered from its deltas (non-streaming responses)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None

    def add(self, d: Any) -> None:
        self.text += d.text
        self.token_ids += d.token_ids
        if d.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(d.logprobs)
        if d.top_logprobs is not None:
            self.top_logprobs = (self.top_logprobs or []) + list(d.top_logprobs)
        self.completion_tokens = d.completion_tokens
        if d.finish_reason is not None:
            self.finish_reason, self.error = d.finish_reason, getattr(d, "error", None)


def engine_error(e: Exception) -> APIError | None:
    """The HTTP error for an exception out of the engine's ``generate`` (None: a bug, let it surface)."""
    if isinstance(e, EngineDeadError):
        return APIError(f"the engine is not available: {e}", status=503, type="server_error",
                        code="engine_unavailable")
    if isinstance(e, ValueError):  # a check the engine made at admission, after ours passed
        return APIError(str(e))
    return None


async def accumulate(ctx: ServingContext, runs: Sequence[ChoiceRun], started: float) -> dict[int, Accumulated]:
    """Every choice's output, by choice index."""
    acc = {r.index: Accumulated() for r in runs}
    stream = merge_choices(ctx, runs, started)
    try:
        async with contextlib.aclosing(stream):
            async for index, d in stream:
                acc[index].add(d)
    except Exception as e:
        err = engine_error(e)
        if err is None:
            raise
        raise err from None
    for a in acc.values():
        if a.error is not None:  # the engine gave up on this request (not a client cancel)
            raise APIError(f"the engine aborted the request: {a.error}", status=500, type="server_error")
    return acc


def log_request(kind: str, model: str, n: int, prompt_tokens: int, completion_tokens: int,
                reasons: Sequence[str | None], started: float) -> None:
    """The one INFO line per request."""
    log.info("%s model=%s n=%d prompt_tokens=%d completion_tokens=%d finish=%s %.2fs", kind, model, n,
             prompt_tokens, completion_tokens, ",".join(sorted({str(r) for r in reasons})),
             time.perf_counter() - started)
