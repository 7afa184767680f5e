"""dsv4/chat/encoding.py: hand-written goldens from CHAT_FORMAT.md, and DeepSeek's official fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4.chat.encoding import (
    ASSISTANT,
    BOS,
    EFFORT_MAX_PREFIX,
    EOS,
    USER,
    ChatFormatError,
    encode_messages,
    prompt_ends_in_reasoning,
    resolve_chat_options,
)
from dsv4.chat.parser import parse_output

FIXTURES = Path("/work/shared/deepseek-v4/encoding_tests")
D = "｜DSML｜"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather. «°C»",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
NOW = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
TOOLS_LINE = ('{"name": "get_weather", "description": "Weather. «°C»", "parameters": {"type": "object", '
              '"properties": {"city": {"type": "string"}}}}')


def call(id: str, name: str, arguments: str) -> dict:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


def block(*invokes: str) -> str:
    return f"\n\n<{D}tool_calls>\n" + "\n".join(invokes) + f"\n</{D}tool_calls>"


def invoke(name: str, *params: str) -> str:
    return f'<{D}invoke name="{name}">\n' + "\n".join(params) + f"\n</{D}invoke>"


def param(name: str, value: str, string: bool = True) -> str:
    return f'<{D}parameter name="{name}" string="{"true" if string else "false"}">{value}</{D}parameter>'


def test_chat_mode_system_user() -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert encode_messages(msgs) == f"{BOS}Be brief.{USER}Hi{ASSISTANT}</think>"
    # reasoning_effort is ignored in chat mode.
    assert encode_messages(msgs, reasoning_effort="max") == encode_messages(msgs)


def test_thinking_mode_header_and_history_reasoning_dropped() -> None:
    msgs = [{"role": "user", "content": "A"},
            {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
            {"role": "user", "content": "B"}]
    assert encode_messages(msgs, thinking=True) == (
        f"{BOS}{USER}A{ASSISTANT}</think>a1{EOS}{USER}B{ASSISTANT}<think>")
    assert encode_messages(msgs) == f"{BOS}{USER}A{ASSISTANT}</think>a1{EOS}{USER}B{ASSISTANT}</think>"
    # A closed transcript: the turn after the last user keeps its reasoning, no header follows.
    closed = [*msgs, {"role": "assistant", "reasoning": "r2", "content": "a2"}]
    assert encode_messages(closed, thinking=True) == (
        f"{BOS}{USER}A{ASSISTANT}</think>a1{EOS}{USER}B{ASSISTANT}<think>r2</think>a2{EOS}")


def test_effort_prefix_only_for_max_in_thinking_mode() -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    plain = encode_messages(msgs, thinking=True)
    assert plain == f"{BOS}S{USER}Q{ASSISTANT}<think>"
    assert encode_messages(msgs, thinking=True, reasoning_effort="high") == plain
    assert encode_messages(msgs, thinking=True, reasoning_effort="low") == plain
    assert encode_messages(msgs, thinking=True, reasoning_effort="max") == BOS + EFFORT_MAX_PREFIX + plain[len(BOS):]
    assert EFFORT_MAX_PREFIX.startswith("Reasoning Effort: Absolute maximum with no shortcuts permitted.\n")
    assert EFFORT_MAX_PREFIX.endswith("unchecked.\n\n")
    with pytest.raises(ChatFormatError, match="reasoning_effort"):
        encode_messages(msgs, thinking=True, reasoning_effort="ultra")


def test_tools_without_system_and_tool_loop_in_thinking_mode() -> None:
    msgs = [{"role": "user", "content": "Weather in Paris and Oslo?"},
            {"role": "assistant", "reasoning_content": "Two calls.",
             "tool_calls": [call("c1", "get_weather", '{"city": "Paris"}'),
                            call("c2", "get_weather", '{"city": "Oslo", "days": 2, "opts": {"ü": [true, null]}}')]},
            # Results arrive out of order and are re-sorted by tool_call_id; the user text joins the turn.
            {"role": "tool", "tool_call_id": "c2", "content": "cold"},
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "mild"},
                                                              {"type": "text", "text": "dry"}]},
            {"role": "user", "content": "Thanks, and now?"}]
    prompt = encode_messages(msgs, [WEATHER, NOW], thinking=True)
    head, turns = prompt.split(USER, 1)
    assert head.startswith(BOS + "\n\n## Tools\n\nYou have access to a set of tools")
    assert head.endswith("### Available Tool Schemas\n\n" + TOOLS_LINE + "\n" + json.dumps(NOW["function"]) +
                         "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke "
                         "tool calls.\n")
    calls = block(invoke("get_weather", param("city", "Paris")),
                  invoke("get_weather", param("city", "Oslo"), param("days", "2", False),
                         param("opts", '{"ü": [true, null]}', False)))
    # With tools, nothing is dropped and every header opens <think>.
    assert USER + turns == (
        f"{USER}Weather in Paris and Oslo?{ASSISTANT}<think>Two calls.</think>{calls}{EOS}"
        f"{USER}<tool_result>mild\n\ndry</tool_result>\n\n<tool_result>cold</tool_result>\n\nThanks, and now?"
        f"{ASSISTANT}<think>")


def test_history_tool_calls_without_request_tools_follow_the_no_tools_rules() -> None:
    # Tool results are user turns, so the last "user" turn is the tool result: the calling turn loses its
    # reasoning in thinking mode (the official drop rule), and the zero-argument call has an empty line.
    msgs = [{"role": "user", "content": "Time?"},
            {"role": "assistant", "content": None, "reasoning_content": "Ask the clock.",
             "tool_calls": [call("t", "now", "{}")]},
            {"role": "tool", "tool_call_id": "t", "content": "12:00"}]
    zero = f'<{D}invoke name="now">\n\n</{D}invoke>'
    assert encode_messages(msgs, thinking=True) == (
        f"{BOS}{USER}Time?{ASSISTANT}</think>\n\n<{D}tool_calls>\n{zero}\n</{D}tool_calls>{EOS}"
        f"{USER}<tool_result>12:00</tool_result>{ASSISTANT}<think>")
    # An empty arguments string is a call without arguments too.
    msgs[1]["tool_calls"] = [call("t", "now", "")]
    assert zero in encode_messages(msgs)


def test_tool_choice() -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    auto = encode_messages(msgs, [WEATHER, NOW])
    assert encode_messages(msgs, [WEATHER, NOW], tool_choice="auto") == auto
    assert encode_messages(msgs, [WEATHER, NOW], tool_choice="required") == auto
    assert encode_messages(msgs, [WEATHER, NOW], tool_choice="none") == f"{BOS}S{USER}Q{ASSISTANT}</think>"
    named = encode_messages(msgs, [WEATHER, NOW], tool_choice={"type": "function", "function": {"name": "now"}})
    assert '"name": "now"' in named and "get_weather" not in named
    with pytest.raises(ChatFormatError, match="not in tools"):
        encode_messages(msgs, [WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ChatFormatError, match="required"):
        encode_messages(msgs, tool_choice="required")
    with pytest.raises(ChatFormatError, match="tool_choice"):
        encode_messages(msgs, [WEATHER], tool_choice="sometimes")
    with pytest.raises(ChatFormatError, match=r"tools\[0\]"):
        encode_messages(msgs, [{"type": "function", "function": {"description": "no name"}}])


def test_content_parts() -> None:
    msgs = [{"role": "system", "content": [{"type": "text", "text": "S1"}, {"type": "text", "text": "S2"}]},
            {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {}}]}]
    assert encode_messages(msgs) == f"{BOS}S1\n\nS2{USER}look\n\n[Unsupported image_url]{ASSISTANT}</think>"
    # Consecutive user messages share one user turn, like tool results do.
    two = [{"role": "user", "content": "A"}, {"role": "user", "content": "B"}]
    assert encode_messages(two) == f"{BOS}{USER}A\n\nB{ASSISTANT}</think>"


def test_continue_final_message() -> None:
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "The answer is"}]
    assert encode_messages(msgs) == f"{BOS}{USER}Q{ASSISTANT}</think>The answer is{EOS}"
    assert encode_messages(msgs, continue_final_message=True) == f"{BOS}{USER}Q{ASSISTANT}</think>The answer is"
    prompt = encode_messages(msgs, thinking=True, continue_final_message=True)
    assert prompt == f"{BOS}{USER}Q{ASSISTANT}<think></think>The answer is" and not prompt_ends_in_reasoning(prompt)
    # Reasoning only: the model continues its reasoning.
    partial = [msgs[0], {"role": "assistant", "content": "", "reasoning_content": "Hmm, "}]
    prompt = encode_messages(partial, thinking=True, continue_final_message=True)
    assert prompt == f"{BOS}{USER}Q{ASSISTANT}<think>Hmm, " and prompt_ends_in_reasoning(prompt)
    assert prompt_ends_in_reasoning(encode_messages(msgs[:1], thinking=True))
    assert not prompt_ends_in_reasoning(encode_messages(msgs[:1]))
    with pytest.raises(ChatFormatError, match="continue_final_message"):
        encode_messages(msgs[:1], continue_final_message=True)


@pytest.mark.parametrize(("messages", "match"), [
    ([], "non-empty"),
    ([{"role": "wizard", "content": "x"}], r"messages\[0\]: unsupported role 'wizard'"),
    ([{"role": "user"}], r"messages\[0\]: missing content"),
    ([{"role": "user", "content": "q"}, {"role": "tool"}], r"messages\[1\]: missing content"),
    ([{"role": "user", "content": 5}], r"messages\[0\]: content must be"),
    ([{"role": "user", "content": "q"}, {"role": "assistant"}], r"messages\[1\]: assistant message needs"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call("a", "f", "{bad")]}],
     r"messages\[1\]\.tool_calls\[0\]: arguments are not valid JSON"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call("a", "f", "[1]")]}],
     r"messages\[1\]\.tool_calls\[0\]: arguments must be a JSON object"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {}}]}],
     r"messages\[1\]\.tool_calls\[0\]"),
    (["hello"], r"messages\[0\]: must be an object"),
])
def test_invalid_requests(messages: list, match: str) -> None:
    with pytest.raises(ChatFormatError, match=match):
        encode_messages(messages)
    assert issubclass(ChatFormatError, ValueError)


def test_resolve_chat_options() -> None:
    assert resolve_chat_options(None) == (False, None)
    assert resolve_chat_options({"thinking": True}).thinking
    assert resolve_chat_options({"enable_thinking": True}).thinking
    assert not resolve_chat_options({"thinking": False, "enable_thinking": True}).thinking
    assert resolve_chat_options({"reasoning_effort": "max"}, "high").reasoning_effort == "max"
    assert resolve_chat_options({}, "high").reasoning_effort == "high"
    with pytest.raises(ChatFormatError, match="boolean"):
        resolve_chat_options({"thinking": "yes"})
    with pytest.raises(ChatFormatError, match="reasoning_effort"):
        resolve_chat_options({}, "extreme")


# -- DeepSeek's official fixtures (not in the repository: read from the shared folder when present) -------
def _fixture(n: int) -> tuple[object, str]:
    if not FIXTURES.is_dir():
        pytest.skip(f"{FIXTURES} not present")
    inp = json.loads((FIXTURES / f"test_input_{n}.json").read_text(encoding="utf-8"))
    return inp, (FIXTURES / f"test_output_{n}.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize(("n", "thinking"), [(1, True), (2, True), (3, True), (4, False)])
def test_official_fixture_bytes(n: int, thinking: bool) -> None:
    inp, expected = _fixture(n)
    if isinstance(inp, dict):  # case 1: the file's tools go on the first (system) message
        prompt = encode_messages(inp["messages"], inp["tools"], thinking=thinking)
    else:
        prompt = encode_messages(inp, thinking=thinking)
    assert prompt == expected


def test_official_fixture_1_parses_back() -> None:
    _, text = _fixture(1)
    first = text.split(ASSISTANT + "<think>")[1].split(USER)[0]
    out = parse_output(first, thinking=True, tools=True)
    assert out.reasoning_content == "The user wants to know the weather in Beijing. I should use the get_weather tool."
    assert not out.content
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [
        ("get_weather", {"location": "Beijing", "unit": "celsius"})]
    last = parse_output(text.split(ASSISTANT + "<think>")[-1], thinking=True, tools=True)
    assert last.reasoning_content == "Got the weather data. Let me format a nice response."
    assert "22°C" in last.content and not last.tool_calls


def test_official_fixture_2_drops_history_reasoning_and_parses_back() -> None:
    _, text = _fixture(2)
    assert "The user said hello" not in text
    out = parse_output(text.split(ASSISTANT + "<think>")[-1], thinking=True, tools=False)
    assert out.reasoning_content == "The user asks about the capital of France. It is Paris."
    assert out.content == "The capital of France is Paris." and out.tool_calls == []


def test_official_fixture_3_tool_call_parses_back() -> None:
    _, text = _fixture(3)
    turn = text.split(ASSISTANT + "<think>")[1].split(USER)[0]
    out = parse_output(turn, thinking=True, tools=True)
    assert out.reasoning_content == "用户想知道小柴胡冲剂和布洛芬能否一起服用。"
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [
        ("search", {"queries": "小柴胡冲剂 布洛芬 相互作用 一起吃"})]
