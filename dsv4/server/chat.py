"""``POST /v1/chat/completions``: messages -> DeepSeek-V4 prompt -> engine -> reasoning, content, tool calls.

The prompt is the official V4 encoding (:mod:`dsv4.chat.encoding`), or the model folder's own chat
template when it ships one. Thinking is off unless the request turns it on (``chat_template_kwargs``
``thinking``/``enable_thinking``, or a ``reasoning_effort``): SGLang's default. When thinking is on or
tools are offered, the output is decoded with special tokens kept (the markers must reach the parser)
and split by the chat parsers into ``reasoning_content``, ``content`` and ``tool_calls``, also while
streaming; a choice that produced tool calls finishes with ``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dsv4.chat.encoding import ChatFormatError, encode_messages, prompt_ends_in_reasoning, resolve_chat_options
from dsv4.chat.parser import StreamingParser, parse_output
from dsv4.server.errors import APIError
from dsv4.server.logprobs import chat_logprobs
from dsv4.server.protocol import ChatCompletionRequest
from dsv4.server.responses import (
    SSE_DONE,
    SSE_HEADERS,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    DeltaMessage,
    FunctionCallDelta,
    FunctionCallOut,
    ToolCallDeltaOut,
    ToolCallOut,
    UsageInfo,
    dump,
    new_id,
    now,
    sse,
    sse_error,
)
from dsv4.server.serving import (
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


class _Chat:
    """What one chat request resolved to: its prompt, its parsing mode and its engine requests."""

    def __init__(self, ctx: ServingContext, req: ChatCompletionRequest) -> None:
        req.check_semantics()
        self.model = ctx.check_model(req.model)
        self.tools = [t.model_dump() for t in req.tools] if req.tools else None
        tool_choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice
        messages = [m.to_encoder() for m in req.messages]
        kwargs = req.chat_template_kwargs.model_dump(exclude_none=True) if req.chat_template_kwargs else None
        try:
            opts = resolve_chat_options(kwargs, req.reasoning_effort)
            if ctx.chat_template is not None:
                text = ctx.chat_template.render(messages, tools=self.tools, thinking=opts.thinking,
                                                reasoning_effort=opts.reasoning_effort, tool_choice=tool_choice,
                                                continue_final_message=req.continue_final_message)
            else:
                text = encode_messages(messages, self.tools, thinking=opts.thinking,
                                       reasoning_effort=opts.reasoning_effort, tool_choice=tool_choice,
                                       continue_final_message=req.continue_final_message)
        except ChatFormatError as e:
            raise APIError(f"cannot build the prompt: {e}", param=_format_param(str(e))) from None
        # the prompt text carries BOS as text already
        try:
            ids = ctx.engine.encode(text, add_bos=False)
        except ValueError as e:  # e.g. a byte vocabulary too small for text
            raise APIError(str(e), param="messages") from None
        prompt_ids = ctx.check_prompt_ids(ids, "messages")
        # The output starts inside <think> when the prompt leaves it open (thinking on, or a continued turn).
        self.thinking = prompt_ends_in_reasoning(text)
        # Tool calls are parsed only when the model was offered tools it may call.
        self.parse_tools = bool(self.tools) and tool_choice != "none"
        self.parse = self.thinking or opts.thinking or self.parse_tools
        skip = req.skip_special_tokens if req.skip_special_tokens is not None else not self.parse
        self.runs = plan_choices(ctx, req, [prompt_ids], req.logprobs_n, skip, "chatcmpl", "messages")
        self.prompt_tokens = len(prompt_ids)


def _format_param(message: str) -> str:
    for key in ("reasoning_effort", "thinking", "tool_choice", "tools"):
        if key in message:
            return key if key != "thinking" else "chat_template_kwargs.thinking"
    return "messages"


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request) -> Response:
    started = time.perf_counter()
    chat = _Chat(ctx, req)
    if req.stream:
        return StreamingResponse(_stream(ctx, req, chat, started), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    try:
        acc = await unless_disconnected(raw, lambda: accumulate(ctx, chat.runs, started))
    except ClientDisconnected:
        log.info("chat model=%s client disconnected; request aborted", chat.model)
        return Response(status_code=499)
    choices = []
    for run in chat.runs:
        a = acc[run.index]
        message, reason = _message(chat, a.text, a.finish_reason)
        lp = (chat_logprobs(ctx.speller, a.token_ids, a.logprobs, a.top_logprobs)
              if a.logprobs is not None else None)
        choices.append(ChatChoice(index=run.index, message=message, logprobs=lp, finish_reason=reason))
    completion = sum(a.completion_tokens for a in acc.values())
    body = ChatCompletionResponse(id=new_id("chatcmpl"), created=now(), model=chat.model, choices=choices,
                                  usage=UsageInfo.of(chat.prompt_tokens, completion))
    log_request("chat", chat.model, len(chat.runs), chat.prompt_tokens, completion,
                [c.finish_reason for c in choices], started)
    return JSONResponse(dump(body))


def _message(chat: _Chat, text: str, reason: str | None) -> tuple[AssistantMessage, str | None]:
    if not chat.parse:
        return AssistantMessage(content=text, reasoning_content=None, tool_calls=None), reason
    parsed = parse_output(text, thinking=chat.thinking, tools=chat.parse_tools, finished=reason or "stop")
    calls = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
             for c in parsed.tool_calls]
    msg = AssistantMessage(content=parsed.content if parsed.content or not calls else None,
                           reasoning_content=parsed.reasoning_content or None, tool_calls=calls or None)
    return msg, _finish(reason, bool(calls))


def _finish(reason: str | None, called: bool) -> str | None:
    # a call cut off by the length limit is not a finished call: "length" tells the client so
    return "tool_calls" if called and reason == "stop" else reason


def _delta(parsed: Any) -> DeltaMessage | None:
    """A ParsedDelta as a stream delta (None when it carries nothing)."""
    d = DeltaMessage()
    if parsed.reasoning:
        d.reasoning_content = parsed.reasoning
    if parsed.content:
        d.content = parsed.content
    if parsed.tool_calls:
        d.tool_calls = [
            ToolCallDeltaOut(index=c.index, id=c.id, type="function" if c.id else None,
                             function=FunctionCallDelta(name=c.name, arguments=c.arguments))
            for c in parsed.tool_calls
        ]
    return d if d.model_fields_set else None


async def _stream(ctx: ServingContext, req: ChatCompletionRequest, chat: _Chat, started: float) -> AsyncIterator[str]:
    rid, created = new_id("chatcmpl"), now()

    def chunk(index: int, delta: DeltaMessage, logprobs: ChatLogprobs | None = None,
              finish: str | None = None) -> str:
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
        return sse(ChatCompletionChunk(id=rid, created=created, model=chat.model, choices=[choice], **usage_null))

    # OpenAI: with include_usage every chunk carries "usage": null and one last chunk the totals
    usage_null = {"usage": None} if req.include_usage else {}

    parsers = {r.index: StreamingParser(chat.thinking, chat.parse_tools) for r in chat.runs} if chat.parse else {}
    called: set[int] = set()
    completion: dict[int, int] = {}
    reasons: list[str | None] = []
    for run in chat.runs:
        yield chunk(run.index, DeltaMessage(role="assistant", content=""))
    stream = merge_choices(ctx, chat.runs, started)
    try:
        async with contextlib.aclosing(stream):
            async for index, d in stream:
                completion[index] = d.completion_tokens
                lp = (chat_logprobs(ctx.speller, d.token_ids, d.logprobs, d.top_logprobs)
                      if d.logprobs is not None and d.token_ids else None)
                parsed = [parsers[index].feed(d.text)] if chat.parse else []
                if d.finish_reason is not None and chat.parse:
                    parsed.append(parsers[index].finish(d.finish_reason))
                deltas = [x for x in (_delta(p) for p in parsed) if x is not None] if chat.parse else (
                    [DeltaMessage(content=d.text)] if d.text else [])
                if any(x.tool_calls for x in deltas):
                    called.add(index)
                for i, delta in enumerate(deltas or ([DeltaMessage()] if lp is not None else [])):
                    yield chunk(index, delta, lp if i == 0 else None)
                if d.finish_reason is not None:
                    if getattr(d, "error", None):
                        yield sse_error(f"the engine aborted the request: {d.error}")
                    reasons.append(_finish(d.finish_reason, index in called))
                    yield chunk(index, DeltaMessage(), finish=reasons[-1])
    except Exception as e:  # the response has started: report in-band, then end the stream cleanly
        err = engine_error(e)
        if err is None:
            log.exception("chat stream failed")
        yield sse_error(err.message if err else "internal server error (see the server log)")
    if req.include_usage:
        usage = UsageInfo.of(chat.prompt_tokens, sum(completion.values()))
        yield sse(ChatCompletionChunk(id=rid, created=created, model=chat.model, choices=[], usage=usage))
    yield SSE_DONE
    log_request("chat", chat.model, len(chat.runs), chat.prompt_tokens, sum(completion.values()), reasons, started)
