"""Scheduling: greedy (and seeded) outputs do not depend on what else runs, on the prefill chunk size, or on
preemption; aborts free everything at any point; impossible requests are refused up front.

Engine tests run EngineCore on a tiny random checkpoint (fp32, CPU; window 8, CSA ratio 4, HCA ratio 8, so
short prompts cross many compression windows). Policy tests drive the Scheduler alone over caches on the
meta device (no model)."""

from __future__ import annotations

from pathlib import Path

import pytest
from oracle import tiny_config

from dsv4 import EngineConfig, SamplingParams
from dsv4.cache.manager import CacheManager
from dsv4.cache.model_cache import ModelCache, pages_needed
from dsv4.checkpoint import write_random_checkpoint
from dsv4.engine.engine_core import EngineCore
from dsv4.engine.model_runner import pool_tokens_for_memory
from dsv4.engine.request import Request
from dsv4.engine.scheduler import MAX_OVERTAKES, Scheduler
from dsv4.tokenizer import ByteTokenizer, IncrementalDetokenizer

GREEDY = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, seed=7, ignore_eos=True)
PROMPTS = [[0, 5], [0] + list(range(20, 33)), [0] + [(11 * i) % 290 + 3 for i in range(30)], [0, 7, 9, 4, 250],
           [0] + [(5 * i) % 280 + 10 for i in range(21)]]
PARAMS = [GREEDY, GREEDY, GREEDY, SEEDED, GREEDY]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tiny_config(vocab_size=300, index_head_dim=32), tmp_path_factory.mktemp("sched") / "m", seed=11)


def make_core(model_dir: Path, **kw: object) -> EngineCore:
    # NOTE: quant_sim off: its FP8/FP4 rounding turns last-ulp differences between batch shapes (chunked vs
    # whole prefill) into different tokens now and then; scheduling invariance is what these tests check.
    kw = {"device": "cpu", "dtype": "float32", "max_model_len": 256, "quant_sim": False, **kw}
    return EngineCore(EngineConfig(model=str(model_dir), **kw), progress=False)  # type: ignore[arg-type]


def assert_cache_free(core: EngineCore) -> None:
    mgr = core.runner.cache_manager
    assert mgr.num_free_slots == core.runner.cache.num_slots and mgr.slot_pages == {}
    assert all(n == 0 for n in mgr.pages_in_use().values()), mgr.pages_in_use()
    assert not core.has_unfinished()


def run(core: EngineCore, prompts: list[list[int]], params: list[SamplingParams],
        arrive: list[int] | None = None) -> list[list[int]]:
    """Request i is added before step ``arrive[i]``; returns each request's tokens. Checks that logits were
    computed only for requests that sample."""
    arrive = arrive or [0] * len(prompts)
    real_forward = core.runner.forward

    def forward(batch):  # type: ignore[no-untyped-def]
        logits, streams = real_forward(batch)
        sampled.append(logits.shape[0])
        return logits, streams

    core.runner.forward = forward  # type: ignore[method-assign]
    sampled: list[int] = []
    out: dict[str, list[int]] = {}
    rids: list[str | None] = [None] * len(prompts)
    step = 0
    try:
        while step <= max(arrive) or core.has_unfinished():
            for i, a in enumerate(arrive):
                if a == step:
                    rids[i] = core.add_request(prompts[i], params[i])
            deltas = core.step()
            if sampled:
                assert sampled.pop() == len(deltas)  # one logits row per request that sampled, no more
            for d in deltas:
                out.setdefault(d.request_id, []).extend(d.token_ids)
            step += 1
    finally:
        core.runner.forward = real_forward  # type: ignore[method-assign]
    assert_cache_free(core)
    return [out[r] for r in rids]  # type: ignore[index]


@pytest.fixture(scope="module")
def alone(model_dir: Path) -> list[list[int]]:
    core = make_core(model_dir)
    return [run(core, [p], [sp])[0] for p, sp in zip(PROMPTS, PARAMS, strict=True)]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_outputs_do_not_depend_on_batching_or_chunk_size(model_dir: Path, alone: list[list[int]], chunk: int) -> None:
    core = make_core(model_dir, chunked_prefill_size=chunk, max_running_requests=3)
    got = run(core, PROMPTS, PARAMS, arrive=[0, 0, 2, 5, 9])
    print(f"match: {got == alone} (chunked_prefill_size={chunk})")
    assert got == alone
    assert all(len(t) == GREEDY.max_new_tokens for t in got)
    stats = core.stats()
    assert stats.finished_total["length"] == len(PROMPTS) and stats.preemptions_total == 0
    assert stats.prompt_tokens_total == sum(map(len, PROMPTS))
    assert stats.generation_tokens_total == len(PROMPTS) * GREEDY.max_new_tokens


def test_preemption_by_recompute_keeps_outputs(model_dir: Path, alone: list[list[int]]) -> None:
    # 9 usable ratio-4 pages of 2 entries (72 tokens of context) for requests that grow to 14..43 tokens
    core = make_core(model_dir, max_total_tokens=40, page_size=2, max_running_requests=4, chunked_prefill_size=16)
    assert core.runner.cache.num_pages[4] - 1 == 9
    got = run(core, PROMPTS, PARAMS)
    preemptions = core.stats().preemptions_total
    print(f"match: {got == alone} ({preemptions} preemptions)")
    assert preemptions > 0
    assert got == alone


def test_abort_waiting_prefilling_decoding_frees_everything(model_dir: Path, alone: list[list[int]]) -> None:
    core = make_core(model_dir, chunked_prefill_size=4, max_running_requests=2)
    mgr = core.runner.cache_manager
    a = core.add_request(PROMPTS[2], GREEDY)  # 31 tokens: prefills over 8 steps
    b = core.add_request(PROMPTS[1], GREEDY)
    c = core.add_request(PROMPTS[4], GREEDY)
    core.step()
    assert [r.request_id for r in core.scheduler.running] == [a]  # the 4-token budget went to a
    core.abort(c)  # waiting
    assert core.stats().num_waiting == 1
    assert [(d.request_id, d.finish_reason, d.token_ids) for d in core.step()] == [(c, "abort", [])]
    assert core.scheduler.running[0].prefilling
    core.abort(a)  # mid-prefill
    assert mgr.num_free_slots == core.runner.cache.num_slots and sum(mgr.pages_in_use().values()) == 0
    deltas = core.step()
    assert [(d.request_id, d.finish_reason, d.token_ids) for d in deltas] == [(a, "abort", [])]
    while not deltas or deltas[0].request_id != b:  # b prefills, then samples its first token
        deltas = core.step()
    decoding = core.scheduler.running[0]
    assert decoding.request_id == b and not decoding.prefilling and len(decoding.output_ids) >= 1
    assert sum(mgr.pages_in_use().values()) > 0
    core.abort(b)  # mid-decode
    (last,) = core.step()
    assert last.request_id == b and last.finish_reason == "abort"
    assert_cache_free(core)
    assert core.stats().finished_total == {"stop": 0, "length": 0, "abort": 3}
    core.abort(b)  # finished or unknown ids are ignored
    core.abort("nope")
    assert core.step() == []
    assert run(core, [PROMPTS[1]], [GREEDY]) == [alone[1]]  # the freed slots work as new


def test_requests_that_can_never_fit_are_rejected(model_dir: Path) -> None:
    core = make_core(model_dir, max_total_tokens=40, page_size=2, max_running_requests=2)
    with pytest.raises(ValueError, match=r"maximum context of 256 tokens \(--max-model-len\)"):
        core.add_request([0] * 250, GREEDY.replace(max_new_tokens=7))
    with pytest.raises(ValueError, match="--max-total-tokens"):
        core.add_request([0] * 100, GREEDY)  # fits max_model_len, not the whole pool
    with pytest.raises(ValueError, match="empty"):
        core.add_request([], GREEDY)
    with pytest.raises(ValueError, match="out of range"):
        core.add_request([0, 300], GREEDY)
    rid = core.add_request([0, 1], GREEDY, request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        core.add_request([0, 1], GREEDY, request_id="x")
    core.abort(rid)
    core.step()
    assert_cache_free(core)


# ---- policy, without a model -------------------------------------------------------------------------------------
def meta_scheduler(slots: int = 4, total_tokens: int = 64, page_size: int = 2, budget: int = 64) -> Scheduler:
    cache = ModelCache(tiny_config(), slots, 256, total_tokens, page_size=page_size, device="meta", with_mtp=False)
    return Scheduler(CacheManager(cache), slots, budget, 256)


def request(n: int, name: str = "", max_new: int = 64) -> Request:
    ids = [0] * n
    params = SamplingParams(max_new_tokens=max_new, temperature=0)
    return Request(name, None, ids, params, frozenset(), IncrementalDetokenizer(ByteTokenizer(300), ids))


def fake_step(s: Scheduler) -> list[Request]:
    """Schedule, then pretend the forward ran and every sampling request drew token 3."""
    batch = s.schedule()
    for r, chunk, sample in zip(batch.reqs, batch.chunks, batch.sample, strict=True):
        assert chunk == r.all_ids[r.num_cached : r.num_cached + len(chunk)]
        r.num_cached += len(chunk)
        if sample:
            r.append(3)
    return batch.reqs


def test_pages_grow_with_the_context_not_reserved_up_front() -> None:
    s = meta_scheduler()
    r = request(9, max_new=200)
    s.add(r)
    fake_step(s)
    held = {k: len(v) for k, v in s.mgr.slot_pages[r.slot].items()}  # type: ignore[index]
    assert held == {4: pages_needed(9, 4, 2), 8: pages_needed(9, 8, 2)}
    for _ in range(20):
        fake_step(s)
    assert r.num_cached == 29 and len(s.mgr.slot_pages[r.slot][4]) == pages_needed(29, 4, 2)  # type: ignore[index]


def test_preempts_the_newest_arrival_and_requeues_it_first() -> None:
    s = meta_scheduler(total_tokens=24)  # 7 usable ratio-4 pages: 56 tokens of context in all
    old, new = request(20, "old", max_new=30), request(20, "new", max_new=30)  # alone each fits: 6 pages
    s.add(old)
    s.add(new)
    while not s.preemptions_total:
        fake_step(s)
    assert new in s.waiting and new.slot is None and new.num_cached == 0 and new.output_ids
    assert old in s.running and old.slot is not None
    s.add(request(3, "late", max_new=30))
    assert s.waiting[0] is new  # a preempted request goes before later arrivals
    while s.has_unfinished():
        for r in fake_step(s):
            if r.finished:
                s.finish(r)
    assert s.mgr.num_free_slots == 4 and sum(s.mgr.pages_in_use().values()) == 0


def test_fifo_with_bounded_overtaking() -> None:
    s = meta_scheduler(slots=16, total_tokens=0, budget=128)  # 16 usable pages per ratio
    hog = request(120, "hog", max_new=4)  # 15 of the 16 ratio-4 pages
    s.add(hog)
    fake_step(s)
    big = request(40, "big", max_new=4)  # 5 pages: waits for the hog
    s.add(big)
    for i in range(MAX_OVERTAKES + 3):
        s.add(request(2, f"small{i}", max_new=200))  # no pages yet: they fit
    fake_step(s)
    # small requests pass the stuck head, but only MAX_OVERTAKES of them; the rest wait behind it
    assert big.times_overtaken == MAX_OVERTAKES and s.waiting[0] is big
    assert len(s.running) == 1 + MAX_OVERTAKES and len(s.waiting) == 4
    while big.slot is None:
        for r in fake_step(s):
            if r.finished:
                s.finish(r)
    assert hog.finished and big.times_overtaken == MAX_OVERTAKES


# ---- cache sizing ------------------------------------------------------------------------------------------------
def test_pool_sized_from_free_memory() -> None:
    gib = 2**30
    # 10 GiB free x 0.5, minus 1 GiB of slot state, at 1 KiB per token
    assert pool_tokens_for_memory(10 * gib, 0.5, 1024.0, gib, cap=10**9) == 4 * gib // 1024
    assert pool_tokens_for_memory(10 * gib, 0.5, 1024.0, gib, cap=1000) == 1000  # never more than can be used
    assert pool_tokens_for_memory(10 * gib, 0.5, 0.0, gib, cap=1000) == 1000  # no paged layers at all
    with pytest.raises(ValueError, match="--mem-fraction"):
        pool_tokens_for_memory(10 * gib, 0.1, 1024.0, 2 * gib, cap=10**9)


def test_mem_fraction_and_served_model_name_flags() -> None:
    import argparse

    from dsv4.engine.engine_config import EngineConfigError, add_cli_args, from_cli

    p = argparse.ArgumentParser()
    add_cli_args(p, EngineConfig)
    c = from_cli(p.parse_args(["--mem-fraction-static", "0.5", "--served-model-name", "v4"]))
    assert (c.mem_fraction, c.served_model_name) == (0.5, "v4")
    assert EngineConfig().mem_fraction == 0.85 and EngineConfig().served_model_name is None
    for bad in (0, 1.5, True):
        with pytest.raises(EngineConfigError, match="--mem-fraction"):
            EngineConfig(mem_fraction=bad)  # type: ignore[arg-type]
    with pytest.raises(EngineConfigError, match="--served-model-name"):
        EngineConfig(served_model_name=" ")
