"""Helpers for the server tests: a live server on the embedded model, a scripted stand-in engine, and the
check that an engine holds no cache after a test."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dsv4.engine.engine_config import EngineConfig
from dsv4.engine.outputs import EngineStats, RequestDelta
from dsv4.engine.sampling_params import SamplingParams
from dsv4.server.app import build_app
from dsv4.server.launch import BackgroundServer
from dsv4.tokenizer import ByteTokenizer


def make_engine(xdg: Path, **overrides: Any) -> Any:
    """An AsyncEngine on the embedded model (fp32, CPU), written into the private cache ``xdg``."""
    from dsv4.engine.async_engine import AsyncEngine

    kw = {"device": "cpu", "dtype": "float32", "max_model_len": 256, "max_running_requests": 8, **overrides}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(xdg))
        return AsyncEngine(EngineConfig(**kw), progress=False)  # type: ignore[arg-type]


@contextlib.contextmanager
def live_server(engine: Any, **app_kw: Any) -> Iterator[BackgroundServer]:
    """``engine`` served on a free loopback port for the duration of the block."""
    with BackgroundServer(build_app(engine, **app_kw)) as srv:
        yield srv


def wait_idle(engine: Any, timeout: float = 10.0) -> None:
    """Wait until the engine runs and queues nothing (aborts land at the engine's next step)."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0 and not engine.core.has_unfinished():
            return
        assert time.monotonic() < deadline, f"engine still busy: {s}"
        time.sleep(0.02)


def assert_cache_free(engine: Any) -> None:
    """Every request slot and every compressed-KV page is back in the free lists."""
    wait_idle(engine)
    mgr = engine.core.runner.cache_manager
    assert mgr.num_free_slots == engine.core.runner.cache.num_slots
    assert mgr.slot_pages == {}
    assert all(n == 0 for n in mgr.pages_in_use().values()), mgr.pages_in_use()


# ---- a stand-in engine with scripted output -------------------------------------------------------------------
Script = Callable[[list[int], SamplingParams], str]


class ScriptedEngine:
    """AsyncEngine's interface over a script: each request streams ``script(prompt_ids, params)``, ``chunk``
    characters per delta, as byte tokens. For server tests that need exact model output (reasoning, tool
    calls) or must run fast (fuzzing). Records aborted request ids."""

    def __init__(self, script: Script | str = "Hello there!", vocab_size: int = 512, max_model_len: int = 256,
                 chunk: int = 3) -> None:
        self.script = script if callable(script) else (lambda ids, p, s=script: s)
        self.tokenizer = ByteTokenizer(vocab_size)
        self.model_config = SimpleNamespace(vocab_size=vocab_size, eos_token_ids=(1,))
        self.model_name = "scripted"
        self.max_model_len = max_model_len
        self.healthy = True
        self.chunk = chunk
        self.delay = 0.0
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.finished: dict[str, int] = {"stop": 0, "length": 0, "abort": 0}

    def encode(self, text: str, add_bos: bool) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        params.validate(self.model_config.vocab_size)
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if any(not 0 <= t < self.model_config.vocab_size for t in prompt_ids):
            raise ValueError("prompt token ids out of range")
        if len(prompt_ids) + params.max_new_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                             f"exceeds the maximum context of {self.max_model_len} tokens")

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestDelta]:
        self.check_request(prompt_ids, params)
        rid = request_id or "req"
        text = self.script(list(prompt_ids), params)
        pieces = [text[i:i + self.chunk] for i in range(0, len(text), self.chunk)] or [""]
        self.running.add(rid)
        done, n = False, 0
        try:
            for i, piece in enumerate(pieces):
                ids = self.tokenizer.encode(piece, add_bos=False)
                ids = ids[: params.max_new_tokens - n]
                n += len(ids)
                last = i == len(pieces) - 1 or n >= params.max_new_tokens
                reason = ("length" if n >= params.max_new_tokens else "stop") if last else None
                lp = [-0.5] * len(ids) if params.logprobs is not None else None
                top = [{t: -0.5, 3: -1.5} for t in ids] if params.logprobs else None
                if self.delay:
                    await asyncio.sleep(self.delay)
                else:
                    await asyncio.sleep(0)
                done = reason is not None
                if done:
                    self.finished[reason] += 1  # type: ignore[index]
                yield RequestDelta(rid, ids, self.tokenizer.decode(ids), lp, top, reason, len(prompt_ids), n)
                if done:
                    return
        finally:
            self.running.discard(rid)
            if not done:
                self.aborted.append(rid)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(len(self.running), 0, {"slots": len(self.running) / 8}, 0, 0, 0, dict(self.finished))

    async def shutdown(self) -> None:
        self.healthy = False
