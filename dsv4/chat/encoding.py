"""OpenAI-style chat messages -> the DeepSeek-V4 prompt text, as DeepSeek's official encoder writes it.

The format (``/work/shared/CHAT_FORMAT.md``): special tokens are written inline as text, turns are joined
with no separator, the system text has no role token, tools are a fixed English section after the system
text, tool results are ``<tool_result>`` blocks inside user turns, and history tool calls are DSML markup.
The four official fixtures are reproduced byte for byte, including DeepSeek's own extension roles
(``developer`` = a user turn that may carry ``tools``, ``latest_reminder``), message-level ``tools`` and
``response_format``, and the ``task`` field of its internal classifier.

Policy decisions (where the official encoder has no opinion, or where a server must differ):

* **Thinking** is off (chat mode) unless asked for: :func:`resolve_chat_options` reads
  ``chat_template_kwargs.thinking`` (or ``enable_thinking``), like SGLang; vLLM defaults it on.
* **Reasoning effort**: only ``"max"`` changes the prompt (a fixed prefix, thinking mode only). ``"high"``
  and the other OpenAI levels (``none``, ``minimal``, ``low``, ``medium``, ``xhigh``) write the same bytes
  as no effort, because the original V4 checkpoints know no other tier. Unknown values are errors.
* **tool_choice**: ``"none"`` leaves the request tools out of the prompt; ``None``/``"auto"`` and
  ``"required"`` render all of them exactly as the official encoder does (the prompt has no way to force a
  call, and keeping it unchanged keeps the prefix cache); a named function renders only that tool's schema,
  the least surprising way to steer the model to it without text it never saw in training. Nothing is
  enforced at decoding time: a server that must guarantee ``required`` has to check the parsed calls.
* **Request tools** go on the first system message; without one, an empty system message is put first.
* **History tool-call arguments** that are not a JSON object are a :class:`ChatFormatError` naming the
  message (a 400, as SGLang and vLLM do) rather than the official ``{"arguments": raw}`` fallback, which
  silently shows the model a call it never made. An empty string means no arguments (some clients send it).
* **History reasoning** is read from ``reasoning_content``, or ``reasoning`` (vLLM's name) when absent.
* **Content-part lists** keep their text parts joined with ``"\\n\\n"`` (the official rule for tool
  results, applied to every role); other parts become ``[Unsupported <type>]`` as the official encoder
  writes for tool results, so a text-only model is told that something was there.
* **A final assistant message** closes the transcript (no generation header). With
  ``continue_final_message`` it is written without EOS so the model continues it; in thinking mode, one
  with reasoning but no content and no tool calls is left inside ``<think>`` so the reasoning continues.
  :func:`prompt_ends_in_reasoning` tells the server which state the output starts in.
* Unknown roles, missing content and malformed tool calls or tools raise :class:`ChatFormatError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
TASK_TOKENS = {t: f"<｜{t}｜>" for t in ("action", "query", "authority", "domain", "title", "read_url")}
ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")

# Prompt text the checkpoints were trained on; it must match byte for byte (checked against the fixtures).
EFFORT_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)
_TOOLS_HEAD = (
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by "
    f'writing a "<{DSML}tool_calls>" block like the following:\n\n'
    f"<{DSML}tool_calls>\n"
    f'<{DSML}invoke name="$TOOL_NAME">\n'
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>\n'
    f"...\n</{DSML}invoke>\n"
    f'<{DSML}invoke name="$TOOL_NAME2">\n'
    f"...\n</{DSML}invoke>\n"
    f"</{DSML}tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, '
    'booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside "
    f"{THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
_TOOLS_TAIL = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
_RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"


class ChatFormatError(ValueError):
    """A request the chat format cannot encode; the message names the offending message or field."""


class ChatOptions(NamedTuple):
    """Encoder options resolved from a request (see :func:`resolve_chat_options`)."""

    thinking: bool
    reasoning_effort: str | None


def resolve_chat_options(chat_template_kwargs: Mapping[str, Any] | None = None,
                         reasoning_effort: str | None = None) -> ChatOptions:
    """Thinking and effort from a request: ``chat_template_kwargs`` ``thinking`` (or ``enable_thinking``)
    turns thinking on (default off); its ``reasoning_effort`` wins over the top-level field."""
    kw = dict(chat_template_kwargs or {})
    thinking = kw.get("thinking", kw.get("enable_thinking"))
    if thinking is not None and not isinstance(thinking, bool):
        raise ChatFormatError(f"chat_template_kwargs.thinking must be a boolean, got {thinking!r}")
    effort = kw.get("reasoning_effort", reasoning_effort)
    _check_effort(effort)
    return ChatOptions(bool(thinking), effort)


def prompt_ends_in_reasoning(prompt: str) -> bool:
    """True when generation continues inside ``<think>`` (the parser's ``thinking`` argument)."""
    tail = prompt[prompt.rfind(ASSISTANT):] if ASSISTANT in prompt else ""
    return tail.rfind(THINK_START) > tail.rfind(THINK_END)


def _check_effort(effort: Any) -> None:
    if effort is not None and effort not in EFFORTS:
        raise ChatFormatError(f"reasoning_effort must be one of {', '.join(EFFORTS)}; got {effort!r}")


def _to_json(value: Any, where: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ChatFormatError(f"{where}: not JSON-serializable ({e})") from None


def _text(content: Any, where: str, *, required: bool = True) -> str:
    """A message's content as text; OpenAI content-part lists keep their text parts."""
    if content is None:
        if required:
            raise ChatFormatError(f"{where}: missing content")
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatFormatError(f"{where}: content must be a string or a list of content parts")
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif isinstance(part, Mapping):
            parts.append(f"[Unsupported {part.get('type')}]")
        else:
            raise ChatFormatError(f"{where}: content parts must be objects, got {type(part).__name__}")
    return "\n\n".join(parts)


def _is_function(item: Any, fn: Any) -> bool:
    """``item`` is ``{"type": "function", "function": fn}`` with a named ``fn``."""
    return isinstance(fn, Mapping) and isinstance(fn.get("name"), str) and item.get("type", "function") == "function"


def _functions(tools: Any, where: str) -> list[dict]:
    """The ``function`` objects of an OpenAI ``tools`` list (a bare function object is accepted too)."""
    if not isinstance(tools, list):
        raise ChatFormatError(f"{where}: must be a list")
    out = []
    for j, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not _is_function(tool, fn):
            raise ChatFormatError(f"{where}[{j}]: expected {{'type': 'function', 'function': {{'name': ...}}}}")
        out.append(fn)
    return out


def _select_tools(tools: list[dict] | None, tool_choice: str | dict | None) -> list[dict]:
    fns = _functions(tools, "tools") if tools else []
    if tool_choice is None or tool_choice in ("auto", "required"):
        if tool_choice == "required" and not fns:
            raise ChatFormatError("tool_choice 'required' needs at least one tool")
        return fns
    if tool_choice == "none":
        return []
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else tool_choice.get("name")
        chosen = [f for f in fns if f["name"] == name]
        if not chosen:
            raise ChatFormatError(f"tool_choice names function {name!r}, which is not in tools")
        return chosen[:1]
    raise ChatFormatError(f"tool_choice must be 'none', 'auto', 'required' or a named function; got {tool_choice!r}")


def _dsml_params(arguments: Any, where: str) -> str:
    """History call arguments as DSML parameter lines: strings raw, everything else as JSON."""
    if isinstance(arguments, str):
        if not arguments.strip():
            arguments = {}
        else:
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise ChatFormatError(f"{where}: arguments are not valid JSON") from None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, Mapping):
        raise ChatFormatError(f"{where}: arguments must be a JSON object")
    lines = []
    for key, value in arguments.items():
        is_str = isinstance(value, str)
        text = value if is_str else _to_json(value, where)
        lines.append(f'<{DSML}parameter name="{key}" string="{"true" if is_str else "false"}">{text}</{DSML}parameter>')
    return "\n".join(lines)


def _tool_block(tool_calls: Any, where: str) -> tuple[str, list[str]]:
    """History tool calls as one DSML block (with its leading blank line), plus the calls' ids."""
    if not isinstance(tool_calls, list):
        raise ChatFormatError(f"{where}: tool_calls must be a list")
    invokes, ids = [], []
    for j, call in enumerate(tool_calls):
        w = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not _is_function(call, fn):
            raise ChatFormatError(f"{w}: expected {{'type': 'function', 'function': {{'name', 'arguments'}}}}")
        invokes.append(f'<{DSML}invoke name="{fn["name"]}">\n{_dsml_params(fn.get("arguments"), w)}\n</{DSML}invoke>')
        ids.append(call.get("id") or fn.get("id") or "")
    if not invokes:
        return "", []
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>", ids


def _normalize(messages: Any, request_tools: list[dict], continue_final: bool) -> list[dict]:
    """Validated internal turns; tool messages become ``tool_result`` blocks merged into user turns."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    turns: list[dict] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise ChatFormatError(f"{where}: must be an object")
        role = msg.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"{where}: unsupported role {role!r} (expected one of {', '.join(ROLES)})")
        task = msg.get("task")
        if task is not None and task not in TASK_TOKENS:
            raise ChatFormatError(f"{where}: unknown task {task!r}")
        # The official encoder ignores ``task`` on tool results; so does this one.
        turn: dict[str, Any] = {"role": role, "task": None if role == "tool" else task,
                                "wo_eos": bool(msg.get("wo_eos"))}
        if role in ("system", "developer"):
            turn["text"] = _text(msg.get("content"), where)
            turn["tools"] = _functions(msg["tools"], f"{where}.tools") if msg.get("tools") else []
            turn["response_format"] = msg.get("response_format")
        elif role == "latest_reminder":
            turn["text"] = _text(msg.get("content"), where)
        elif role == "assistant":
            reasoning = msg.get("reasoning_content")
            reasoning = msg.get("reasoning") if reasoning is None else reasoning
            calls = msg.get("tool_calls") or []
            if msg.get("content") is None and not calls and reasoning is None:
                raise ChatFormatError(f"{where}: assistant message needs content, reasoning_content or tool_calls")
            turn["text"] = _text(msg.get("content"), where, required=False)
            turn["reasoning"] = _text(reasoning, f"{where}.reasoning_content", required=False)
            turn["tool_block"], turn["call_ids"] = _tool_block(calls, where)
        else:  # user or tool: both end up as blocks of a user turn
            kind = "tool" if role == "tool" else "text"
            block = (kind, _text(msg.get("content"), where), msg.get("tool_call_id") or "")
            last = turns[-1] if turns else None
            # Consecutive tool results and a following user message share one user turn; a user message
            # after a task turn does not (the task's classifier output must follow it directly).
            if last is not None and last["role"] == "user" and (role == "tool" or last["task"] is None):
                last["blocks"].append(block)
                continue
            turn["role"], turn["blocks"] = "user", [block]
        turns.append(turn)
    if request_tools:
        system = next((t for t in turns if t["role"] == "system"), None)
        if system is None:
            system = {"role": "system", "task": None, "wo_eos": False, "text": "", "tools": [], "response_format": None}
            turns.insert(0, system)
        system["tools"] = system["tools"] + request_tools
    if continue_final:
        if turns[-1]["role"] != "assistant":
            raise ChatFormatError("continue_final_message needs the last message to be an assistant message")
        turns[-1]["wo_eos"] = turns[-1]["continue"] = True
    return turns


def _sort_tool_results(turns: list[dict]) -> None:
    """Tool results follow the order of the calls of the latest assistant message that made calls."""
    order: dict[str, int] = {}
    for turn in turns:
        if turn["role"] == "assistant" and turn["call_ids"]:
            order = {cid: k for k, cid in enumerate(turn["call_ids"]) if cid}
        elif turn["role"] == "user" and order:
            results = [b for b in turn["blocks"] if b[0] == "tool"]
            if len(results) > 1:
                ranked = iter(sorted(results, key=lambda b: order.get(b[2], 0)))
                turn["blocks"] = [next(ranked) if b[0] == "tool" else b for b in turn["blocks"]]


def _last_user(turns: list[dict]) -> int:
    return max((i for i, t in enumerate(turns) if t["role"] in ("user", "developer")), default=-1)


def _render_text(turn: dict) -> str:
    """System/developer text with its tools section and response format."""
    out = turn["text"]
    if turn["tools"]:
        schemas = "\n".join(_to_json(fn, "tools") for fn in turn["tools"])
        out += "\n\n" + _TOOLS_HEAD + schemas + _TOOLS_TAIL
    if turn["response_format"]:
        out += "\n\n" + _RESPONSE_FORMAT + _to_json(turn["response_format"], "response_format")
    return out


def encode_messages(messages: list[dict], tools: list[dict] | None = None, *, thinking: bool = False,
                    reasoning_effort: str | None = None, tool_choice: str | dict | None = None,
                    continue_final_message: bool = False) -> str:
    """The V4 prompt text for ``messages`` (BOS included, as text). See the module docstring for policy."""
    _check_effort(reasoning_effort)
    turns = _normalize(messages, _select_tools(tools, tool_choice), continue_final_message)
    _sort_tool_results(turns)
    has_tools = any(t.get("tools") for t in turns)
    # Thinking without tools drops history reasoning: earlier assistant turns lose it and earlier developer
    # turns go entirely. With tools, every turn keeps its reasoning (tool loops reason across turns).
    drop = not has_tools
    if thinking and drop:
        last = _last_user(turns)
        turns = [t if i >= last or t["role"] != "assistant" else {**t, "reasoning": ""}
                 for i, t in enumerate(turns) if i >= last or t["role"] != "developer"]
    last = _last_user(turns)
    out = [BOS]
    for i, turn in enumerate(turns):
        role = turn["role"]
        if i == 0 and thinking and reasoning_effort == "max":
            out.append(EFFORT_MAX_PREFIX)
        if role == "system":
            out.append(_render_text(turn))
        elif role == "developer":
            out.append(USER + _render_text(turn))
        elif role == "latest_reminder":
            out.append(LATEST_REMINDER + turn["text"])
        elif role == "user":
            out.append(USER + "\n\n".join(b[1] if b[0] == "text" else f"<tool_result>{b[1]}</tool_result>"
                                          for b in turn["blocks"]))
        else:
            after_task = i > 0 and turns[i - 1]["task"] is not None
            if thinking and not after_task and (not drop or i > last):
                keep_open = turn.get("continue") and not turn["text"] and not turn["tool_block"]
                out.append(turn["reasoning"] + ("" if keep_open else THINK_END))
            out.append(turn["text"] + turn["tool_block"] + ("" if turn["wo_eos"] else EOS))
        # The generation header follows a user turn that ends the conversation or precedes the assistant.
        if i + 1 < len(turns) and turns[i + 1]["role"] not in ("assistant", "latest_reminder"):
            continue
        if turn["task"] is not None:
            token = TASK_TOKENS[turn["task"]]
            # The "action" classifier answers as an assistant turn; the other tasks answer in place.
            if turn["task"] == "action":
                token = ASSISTANT + (THINK_START if thinking else THINK_END) + token
            out.append(token)
        elif role in ("user", "developer"):
            out.append(ASSISTANT + (THINK_START if thinking and (not drop or i >= last) else THINK_END))
    return "".join(out)
