"""`dsv4 bench` (offline, on the embedded model) and `dsv4 bench serving` (against a live test server) each
print a table and end with one JSON line of results."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from server_harness import live_server, make_engine

from dsv4.cli import main


def last_json(out: str) -> dict[str, Any]:
    lines = out.strip().splitlines()
    assert "|" in out  # the table came first
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def xdg(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tmp_path_factory.mktemp("xdg-bench")


def test_bench_offline(xdg: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    rc = main(["bench", "--num-prompts", "6", "--input-len", "24", "--output-len", "6", "--device", "cpu",
               "--max-model-len", "64", "--seed", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    r = last_json(out)
    assert r["bench"] == "offline" and r["requests"] == 6
    assert 6 * 3 <= r["output_tokens"] <= 6 * 6 and 6 * 12 <= r["input_tokens"] <= 6 * 24
    for key in ("requests_per_s", "input_tokens_per_s", "output_tokens_per_s", "total_tokens_per_s"):
        assert r[key] > 0, key
    assert "cache bytes/token" in out  # the card


def test_bench_offline_rejects_impossible_workload(xdg: Any, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    rc = main(["bench", "--input-len", "60", "--output-len", "10", "--device", "cpu", "--max-model-len", "64"])
    assert rc == 2 and "max_model_len" in capsys.readouterr().err


@pytest.fixture(scope="module")
def url(xdg: Any) -> Iterator[str]:
    engine = make_engine(xdg)
    with live_server(engine) as srv:
        yield srv.url
    asyncio.run(engine.shutdown())


def test_bench_serving(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "serving", "--base-url", url, "--num-prompts", "8", "--concurrency", "4",
               "--input-len", "32", "--output-len", "8"])
    assert rc == 0
    r = last_json(capsys.readouterr().out)
    assert r["bench"] == "serving" and r["completed"] == 8 and r["failed"] == 0
    assert 8 * 4 <= r["output_tokens"] <= 8 * 8  # ignore_eos: every output runs to its drawn length
    for key in ("requests_per_s", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
                "tpot_p50_ms", "tpot_p99_ms"):
        assert r[key] is not None and r[key] > 0, key
    assert r["ttft_p50_ms"] <= r["ttft_p99_ms"]


def test_bench_serving_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "serving", "--base-url", "http://127.0.0.1:9", "--num-prompts", "1"])
    assert rc == 2 and "cannot talk to" in capsys.readouterr().err
