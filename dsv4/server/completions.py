"""``POST /v1/completions``: raw prompts (text or token ids, one or many) -> engine -> text.

Each prompt gets ``n`` choices; choice ``i`` of prompt ``p`` has index ``p * n + i``, as in OpenAI.
Text prompts are tokenized with BOS; token-id prompts are used as given.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dsv4.server.errors import APIError
from dsv4.server.logprobs import completion_logprobs
from dsv4.server.protocol import CompletionRequest
from dsv4.server.responses import (
    SSE_DONE,
    SSE_HEADERS,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    UsageInfo,
    dump,
    new_id,
    now,
    sse,
    sse_error,
)
from dsv4.server.serving import (
    ChoiceRun,
    ClientDisconnected,
    ServingContext,
    accumulate,
    engine_error,
    log_request,
    merge_choices,
    plan_choices,
    unless_disconnected,
)

log = logging.getLogger("dsv4.server")


def _plan(ctx: ServingContext, req: CompletionRequest) -> tuple[str, list[ChoiceRun], int]:
    req.check_semantics()
    model = ctx.check_model(req.model)
    prompts = []
    for p in req.prompts():
        if isinstance(p, str):
            try:
                ids = ctx.engine.encode(p, add_bos=True)
            except ValueError as e:  # e.g. a byte vocabulary too small for text
                raise APIError(str(e), param="prompt") from None
        else:
            ids = p
        prompts.append(ctx.check_prompt_ids(ids))
    skip = True if req.skip_special_tokens is None else req.skip_special_tokens
    runs = plan_choices(ctx, req, prompts, req.logprobs, skip, "cmpl")
    return model, runs, sum(len(p) for p in prompts)


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw: Request) -> Response:
    started = time.perf_counter()
    model, runs, prompt_tokens = _plan(ctx, req)
    if req.stream:
        return StreamingResponse(_stream(ctx, req, model, runs, prompt_tokens, started),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        acc = await unless_disconnected(raw, lambda: accumulate(ctx, runs, started))
    except ClientDisconnected:
        log.info("completion model=%s client disconnected; request aborted", model)
        return Response(status_code=499)
    choices = []
    for run in runs:
        a = acc[run.index]
        lp = None
        if a.logprobs is not None:
            lp, _ = completion_logprobs(ctx.speller, a.token_ids, a.logprobs, a.top_logprobs, 0)
        choices.append(CompletionChoice(index=run.index, text=a.text, logprobs=lp, finish_reason=a.finish_reason))
    completion = sum(a.completion_tokens for a in acc.values())
    body = CompletionResponse(id=new_id("cmpl"), created=now(), model=model, choices=choices,
                              usage=UsageInfo.of(prompt_tokens, completion))
    log_request("completion", model, len(runs), prompt_tokens, completion, [c.finish_reason for c in choices],
                started)
    return JSONResponse(dump(body))


async def _stream(ctx: ServingContext, req: CompletionRequest, model: str, runs: list[ChoiceRun],
                  prompt_tokens: int, started: float) -> AsyncIterator[str]:
    rid, created = new_id("cmpl"), now()
    usage_null = {"usage": None} if req.include_usage else {}
    offsets = {r.index: 0 for r in runs}
    completion: dict[int, int] = {}
    reasons: list[str | None] = []
    stream = merge_choices(ctx, runs, started)
    try:
        async with contextlib.aclosing(stream):
            async for index, d in stream:
                completion[index] = d.completion_tokens
                lp: CompletionLogprobs | None = None
                if d.logprobs is not None:
                    lp, offsets[index] = completion_logprobs(ctx.speller, d.token_ids, d.logprobs, d.top_logprobs,
                                                             offsets[index])
                if not d.text and d.finish_reason is None and not d.token_ids:
                    continue
                if d.finish_reason is not None:
                    if getattr(d, "error", None):
                        yield sse_error(f"the engine aborted the request: {d.error}")
                    reasons.append(d.finish_reason)
                choice = CompletionChoice(index=index, text=d.text, logprobs=lp, finish_reason=d.finish_reason)
                yield sse(CompletionResponse(id=rid, created=created, model=model, choices=[choice], **usage_null))
    except Exception as e:  # the response has started: report in-band, then end the stream cleanly
        err = engine_error(e)
        if err is None:
            log.exception("completion stream failed")
        yield sse_error(err.message if err else "internal server error (see the server log)")
    if req.include_usage:
        usage = UsageInfo.of(prompt_tokens, sum(completion.values()))
        yield sse(CompletionResponse(id=rid, created=created, model=model, choices=[], usage=usage))
    yield SSE_DONE
    log_request("completion", model, len(runs), prompt_tokens, sum(completion.values()), reasons, started)
