"""The official `openai` client against a live dsv4 server (uvicorn on loopback, embedded model on CPU):
chat and completions, streaming and not, n > 1, stop strings, logprobs, usage, /v1/models, /health,
/metrics, client disconnects, and the API key."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from server_harness import assert_cache_free, live_server, make_engine

MESSAGES = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    eng = make_engine(tmp_path_factory.mktemp("xdg-server"))
    yield eng
    import asyncio

    asyncio.run(eng.shutdown())


@pytest.fixture(scope="module")
def url(engine: Any) -> Iterator[str]:
    with live_server(engine) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(engine: Any) -> str:
    return engine.model_name


# ---- basics ------------------------------------------------------------------------------------------------
def test_models_and_health(client: openai.OpenAI, url: str, model: str, engine: Any) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [model]
    assert httpx.get(f"{url}/health").status_code == 200


def test_chat_greedy_stream_matches_non_stream(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "length" and c.message.role == "assistant"
    assert isinstance(c.message.content, str)
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    again = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == c.message.content

    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == c.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == r.usage.model_dump()
    assert all(ch.usage is None for ch in chunks[:-1])


def test_completions_stream_and_not(client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(model=model, prompt="Hello", max_tokens=10, temperature=0)
    assert r.usage.prompt_tokens == 6  # BOS + 5 bytes
    assert r.usage.completion_tokens == 10 and r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=model, prompt="Hello", max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    # token-id prompts, and several prompts in one request
    ids = [0, *(3 + b for b in b"Hello")]
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    two = client.completions.create(model=model, prompt=["Hello", "Bye"], max_tokens=4, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.prompt_tokens == 6 + 4


def test_n_choices_seeded(client: openai.OpenAI, model: str) -> None:
    kw: dict[str, Any] = dict(model=model, messages=MESSAGES, max_tokens=8, temperature=1.0, n=3, seed=7)
    r = client.chat.completions.create(**kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    texts = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # each choice has its own seed
    assert r.usage.completion_tokens == 24
    again = client.chat.completions.create(**kw)
    assert [c.message.content for c in sorted(again.choices, key=lambda c: c.index)] == texts
    streamed: dict[int, str] = {0: "", 1: "", 2: ""}
    for ch in client.chat.completions.create(**kw, stream=True):
        for c in ch.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[i] for i in range(3)] == texts


def test_stop_strings(client: openai.OpenAI, model: str) -> None:
    full = client.completions.create(model=model, prompt="Hello", max_tokens=24, temperature=0).choices[0].text
    # a character whose first occurrence is a few characters in: the text must end right before it
    k = next(i for i in range(2, len(full)) if full[i] not in full[:i] and full[i] != "\ufffd")
    for stop in (full[k], [full[k], "\x00never"]):
        r = client.completions.create(model=model, prompt="Hello", max_tokens=24, temperature=0, stop=stop)
        assert r.choices[0].text == full[:k] and r.choices[0].finish_reason == "stop"
        s = list(client.completions.create(model=model, prompt="Hello", max_tokens=24, temperature=0, stop=stop,
                                           stream=True))
        assert "".join(c.choices[0].text for c in s) == full[:k]


def test_chat_logprobs(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and isinstance(t.bytes, list)
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert math.isclose(t.logprob, tops[0], rel_tol=1e-5, abs_tol=1e-6)  # greedy took the argmax
    streamed = [t for ch in client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6,
                                                           temperature=0, logprobs=True, stream=True)
                if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content])


def test_completion_logprobs(client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(model=model, prompt="Hello", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert lp.text_offset == sorted(lp.text_offset)
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)


def test_metrics(client: openai.OpenAI, url: str, model: str) -> None:
    client.completions.create(model=model, prompt="Hi", max_tokens=3, temperature=0)
    text = httpx.get(f"{url}/metrics").text
    for name in ("dsv4_num_requests_running", "dsv4_num_requests_waiting", 'dsv4_cache_usage_ratio{kind="slots"}',
                 "dsv4_time_to_first_token_seconds_bucket", "dsv4_inter_token_latency_seconds_bucket",
                 "dsv4_prompt_tokens_total", "dsv4_generation_tokens_total",
                 'dsv4_requests_finished_total{finish_reason="length"}'):
        assert name in text, name
    gen = next(line for line in text.splitlines() if line.startswith("dsv4_generation_tokens_total "))
    assert float(gen.split()[1]) > 0


def test_disconnects_free_the_cache(url: str, model: str, engine: Any) -> None:
    """A client that goes away mid-request (streaming or not) aborts it; the cache ends up empty."""
    body = {"model": model, "prompt": "Hello", "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.3)
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        for _ in zip(range(3), r.iter_lines(), strict=False):
            pass
    time.sleep(0.2)
    assert_cache_free(engine)
    assert engine.stats().finished_total["abort"] >= 2


# ---- API key -----------------------------------------------------------------------------------------------
def test_api_key(engine: Any, model: str) -> None:
    with live_server(engine, api_key="sekret") as srv:
        bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert "API key" in e.value.message
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model=model, prompt="x", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(f"{srv.url}/health").status_code == 200  # open for load balancers


# ---- errors: every one a 4xx with an OpenAI body that names the problem ---------------------------------------
CHAT = {"messages": MESSAGES, "max_tokens": 4}
CMPL = {"prompt": "Hello", "max_tokens": 4}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
ERRORS: list[tuple[str, str, Any, int, str | None, str]] = [
    # (id, route, body (str = raw bytes), status, param, word in the message)
    ("malformed-json", "completions", '{"prompt": ', 400, None, "JSON"),
    ("nan", "completions", '{"prompt": "x", "temperature": NaN}', 400, "temperature", "temperature"),
    ("not-an-object", "completions", "[]", 400, None, "dictionary"),
    ("empty-body", "chat", "", 400, None, "required"),
    ("missing-messages", "chat", {"max_tokens": 3}, 400, "messages", "required"),
    ("max-tokens-string", "completions", {**CMPL, "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ("messages-string", "chat", {"messages": "hi"}, 400, "messages", "messages"),
    ("stream-string", "completions", {**CMPL, "stream": "yes"}, 400, "stream", "boolean"),
    ("unknown-field", "chat", {**CHAT, "frobnicate": 1}, 400, "frobnicate", "unsupported field"),
    ("unknown-model", "chat", {**CHAT, "model": "gpt-4"}, 404, "model", "gpt-4"),
    ("prompt-too-long", "completions", {"prompt": "x" * 300}, 400, "prompt", "context"),
    ("max-tokens-too-long", "completions", {**CMPL, "max_tokens": 300}, 400, "max_tokens", "context"),
    ("max-tokens-zero", "completions", {**CMPL, "max_tokens": 0}, 400, "max_tokens", "greater"),
    ("max-tokens-negative", "chat", {**CHAT, "max_tokens": -1}, 400, "max_tokens", "greater"),
    ("max-completion-tokens-zero", "chat", {**CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens", ""),
    ("temperature-negative", "chat", {**CHAT, "temperature": -1}, 400, "temperature", ""),
    ("top-p-zero", "completions", {**CMPL, "top_p": 0}, 400, "top_p", ""),
    ("top-p-above-one", "completions", {**CMPL, "top_p": 1.5}, 400, "top_p", ""),
    ("top-k", "completions", {**CMPL, "top_k": -2}, 400, "top_k", ""),
    ("min-p", "completions", {**CMPL, "min_p": 2}, 400, "min_p", ""),
    ("seed", "completions", {**CMPL, "seed": -1}, 400, "seed", ""),
    ("n-zero", "chat", {**CHAT, "n": 0}, 400, "n", ""),
    ("n-huge", "chat", {**CHAT, "n": 1000}, 400, "n", ""),
    ("logprobs-too-many", "completions", {**CMPL, "logprobs": 50}, 400, "logprobs", ""),
    ("top-logprobs-alone", "chat", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    ("empty-stop", "completions", {**CMPL, "stop": [""]}, 400, "stop[0]", "at least 1"),
    ("stop-token-out-of-vocab", "completions", {**CMPL, "stop_token_ids": [99999]}, 400, "stop_token_ids", ""),
    ("presence-penalty", "chat", {**CHAT, "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ("logit-bias", "chat", {**CHAT, "logit_bias": {"5": 1.0}}, 400, "logit_bias", "not supported"),
    ("echo", "completions", {**CMPL, "echo": True}, 400, "echo", "not supported"),
    ("best-of", "completions", {**CMPL, "best_of": 3}, 400, "best_of", "not supported"),
    ("response-format", "chat", {**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format.type", ""),
    ("stream-options-without-stream", "chat", {**CHAT, "stream_options": {"include_usage": True}}, 400,
     "stream_options", "stream"),
    ("empty-messages", "chat", {"messages": []}, 400, "messages", ""),
    ("bad-role", "chat", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "robot"),
    ("no-role", "chat", {"messages": [{"content": "x"}]}, 400, "messages[0].role", "required"),
    ("user-without-content", "chat", {"messages": [{"role": "user"}]}, 400, "messages[0].content", "required"),
    ("n-float", "chat", {**CHAT, "n": 1.5}, 400, "n", "integer"),
    ("image-part", "chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content[0].type", "'text'"),
    ("tool-without-name", "chat", {**CHAT, "tools": [{"type": "function", "function": {}}]}, 400, "tools[0].function",
     "name"),
    ("required-without-tools", "chat", {**CHAT, "tool_choice": "required"}, 400, "tool_choice", "tools"),
    ("named-tool-missing", "chat", {**CHAT, "tools": [TOOL], "tool_choice": {"type": "function", "function": {
        "name": "g"}}}, 400, "tool_choice", "g"),
    ("reasoning-effort", "chat", {**CHAT, "reasoning_effort": "extreme"}, 400, "reasoning_effort", "'max'"),
    ("history-arguments-not-json", "chat", {"messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
            "name": "f", "arguments": "{oops"}}]}]}, 400, "messages", "JSON"),
    ("token-id-out-of-range", "completions", {"prompt": [0, 100000]}, 400, "prompt", "range"),
    ("empty-prompt-list", "completions", {"prompt": []}, 400, "prompt", "empty"),
]


@pytest.mark.parametrize("route,body,status,param,word", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(url: str, route: str, body: Any, status: int, param: str | None, word: str) -> None:
    path = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}[route]
    content = body if isinstance(body, str) else __import__("json").dumps(body)
    r = httpx.post(f"{url}{path}", content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and isinstance(err["type"], str)
    assert err["param"] == param, err
    assert word.lower() in err["message"].lower(), err


def test_error_routes_and_client(url: str, client: openai.OpenAI, model: str) -> None:
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(f"{url}/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=0)
    assert "max_tokens" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    # neutral values of the unsupported knobs are accepted
    ok = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, presence_penalty=0,
                                        frequency_penalty=0, user="u", parallel_tool_calls=True)
    assert ok.usage.completion_tokens == 2
