"""Fuzz every route of the app's own OpenAPI schema with schemathesis (valid and invalid bodies), on the
embedded model: whatever arrives, the answer is never a 5xx, and an error is always the OpenAI body.

Bounded: at most ``MAX_EXAMPLES`` generated cases per POST route and mode (valid, invalid); the context is short so a valid request with
a large ``n`` still finishes quickly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode
from server_harness import assert_cache_free, make_engine

from dsv4.server.app import build_app

MAX_EXAMPLES = 50


def _engine(tmp: Path) -> Any:
    return make_engine(tmp, max_model_len=48, max_running_requests=16)


@pytest.fixture(scope="module")
def fuzz_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    engine = _engine(tmp_path_factory.mktemp("xdg-fuzz"))
    yield engine
    asyncio.run(engine.shutdown())


@pytest.fixture(scope="module")
def api(fuzz_engine: Any) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", build_app(fuzz_engine))


P, N = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# GET routes take no input, so there is nothing invalid to send them
CASES = [("POST", "/v1/chat/completions", P), ("POST", "/v1/chat/completions", N), ("POST", "/v1/completions", P),
         ("POST", "/v1/completions", N), ("GET", "/v1/models", P), ("GET", "/health", P), ("GET", "/metrics", P)]


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_no_server_errors(api: Any, method: str, path: str, mode: GenerationMode) -> None:
    # NOTE: schemathesis' own pytest plugin (from_fixture) does not run under this pytest; plain hypothesis
    # over the operation's strategy does the same job.
    examples = MAX_EXAMPLES if method == "POST" else 5

    @given(case=api[path][method].as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        response = case.call(timeout=30)
        assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
        if response.status_code >= 400:
            err = response.json()["error"]
            assert isinstance(err["message"], str) and err["message"] and "Traceback" not in response.text

    check()


def test_fuzzing_left_the_cache_free(fuzz_engine: Any) -> None:
    assert_cache_free(fuzz_engine)
    assert fuzz_engine.healthy
