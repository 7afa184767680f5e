"""AsyncEngine: concurrent streams, cancellation, streamed text, failures and shutdown (tiny checkpoint, CPU)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from oracle import tiny_config

from dsv4 import EngineConfig, SamplingParams
from dsv4.checkpoint import write_random_checkpoint
from dsv4.engine import sampler
from dsv4.engine.async_engine import AsyncEngine, EngineDeadError
from dsv4.engine.outputs import RequestDelta

GREEDY = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_new_tokens=16, temperature=1.0, seed=3, ignore_eos=True)
PROMPTS = [[0] + [(7 * i + j) % 250 + 3 for i in range(4 + 5 * j)] for j in range(8)]
PARAMS = [SEEDED if j % 3 == 2 else GREEDY for j in range(8)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tiny_config(vocab_size=300, index_head_dim=32)
    return write_random_checkpoint(cfg, tmp_path_factory.mktemp("async") / "tiny-v4", seed=5)


def run(coro):  # type: ignore[no-untyped-def]
    """asyncio.run with a deadline: a hung engine fails the test instead of the whole CI job."""
    return asyncio.run(asyncio.wait_for(coro, 120))


def make_engine(model_dir: Path, **kw: object) -> AsyncEngine:
    # NOTE: quant_sim off: its FP8/FP4 rounding turns last-ulp differences between batch shapes (chunked vs
    # whole prefill) into different tokens now and then; scheduling invariance is what these tests check.
    kw = {"device": "cpu", "dtype": "float32", "max_model_len": 256, "max_running_requests": 4,
          "chunked_prefill_size": 8, "quant_sim": False, **kw}
    return AsyncEngine(EngineConfig(model=str(model_dir), **kw), progress=False)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[AsyncEngine]:
    eng = make_engine(model_dir)
    yield eng
    run(eng.shutdown())


async def collect(eng: AsyncEngine, ids: list[int], params: SamplingParams, rid: str | None = None) -> list[RequestDelta]:
    return [d async for d in eng.generate(ids, params, request_id=rid)]


def tokens(deltas: list[RequestDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


async def settle(eng: AsyncEngine) -> None:
    """Wait until the engine thread has processed everything (aborts arrive asynchronously)."""
    for _ in range(500):
        s = eng.stats()
        if not s.num_running and not s.num_waiting and not eng._inbox:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)


def assert_cache_free(eng: AsyncEngine) -> None:
    mgr = eng.core.runner.cache_manager
    assert mgr.num_free_slots == eng.core.runner.cache.num_slots and mgr.slot_pages == {}
    assert not eng.core.has_unfinished()


@pytest.fixture(scope="module")
def alone(engine: AsyncEngine) -> list[list[int]]:
    async def main() -> list[list[int]]:
        return [tokens(await collect(engine, p, sp)) for p, sp in zip(PROMPTS, PARAMS, strict=True)]

    return run(main())


def test_public_attributes(engine: AsyncEngine, model_dir: Path) -> None:
    assert engine.model_name == "tiny-v4" and engine.max_model_len == 256 and engine.healthy
    assert engine.model_config.vocab_size == 300
    assert engine.encode("hi", add_bos=True) == [0, 3 + ord("h"), 3 + ord("i")]
    named = make_engine(model_dir, served_model_name="my-model")
    assert named.model_name == "my-model"
    run(named.shutdown())


@pytest.mark.parametrize("ids, params, needle", [
    ([], GREEDY, "empty"),
    ([0, 300], GREEDY, "out of range"),
    ([0, -1], GREEDY, "out of range"),
    ([0] * 250, GREEDY, "--max-model-len"),
    ([0, 5], GREEDY.replace(stop_token_ids=[400]), "stop_token_ids"),
    ([0, 5], "greedy", "SamplingParams"),
])
def test_check_request(engine: AsyncEngine, ids: list[int], params: SamplingParams, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        engine.check_request(ids, params)

    async def main() -> None:
        with pytest.raises(ValueError, match=needle):
            await collect(engine, ids, params)

    run(main())


def test_concurrent_streams_with_cancellations(engine: AsyncEngine, alone: list[list[int]]) -> None:
    aborts = engine.stats().finished_total["abort"]

    async def main() -> list[list[RequestDelta] | None]:
        results: list[list[RequestDelta] | None] = [None] * len(PROMPTS)
        started = asyncio.Event()

        async def consume(i: int) -> None:
            out: list[RequestDelta] = []
            agen = engine.generate(PROMPTS[i], PARAMS[i])
            async for d in agen:
                out.append(d)
                if i == 1 and len(out) == 3:
                    started.set()  # cancelled from outside while it waits for the next delta
                if i == 4 and len(out) == 2:
                    await agen.aclose()  # the consumer walks away
                    break
            results[i] = out

        tasks = [asyncio.create_task(consume(i)) for i in range(len(PROMPTS))]
        await started.wait()
        tasks[1].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert tasks[1].cancelled()
        await settle(engine)
        return results

    results = run(main())
    for i, out in enumerate(results):
        if i in (1, 4):
            continue
        assert out is not None and out[-1].finish_reason == "length" and out[-1].completion_tokens == 16
        assert all(d.finish_reason is None for d in out[:-1])
        assert tokens(out) == alone[i], i
    print("match: True (6 streams beside a cancelled one and a closed one)")
    assert len(results[4]) == 2  # type: ignore[arg-type]
    assert_cache_free(engine)
    assert engine.stats().finished_total["abort"] == aborts + 2  # both stopped early, neither ran to the end


def test_multibyte_text_is_never_split(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "héllo wörld € 😀 ok"
    script = [3 + b for b in text.encode()]
    real = sampler.sample_batch

    def scripted(reqs, logits):  # type: ignore[no-untyped-def]
        out = real(reqs, logits)
        for r, s in zip(reqs, out, strict=True):
            if r.request_id.startswith("utf8"):
                s.token_id = script[len(r.output_ids)]
        return out

    monkeypatch.setattr(sampler, "sample_batch", scripted)
    params = GREEDY.replace(max_new_tokens=len(script))

    async def main() -> tuple[list[RequestDelta], list[RequestDelta]]:
        return await asyncio.gather(collect(engine, [0, 70], params, "utf8"),
                                    collect(engine, [0, 70], params.replace(stop=["d €"]), "utf8-stop"))

    plain, stopped = run(main())
    assert "".join(d.text for d in plain) == text and tokens(plain) == script
    assert all("\ufffd" not in d.text for d in plain)
    assert any(d.token_ids and not d.text for d in plain)  # some tokens ended mid-character: text held back
    # a stop string: text it cuts is never streamed, and the stream ends where the final text ends
    assert "".join(d.text for d in stopped) == "héllo wörl" and stopped[-1].finish_reason == "stop"
    assert all("\ufffd" not in d.text for d in stopped)


def test_error_in_one_requests_sampling_spares_the_others(engine: AsyncEngine, alone: list[list[int]],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real = sampler.sample_batch

    def failing(reqs, logits):  # type: ignore[no-untyped-def]
        out = real(reqs, logits)  # the batch's generators advance before the failure: the retry must rewind them
        if any(r.request_id == "bad" and len(r.output_ids) == 5 for r in reqs):
            raise RuntimeError("injected sampling failure")
        return out

    monkeypatch.setattr(sampler, "sample_batch", failing)

    async def main() -> list[list[RequestDelta]]:
        rids = ["bad" if i == 2 else None for i in range(len(PROMPTS))]
        return await asyncio.gather(*(collect(engine, p, sp, r) for p, sp, r in zip(PROMPTS, PARAMS, rids, strict=True)))

    results = run(main())
    bad = results[2]
    assert bad[-1].finish_reason == "abort" and "injected sampling failure" in (bad[-1].error or "")
    assert tokens(bad) == alone[2][:5]
    for i, out in enumerate(results):
        if i != 2:
            assert tokens(out) == alone[i] and out[-1].finish_reason == "length", i
    assert engine.healthy
    run(settle(engine))
    assert_cache_free(engine)


def test_fatal_forward_error_fails_everything(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    eng = make_engine(model_dir)
    real, calls = eng.core.runner.forward, [0]

    def forward(batch):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("device on fire")
        return real(batch)

    monkeypatch.setattr(eng.core.runner, "forward", forward)

    async def main() -> list[object]:
        return await asyncio.gather(*(collect(eng, p, GREEDY) for p in PROMPTS[:3]), return_exceptions=True)

    results = run(main())
    assert all(isinstance(r, EngineDeadError) and "device on fire" in str(r) for r in results), results
    assert not eng.healthy
    with pytest.raises(EngineDeadError, match="device on fire"):
        run(collect(eng, PROMPTS[0], GREEDY))
    assert_cache_free(eng)
    run(eng.shutdown())
    assert not eng._thread.is_alive()


def test_shutdown_ends_streams_and_the_thread(model_dir: Path) -> None:
    eng = make_engine(model_dir)

    async def main() -> list[RequestDelta]:
        out: list[RequestDelta] = []
        async for d in eng.generate(PROMPTS[3], GREEDY.replace(max_new_tokens=200)):
            out.append(d)
            if len(out) == 2:
                await eng.shutdown()
        return out

    out = run(main())
    assert out[-1].finish_reason == "abort" and "shutting down" in (out[-1].error or "")
    assert not eng._thread.is_alive() and not eng.healthy
    assert_cache_free(eng)
    with pytest.raises(EngineDeadError, match="shutting down"):
        run(collect(eng, PROMPTS[0], GREEDY))
    run(eng.shutdown())  # twice is fine


def test_a_bug_in_the_engine_thread_fails_requests_instead_of_hanging(model_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    eng = make_engine(model_dir)

    def broken() -> None:
        raise AssertionError("bookkeeping bug")

    monkeypatch.setattr(eng.core, "stats", broken)
    with pytest.raises(EngineDeadError, match="bookkeeping bug"):
        run(collect(eng, PROMPTS[0], GREEDY))
    eng._thread.join(10)
    assert not eng._thread.is_alive() and not eng.healthy
    with pytest.raises(EngineDeadError, match="bookkeeping bug"):
        run(collect(eng, PROMPTS[0], GREEDY))
    run(eng.shutdown())
