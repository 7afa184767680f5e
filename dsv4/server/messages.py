"""Chat messages and tools as ``/v1/chat/completions`` accepts them, and their hand-over to the encoder.

One model per role, picked by ``role`` (a tagged union), so the schema says exactly what each role needs
(a user turn needs ``content``; an assistant turn in the history may instead carry ``tool_calls`` or
reasoning). Content is a string or a list of text parts; any other part (images, audio) is refused: the
model reads text only. Tools stay the client's own dicts, because the official encoder writes them
verbatim (key order included).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StrictModel(BaseModel):
    """No coercion between JSON types, no NaN/infinity, no undeclared fields."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


Content = str | list[TextPart]


class _Turn(StrictModel):
    name: str | None = None

    def to_encoder(self) -> dict[str, Any]:
        """The dict the chat encoder reads (OpenAI shape; history reasoning as ``reasoning_content``)."""
        d: dict[str, Any] = {"role": self.role}  # type: ignore[attr-defined]
        for key, value in self:
            if key == "role" or value is None:
                continue
            if key == "content" and isinstance(value, list):
                value = [{"type": "text", "text": p.text} for p in value]
            elif key == "tool_calls":
                value = [tc.model_dump() for tc in value]
            elif key == "reasoning":  # vLLM's name; reasoning_content wins when both are given
                key = "reasoning_content"
                if d.get(key) is not None or getattr(self, "reasoning_content", None) is not None:
                    continue
            d[key] = value
        return d


class SystemTurn(_Turn):
    role: Literal["system"]
    content: Content


class DeveloperTurn(_Turn):
    role: Literal["developer"]
    content: Content


class UserTurn(_Turn):
    role: Literal["user"]
    content: Content


class FunctionCallIn(StrictModel):
    name: str
    arguments: str = Field(description="JSON object text, as the model produced it")


class ToolCallIn(StrictModel):
    """A tool call in the history (an earlier assistant turn)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class AssistantTurn(_Turn):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCallIn] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = Field(None, description="vLLM's name for reasoning_content")


class ToolTurn(_Turn):
    role: Literal["tool"]
    content: Content
    tool_call_id: str | None = None


class ReminderTurn(_Turn):
    """DeepSeek's ``latest_reminder`` role (context the model should weigh most, e.g. the date)."""

    role: Literal["latest_reminder"]
    content: Content


ChatMessage = Annotated[SystemTurn | DeveloperTurn | UserTurn | AssistantTurn | ToolTurn | ReminderTurn,
                        Field(discriminator="role")]


class Tool(StrictModel):
    type: Literal["function"]
    function: dict[str, Any] = Field(description="{name, description?, parameters?: JSON Schema}")

    @field_validator("function")
    @classmethod
    def _has_name(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(v.get("name"), str) or not v["name"]:
            raise ValueError("a function needs a non-empty string `name`")
        if "parameters" in v and not isinstance(v["parameters"], dict):
            raise ValueError("`parameters` must be a JSON Schema object")
        return v
