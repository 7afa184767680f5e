"""DeepSeek-V4 chat format: prompt encoding, model-folder chat templates, output parsing.

Pure Python (no torch), so the server front end can import it cheaply.

* :mod:`dsv4.chat.encoding`: OpenAI-style messages -> the official V4 prompt text.
* :mod:`dsv4.chat.template`: a model folder's own Jinja chat template, when it ships one.
* :mod:`dsv4.chat.parser`: generated text -> ``reasoning_content``, ``content`` and ``tool_calls``, one-shot
  or streaming.
"""

from __future__ import annotations

from dsv4.chat.encoding import (
    ChatFormatError,
    ChatOptions,
    encode_messages,
    prompt_ends_in_reasoning,
    resolve_chat_options,
)
from dsv4.chat.parser import (
    ParsedDelta,
    ParsedOutput,
    StreamingParser,
    ToolCall,
    ToolCallDelta,
    parse_output,
    sequential_ids,
)
from dsv4.chat.template import ChatTemplate

__all__ = [
    "ChatFormatError",
    "ChatOptions",
    "ChatTemplate",
    "ParsedDelta",
    "ParsedOutput",
    "StreamingParser",
    "ToolCall",
    "ToolCallDelta",
    "encode_messages",
    "parse_output",
    "prompt_ends_in_reasoning",
    "resolve_chat_options",
    "sequential_ids",
]
