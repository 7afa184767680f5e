"""OpenAI request bodies (pydantic v2): what `/v1/completions` and `/v1/chat/completions` accept.

Validation is strict: wrong JSON types are refused rather than coerced (``"n": "2"`` is an error), as are
NaN and infinities, and so is any field not declared here ("unsupported field `x`"), so a client never
believes a parameter took effect when it did not. A few fields that clients send out of habit are
declared and ignored (:data:`IGNORED_FIELDS`); a few others are accepted only when they ask for the
default behaviour (:meth:`GenerationRequest.check_semantics`: ``presence_penalty`` 0 passes, 0.5 does not).

Extensions beyond OpenAI follow vLLM/SGLang: ``top_k``, ``min_p``, ``ignore_eos``, ``stop_token_ids``,
``skip_special_tokens``, ``chat_template_kwargs`` (``thinking``/``enable_thinking``,
``reasoning_effort``) and a top-level ``reasoning_effort``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator

from dsv4.chat.encoding import EFFORTS
from dsv4.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from dsv4.server.errors import APIError
from dsv4.server.messages import ChatMessage, StrictModel, Tool

MAX_N = 64  # choices per request: each is a full engine request, so keep one client from flooding it
MAX_STOP = 16
Effort = Literal[EFFORTS]  # type: ignore[valid-type]  # the chat encoder's list, in the schema too
# Declared so they pass validation, then ignored: they change nothing about the generated tokens.
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")


def _integral(v: Any) -> Any:
    # JSON has one number type: 2.0 is a valid integer there (and in JSON Schema); "2" is not.
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(_integral)]
TokenId = Annotated[Int, Field(ge=0)]
StopString = Annotated[str, Field(min_length=1)]


def _neutral(value: float) -> Any:
    """A field accepted only at its no-op value (the schema says so; check_semantics refuses others)."""
    return Field(None, description=f"not supported: only {value:g} (no effect) is accepted",
                 json_schema_extra={"enum": [value, None]})


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM spelling; accepted, usage comes in the last chunk only


class GenerationRequest(StrictModel):
    """Fields shared by both endpoints: model, sampling, stop rules, streaming."""

    model: str | None = Field(None, description="served model name; omitted = the served model")
    max_tokens: Int | None = Field(None, ge=1, description="most tokens to generate; omitted = rest of context")
    n: Int = Field(1, ge=1, le=MAX_N, description="independent choices for the prompt")
    stop: StopString | list[StopString] | None = Field(
        None, description="stop when the output contains one of these")
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP)
    temperature: float | None = Field(None, ge=0, le=100, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: Int | None = Field(None, ge=-1, description="-1 or 0 = off")
    min_p: float | None = Field(None, ge=0, le=1)
    seed: Int | None = Field(None, ge=0, lt=2**63, description="choice i samples with seed + i")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool | None = None
    # accepted only when neutral (check_semantics)
    presence_penalty: float | None = _neutral(0)
    frequency_penalty: float | None = _neutral(0)
    repetition_penalty: float | None = _neutral(1)
    logit_bias: dict[str, float] | None = Field(None, description="not supported: only {} is accepted",
                                                json_schema_extra={"maxProperties": 0})
    # accepted and ignored
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return v

    # ---- checks beyond types ---------------------------------------------------------------------------
    def check_semantics(self) -> None:
        """Refuse what is well-typed but not supported (raises :class:`APIError` naming the field)."""
        for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
            v = getattr(self, name)
            if v is not None and v != neutral:
                raise APIError(f"`{name}` is not supported (only {neutral:g}, the neutral value)", param=name,
                               code="unsupported_parameter")
        if self.logit_bias:
            raise APIError("`logit_bias` is not supported", param="logit_bias", code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise APIError("`stream_options` is only allowed when `stream` is true", param="stream_options")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, choice: int, prompt_len: int, max_model_len: int, logprobs: int | None,
                        skip_special_tokens: bool) -> SamplingParams:
        """The engine's parameters for choice ``choice``; ``ValueError`` names a bad value."""
        max_new = self.requested_max_tokens()
        if max_new is None:
            # OpenAI's default is "until the context is full"; a prompt that fills it fails in check_request.
            max_new = max(1, max_model_len - prompt_len)
        return SamplingParams(
            max_new_tokens=max_new,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            # choices of one request must differ, and each must be reproducible on its own
            seed=None if self.seed is None else (self.seed + choice) % 2**63,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=skip_special_tokens,
        )


# ---- /v1/completions ------------------------------------------------------------------------------------
class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="text, token ids, or a list of either (one completion per prompt)")
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="top alternatives per token")
    echo: bool = False
    suffix: str | None = None
    best_of: Int | None = Field(None, description="not supported: only equal to n")

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list (a flat list of ints is one tokenized prompt)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError("`prompt` must not be empty", param="prompt")
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def check_semantics(self) -> None:
        super().check_semantics()
        if self.echo:
            raise APIError("`echo` is not supported", param="echo", code="unsupported_parameter")
        if self.suffix:
            raise APIError("`suffix` is not supported", param="suffix", code="unsupported_parameter")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError("`best_of` is not supported (only equal to `n`)", param="best_of",
                           code="unsupported_parameter")


# ---- /v1/chat/completions -------------------------------------------------------------------------------
class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class ChatTemplateKwargs(StrictModel):
    thinking: bool | None = None
    enable_thinking: bool | None = Field(None, description="Qwen/vLLM spelling of `thinking`")
    reasoning_effort: Effort | None = None


class ResponseFormat(StrictModel):
    type: Literal["text"]


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation, oldest first")
    max_completion_tokens: Int | None = Field(None, ge=1, description="newer OpenAI name of max_tokens")
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    reasoning_effort: Effort | None = Field(None, description="used when thinking is on; chat_template_kwargs wins")
    continue_final_message: bool = Field(False, description="continue a final assistant message, not close it")
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check_semantics(self) -> None:
        super().check_semantics()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("`top_logprobs` needs `logprobs` set to true", param="top_logprobs")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function["name"] for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise APIError(f"`tool_choice` names `{self.tool_choice.function.name}`, which is not in `tools`",
                               param="tool_choice")
        elif self.tool_choice == "required" and not self.tools:
            raise APIError("`tool_choice` is `required` but no `tools` were given", param="tool_choice")

    @property
    def logprobs_n(self) -> int | None:
        """The engine's ``logprobs``: None, or how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None
