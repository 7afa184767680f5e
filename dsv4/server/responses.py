"""OpenAI response bodies and stream chunks (pydantic v2), plus the helpers that serialise them.

Serialisation uses ``exclude_unset``: a field appears when the server set it, even to null
(``finish_reason: null`` in a stream chunk), and stays out otherwise (an empty ``delta`` is ``{}``).
Fields with a non-null default (``object``, ``type``, lists) count as set, so they always appear.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_core import PydanticUndefined


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class _Out(BaseModel):
    def model_post_init(self, context: Any, /) -> None:
        # NOTE: exclude_unset would drop constants such as `object: "chat.completion"`; mark them set.
        for name, f in type(self).model_fields.items():
            if f.default_factory is not None or f.default not in (None, PydanticUndefined):
                self.model_fields_set.add(name)


class UsageInfo(_Out):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


# ---- logprobs ---------------------------------------------------------------------------------------------
class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Out):
    content: list[TokenLogprob] | None = None


class CompletionLogprobs(_Out):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


# ---- chat -------------------------------------------------------------------------------------------------
class FunctionCallOut(_Out):
    name: str
    arguments: str


class ToolCallOut(_Out):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class FunctionCallDelta(_Out):
    name: str | None = None
    arguments: str | None = None


class ToolCallDeltaOut(_Out):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class DeltaMessage(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


# ---- completions ------------------------------------------------------------------------------------------
class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Out):
    """Also the shape of each stream chunk (OpenAI uses one object type for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---- models -----------------------------------------------------------------------------------------------
class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dsv4"
    max_model_len: int | None = None


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Out):
    error: ErrorInfo


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict of a response; fields never set are left out, fields set to null are kept."""
    return model.model_dump(mode="json", exclude_unset=True)


def sse(model: BaseModel) -> str:
    """One server-sent event carrying ``model`` as JSON."""
    return f"data: {model.model_dump_json(exclude_unset=True)}\n\n"


def sse_error(message: str, type: str = "server_error") -> str:
    """An error event inside a stream that has already started (its HTTP status is sent)."""
    return f"data: {json.dumps({'error': {'message': message, 'type': type, 'param': None, 'code': None}})}\n\n"


SSE_DONE = "data: [DONE]\n\n"
# proxies must pass events on as they come
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
