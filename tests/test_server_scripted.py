"""Reasoning and tool calls through the server, with the official client: a scripted engine plays the model,
so its output is known DSML and think markup (the random-weight tiny model never writes any). Also the
engine failing: /health, a dead engine (503), a request the engine aborted."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
from server_harness import ScriptedEngine, live_server

from dsv4.engine.async_engine import EngineDeadError
from dsv4.engine.outputs import RequestDelta
from dsv4.engine.sampling_params import SamplingParams

D = "｜DSML｜"
CALL = (f'\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n<{D}parameter name="city" string="true">Paris'
        f'</{D}parameter>\n<{D}parameter name="days" string="false">3</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>')
SCRIPTS = {
    "think": "Two and two.</think>The answer is 4.",
    "weather": "Let me check." + CALL,
    "think-then-call": "I need the weather" + CALL,
    "truncated": "a long line of reasoning that never ends",
}
TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
THINK = {"chat_template_kwargs": {"thinking": True}}


class Recorder(ScriptedEngine):
    """Picks the script by the last user message; remembers each request's sampling parameters."""

    def __init__(self) -> None:
        super().__init__(self._pick, max_model_len=4096)
        self.params: list[SamplingParams] = []

    def _pick(self, ids: list[int], params: SamplingParams) -> str:
        self.params.append(params)
        prompt = self.tokenizer.decode(ids)
        user = prompt.rsplit("<｜User｜>", 1)[-1].split("<｜Assistant｜>")[0]
        return SCRIPTS.get(user, "plain answer")


@pytest.fixture(scope="module")
def engine() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def client(engine: Recorder) -> Iterator[openai.OpenAI]:
    with live_server(engine) as srv:
        yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=30)


def ask(client: openai.OpenAI, text: str, **kw: Any) -> Any:
    return client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": text}],
                                          max_tokens=kw.pop("max_tokens", 1000), extra_body=kw.pop("extra", None), **kw)


def stream(client: openai.OpenAI, text: str, **kw: Any) -> tuple[str, str, list[Any], list[str]]:
    """(reasoning, content, tool-call deltas, finish reasons) of a streamed answer."""
    reasoning, content, calls, reasons = "", "", [], []
    for ch in ask(client, text, stream=True, **kw):
        for c in ch.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
            calls += c.delta.tool_calls or []
            if c.finish_reason:
                reasons.append(c.finish_reason)
    return reasoning, content, calls, reasons


def test_reasoning(client: openai.OpenAI, engine: Recorder) -> None:
    m = ask(client, "think", extra=THINK).choices[0]
    assert (m.message.reasoning_content, m.message.content) == ("Two and two.", "The answer is 4.")
    assert m.finish_reason == "stop"
    assert engine.params[-1].skip_special_tokens is False  # the markers must survive decoding
    assert stream(client, "think", extra=THINK) == ("Two and two.", "The answer is 4.", [], ["stop"])
    # thinking off: the same text is all content, and special tokens are skipped as usual
    plain = ask(client, "think").choices[0].message
    assert plain.content == SCRIPTS["think"] and getattr(plain, "reasoning_content", None) is None
    assert engine.params[-1].skip_special_tokens is True


def test_truncated_reasoning(client: openai.OpenAI) -> None:
    m = ask(client, "truncated", extra=THINK, max_tokens=10).choices[0]
    assert m.finish_reason == "length"
    assert m.message.reasoning_content == SCRIPTS["truncated"][:10] and not m.message.content


def check_call(name: str, arguments: str) -> None:
    assert name == "get_weather"
    assert json.loads(arguments) == {"city": "Paris", "days": 3}


def test_tool_call(client: openai.OpenAI) -> None:
    c = ask(client, "weather", tools=TOOLS).choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Let me check."
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.id
    check_call(call.function.name, call.function.arguments)

    reasoning, content, deltas, reasons = stream(client, "weather", tools=TOOLS)
    assert (reasoning, content, reasons) == ("", "Let me check.", ["tool_calls"])
    assert deltas[0].id and deltas[0].function.name == "get_weather" and {d.index for d in deltas} == {0}
    check_call(deltas[0].function.name, "".join(d.function.arguments or "" for d in deltas))


def test_tool_call_inside_unclosed_think(client: openai.OpenAI) -> None:
    c = ask(client, "think-then-call", tools=TOOLS, extra=THINK).choices[0]
    assert c.message.reasoning_content == "I need the weather" and c.finish_reason == "tool_calls"
    check_call(c.message.tool_calls[0].function.name, c.message.tool_calls[0].function.arguments)
    reasoning, content, deltas, reasons = stream(client, "think-then-call", tools=TOOLS, extra=THINK)
    assert (reasoning, content, reasons) == ("I need the weather", "", ["tool_calls"])
    check_call(deltas[0].function.name, "".join(d.function.arguments or "" for d in deltas))


def test_tool_choice_none_keeps_markup_as_content(client: openai.OpenAI) -> None:
    c = ask(client, "weather", tools=TOOLS, tool_choice="none").choices[0]
    assert c.finish_reason == "stop" and not c.message.tool_calls
    assert c.message.content == SCRIPTS["weather"]


def test_n_choices_each_parsed(client: openai.OpenAI) -> None:
    r = ask(client, "weather", tools=TOOLS, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1 for c in r.choices)
    assert r.choices[0].message.tool_calls[0].id != r.choices[1].message.tool_calls[0].id


# ---- the engine failing ------------------------------------------------------------------------------------
class Failing(ScriptedEngine):
    """``mode`` "dead": generate raises EngineDeadError; "abort": the request ends aborted with an error."""

    mode = "dead"

    async def generate(self, prompt_ids: Any, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestDelta]:
        if self.mode == "dead":
            raise EngineDeadError("engine failed: RuntimeError: boom")
        yield RequestDelta(request_id or "r", [72], "H", None, None, None, len(prompt_ids), 1)
        yield RequestDelta(request_id or "r", [], "", None, None, "abort", len(prompt_ids), 1, error="sampler failed")


def test_engine_failures() -> None:
    engine = Failing()
    with live_server(engine) as srv:
        body = {"prompt": "x", "max_tokens": 4}
        r = httpx.post(f"{srv.url}/v1/completions", json=body)
        assert r.status_code == 503 and "boom" in r.json()["error"]["message"]
        with httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line]
        assert s.status_code == 200 and "boom" in lines[0] and lines[-1] == "data: [DONE]"
        engine.mode = "abort"
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 500 and "sampler failed" in r.json()["error"]["message"]
        assert "Traceback" not in r.text
        assert httpx.get(f"{srv.url}/health").status_code == 200
        engine.healthy = False
        r = httpx.get(f"{srv.url}/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unhealthy"
