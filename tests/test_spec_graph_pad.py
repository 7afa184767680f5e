"""Padded verifies under the CUDA-graph runners on CPU (their "replays" run the captured functions eagerly on the
static buffers): a decoding batch whose requests carry fewer than k drafts (near max_tokens, or none at all)
is padded to k + 1 rows per request and replays the verify graph; greedy output stays plain greedy output,
and only steps with a prompt chunk (or padding that would pass the context limit) run the target eagerly.
Small pages (2 entries) make the padding rows close windows in pages not reserved yet (the dummy page)."""

from __future__ import annotations

import collections

import pytest
from test_spec_decode import OracleDrafter

from dsv4 import LLM, EngineConfig, SamplingParams
from dsv4.engine.cuda_graph import StaticGraph

PROMPTS = ["In the beginning", "And the LORD said unto Moses,", "Blessed are", "And it came to pass"]
LENGTHS = [23, 17, 12, 9]  # requests finish at different steps: tails with 0..k-1 drafts beside full verifies


def _llm(max_model_len: int = 128, **kw) -> LLM:
    return LLM(EngineConfig(model=None, device="cpu", dtype="float32", max_model_len=max_model_len,
                            max_running_requests=4, page_size=2, quant_sim=False, **kw), progress=False)


def _params(lengths: list[int]) -> list[SamplingParams]:
    return [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in lengths]


@pytest.fixture(scope="module")
def plain() -> list[list[int]]:
    return [o.token_ids for o in _llm().generate(PROMPTS, _params([max(LENGTHS)] * 4))]


@pytest.fixture
def cpu_graphs(monkeypatch):
    monkeypatch.setattr(EngineConfig, "graph_max_bs", lambda self: min(4, self.max_running_requests))


def _record(llm: LLM) -> list[tuple[str, bool, bool, int]]:
    """Per target forward: (eager or graph, whether its batch had a prompt chunk, whether some request had fewer
    than k drafts, the largest position it feeds). The graphs keep the original bound ``_forward_eager``; the
    runner's own call finds this one."""
    core, runner, log = llm.core, llm.core.runner, []
    schedule, eager = core.scheduler.schedule, runner._forward_eager
    k = core.config.speculative_num_steps
    state = {}

    def sched():
        b = state["batch"] = schedule()
        return b

    def forward(batch):
        b = state["batch"]
        prompt = any(len(c) != 1 + len(d) for c, d in zip(b.chunks, b.drafts, strict=True))
        log[-1] = ("eager", prompt, *log[-1][2:])
        return eager(batch)

    def run(batch):
        b = state["batch"]
        log.append(("graph", False, any(len(d) < k for d in b.drafts), int(batch.positions.max())))
        return real_forward(batch)

    real_forward = runner.forward
    core.scheduler.schedule, runner._forward_eager, runner.forward = sched, forward, run
    return log


@pytest.mark.parametrize("k,p", [(3, 1.0), (3, 0.6), (2, 0.0)])
def test_short_drafts_replay_the_verify_graph(plain, cpu_graphs, k, p):
    llm = _llm(speculative_algorithm="MTP", speculative_num_steps=k)
    graphs, drafts = llm.core.runner.graphs, llm.core.drafter.graphs
    assert sorted(drafts.graphs) == [(m, b) for m in range(1, k + 2) for b in (1, 2, 4)]
    rows = collections.Counter()  # draft replays by catch-up rows per request
    for (m, _), g in drafts.graphs.items():
        g.replay = lambda g=g, m=m: (rows.update([m]), StaticGraph.replay(g))[1]
    llm.core.drafter = OracleDrafter(llm.core.drafter, llm, plain, p, seed=1)
    log = _record(llm)
    got = [o.token_ids for o in llm.generate(PROMPTS, _params(LENGTHS))]
    assert got == [t[:n] for t, n in zip(plain, LENGTHS, strict=True)]
    assert rows and set(rows) <= ({1} if p == 0 else set(range(1, k + 2)))  # all rejected: one row each
    if 0 < p < 1:
        assert len(rows) > 1
    assert all(prompt for how, prompt, *_ in log if how == "eager"), log  # only prompt chunks run eagerly
    assert any(how == "graph" and short for how, _, short, _ in log)  # padded verifies happened
    assert graphs.verify_replays > 0
    assert llm.core.scheduler.mgr.num_free_slots == llm.core.runner.cache.num_slots - 1  # the padding slot


def test_padding_never_passes_the_context_limit(cpu_graphs):
    """Requests that end at max_model_len (18): the steps whose padding would reach it run eagerly; output
    unchanged. Padding the first request's last step (positions 16..19) would close ratio-4 entry 4, past its
    page table (4 entries: the store would clamp it onto entry 2's row, which the row at 16 reads)."""
    prompts, n, limit = [list(range(5, 15)), list(range(40, 47))], [8, 10], 18
    ref = [o.token_ids for o in _llm(limit).generate(prompts, _params(n))]
    llm = _llm(limit, speculative_algorithm="MTP", speculative_num_steps=3)
    llm.core.drafter = OracleDrafter(llm.core.drafter, llm, ref, 0.0, seed=1)  # one token per step: every position visited
    log = _record(llm)
    got = [o.token_ids for o in llm.generate(prompts, _params(n))]
    assert got == ref
    assert max(top for *_, top in log) == limit - 1  # nothing fed at or past the limit (rope, page tables)
    assert any(how == "eager" and not prompt for how, prompt, *_ in log)  # the steps near the limit
    assert any(how == "graph" and short for how, _, short, _ in log)


def test_ids_slices_prompt_and_output():
    from types import SimpleNamespace

    from dsv4.engine.engine_core import _ids

    req = SimpleNamespace(prompt_ids=[1, 2, 3], output_ids=[4, 5])
    all_ids = req.prompt_ids + req.output_ids
    assert all(_ids(req, lo, hi) == all_ids[lo:hi] for lo in range(6) for hi in range(lo, 7))
