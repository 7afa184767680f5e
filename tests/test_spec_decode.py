"""MTP speculative decoding on CPU: greedy output with speculation equals greedy output without, token for
token, for k in {1, 2, 3} and batch mixes, with the real MTP head and with test-only drafts that are wrong at
chosen places (rejections that cross compression-window boundaries); the acceptance rule keeps the target's
sampling distribution; the flags are checked."""

from __future__ import annotations

import random

import pytest
import torch

from dsv4 import LLM, EngineConfig, SamplingParams
from dsv4.embedded import shipped_model_dir
from dsv4.engine.sampler import to_device
from dsv4.engine.spec_decode import CatchUp, MTPDrafter, SpecStats, accept_on_device, accept_prefix, plan_verify
from dsv4.ops.sampling import filter_mask, make_generator, sample

PROMPTS = ["In the beginning", "And the LORD said unto Moses,", "Blessed are", "The",
           "And it came to pass in those days, that there went out a decree"]
GREEDY = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)


def _llm(model: str | None, **kw) -> LLM:
    return LLM(EngineConfig(model=model, device="cpu", dtype="float32", max_model_len=256, max_running_requests=4,
                            quant_sim=False, **kw), progress=False)


def _shipped() -> str:
    d = shipped_model_dir()
    if d is None:
        pytest.skip("the trained tiny model is not shipped in this checkout")
    return str(d)


@pytest.fixture(scope="module")
def baseline() -> dict[str, list[list[int]]]:
    """Greedy outputs without speculation, per model (the shipped trained one and the random one)."""
    out = {}
    for name in ("shipped", "random"):
        model = _shipped() if name == "shipped" else None
        out[name] = [o.token_ids for o in _llm(model).generate(PROMPTS, GREEDY)]
    return out


def test_accept_prefix():
    assert accept_prefix([5], []) == 0
    assert accept_prefix([1, 2, 3, 4], [1, 2, 3]) == 3
    assert accept_prefix([1, 9, 3, 4], [1, 2, 3]) == 1
    assert accept_prefix([7, 2, 3, 4], [1, 2, 3]) == 0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mtp_greedy_equals_plain(baseline, k):
    """The trained MTP head (acceptance ~0.8 at k = 1): same tokens, and drafts really are accepted."""
    llm = _llm(_shipped(), speculative_algorithm="MTP", speculative_num_steps=k)
    got = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert got == baseline["shipped"]
    st = llm.core.spec_stats
    assert st.verifies > 0 and st.accepted > 0.3 * st.proposed
    assert sum(st.histogram) == st.verifies and len(st.histogram) <= k + 1
    stats = llm.core.stats()  # what /metrics reports
    assert (stats.spec_verifies_total, stats.spec_draft_tokens_total, stats.spec_accepted_tokens_total,
            stats.spec_accepted_histogram) == (st.verifies, st.proposed, st.accepted, st.histogram)
    assert llm.core.scheduler.mgr.num_free_slots == llm.core.runner.cache.num_slots


class OracleDrafter(MTPDrafter):
    """Test-only drafts: the true greedy continuation, each draft wrong with probability ``1 - p`` (seeded). The
    MTP block still runs its catch-up and chain (its caches are exercised); only its proposals are replaced."""

    def __init__(self, base: MTPDrafter, llm: LLM, truth: list[list[int]], p: float, seed: int) -> None:
        super().__init__(base.model, base.cache, base.k, base.device, graphs=base.graphs)
        self.llm, self.truth, self.p, self.rng = llm, truth, p, random.Random(seed)

    def draft(self, streams: torch.Tensor, items: list[CatchUp]) -> torch.Tensor:
        real = super().draft(streams, items)
        by_slot = {r.slot: r for r in self.llm.core.scheduler.running}
        vocab = self.llm.model_config.vocab_size
        out = []
        for it in items:
            req = by_slot[it.slot]
            at = it.start + len(it.rows) + 1 - len(req.prompt_ids)  # output index of the first draft
            want = self.truth[int(req.request_id)][at:][: it.num_drafts]
            want = [t if self.rng.random() < self.p else (t + 1) % vocab for t in want]
            out.append(want + [0] * (self.k - len(want)))
        return to_device(out, real.device)


@pytest.mark.parametrize("k,p", [(1, 0.5), (2, 0.7), (3, 0.8), (3, 0.0), (3, 1.0)])
def test_forced_rejections_keep_greedy_exact(baseline, k, p):
    """Random model (CSA ratio 4 and HCA windows): drafts wrong at random places, so rejected rows close
    compression windows and write past what is kept; outputs must not change."""
    llm = _llm(None, speculative_algorithm="MTP", speculative_num_steps=k)
    llm.core.drafter = OracleDrafter(llm.core.drafter, llm, baseline["random"], p, seed=k)
    got = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert got == baseline["random"]
    st = llm.core.spec_stats
    if p == 1.0:
        assert st.accepted == st.proposed > 0
    if p == 0.0:
        assert st.accepted == 0


@pytest.fixture
def cpu_graphs(monkeypatch):
    """The CUDA-graph runners on the CPU (buckets 1, 2, 4): nothing is captured, the "replays" run the captured
    functions eagerly on the static buffers, so padding, host bounds and the draft graph's layout are exercised."""
    monkeypatch.setattr(EngineConfig, "graph_max_bs", lambda self: min(4, self.max_running_requests))


@pytest.mark.parametrize("k,p", [(1, 0.5), (3, 0.8)])
def test_graph_path_keeps_greedy_exact(baseline, cpu_graphs, k, p):
    """Verify and draft through the graph runners' static buffers (padded buckets: 5 prompts, 4 slots, requests
    finishing at different steps), drafts wrong at random places: outputs unchanged."""
    llm = _llm(None, speculative_algorithm="MTP", speculative_num_steps=k)
    graphs, drafts = llm.core.runner.graphs, llm.core.drafter.graphs
    assert graphs is not None and graphs.sizes == [1, k + 1] and drafts is not None
    llm.core.drafter = OracleDrafter(llm.core.drafter, llm, baseline["random"], p, seed=k)
    params = [SamplingParams(max_new_tokens=40 - 7 * i, temperature=0, ignore_eos=True) for i in range(5)]
    got = [o.token_ids for o in llm.generate(PROMPTS, params)]
    assert got == [b[: 40 - 7 * i] for i, b in enumerate(baseline["random"])]
    assert graphs.verify_replays > 0 and drafts.replays > 0
    print(f"\nk={k}: {graphs.verify_replays} verify replays, {graphs.replays} decode, {drafts.replays} draft")


def test_draft_graph_proposes_the_eager_drafts(cpu_graphs):
    """The trained MTP head through the draft graph's padded catch-up and chain: the same drafts as the eager
    drafter (same acceptance histogram) and the same output as plain decoding."""
    model, params = _shipped(), SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    runs = {}
    for graphs in (True, False):
        llm = _llm(model, speculative_algorithm="MTP", speculative_num_steps=2)
        if not graphs:
            llm.core.drafter.graphs = None
            llm.core.runner.graphs = None
        out = [o.token_ids for o in llm.generate(PROMPTS[:4], params)]
        runs[graphs] = (out, list(llm.core.spec_stats.histogram))
        if graphs:
            assert llm.core.drafter.graphs.replays > 0 and llm.core.runner.graphs.verify_replays > 0
    assert runs[True] == runs[False]
    assert runs[True][1][-1] > 0  # some verifies accepted both drafts


def test_stats_histogram():
    st = SpecStats()
    for proposed, acc in ((3, 3), (3, 0), (2, 1)):
        st.add(proposed, acc)
    assert st.histogram == [1, 1, 0, 1] and st.mean_accepted_length == pytest.approx(1 + 4 / 3)


def test_acceptance_keeps_the_target_distribution():
    """A greedy draft d is accepted when the target's own sample equals it; else that sample is emitted. The
    emitted token is then distributed as the target (accept with p(d), on rejection p without d)."""
    torch.manual_seed(0)
    v, n = 6, 40000
    logits = torch.randn(1, v)
    temp, top_k, top_p, min_p = (torch.tensor([0.9]), torch.tensor([0]), torch.tensor([1.0]),
                                 torch.tensor([0.0]))
    p = torch.softmax(logits / 0.9, -1).masked_fill(~filter_mask(logits / 0.9, top_k, top_p, min_p), 0)[0]
    p = p / p.sum()
    draft = int(p.argmax())
    gen = make_generator(1234, "cpu")
    rows = logits.expand(n, v).contiguous()
    samples = sample(rows, temp.expand(n), top_k.expand(n), top_p.expand(n), min_p.expand(n), [gen] * n).tolist()
    emitted = torch.tensor([s if accept_prefix([s], [draft]) == 0 else draft for s in samples])
    freq = torch.bincount(emitted, minlength=v).float() / n
    accept_rate = (emitted == draft).float().mean()
    assert torch.allclose(freq, p, atol=0.01), (freq, p)
    assert abs(accept_rate - p[draft]) < 0.01


def test_metrics_expose_acceptance():
    pytest.importorskip("prometheus_client")
    from dsv4.engine.outputs import EngineStats
    from dsv4.server.metrics import ServerMetrics

    class Engine:
        def stats(self) -> EngineStats:
            return EngineStats(0, 0, {}, 0, 0, 0, spec_verifies_total=5, spec_draft_tokens_total=15,
                               spec_accepted_tokens_total=9, spec_accepted_histogram=[1, 2, 0, 2])

    text = ServerMetrics(Engine()).render().decode()
    assert "dsv4_spec_verifies_total 5.0" in text and "dsv4_spec_accepted_tokens_total 9.0" in text
    assert 'dsv4_spec_verifies_by_accepted_total{accepted="3"} 2.0' in text


def test_flags():
    with pytest.raises(ValueError, match="speculative-num-draft-tokens"):
        EngineConfig(speculative_algorithm="MTP", speculative_num_steps=3, speculative_num_draft_tokens=3)
    EngineConfig(speculative_algorithm="MTP", speculative_num_steps=2, speculative_num_draft_tokens=3)
    with pytest.raises(ValueError):
        EngineConfig(speculative_algorithm="EAGLE")


def test_offline_bench_reports_acceptance(capsys):
    from dsv4.bench.offline import OfflineWorkload, run_offline

    cfg = EngineConfig(model=_shipped(), device="cpu", dtype="float32", max_model_len=256, quant_sim=False,
                       speculative_algorithm="MTP", speculative_num_steps=2)
    res = run_offline(cfg, OfflineWorkload(num_prompts=2, input_len=16, output_len=12))
    assert res["spec_verifies"] > 0 and 0 <= res["spec_acceptance"] <= 1
    assert 1 <= res["spec_tokens_per_verify"] <= 3
    assert "spec acceptance" in capsys.readouterr().out


def test_plan_and_device_acceptance():
    """Two requests, k = 3: one fed 3 drafts (2 accepted), one 1 draft padded to 4 rows (accepted: bonus row);
    the drafts' rows come from the drafter's table, the acceptance from the samples against the rows fed."""
    k, slots = 3, [2, 0]
    drafts = [[0, 0, 0], [0]]  # placeholders: the table holds the real drafts
    chunks = [[11] + drafts[0], [21] + drafts[1]]
    plan = plan_verify(slots, chunks, [True, True], drafts, [0, 4], k, pad=4)
    assert plan.draft_dst == [1, 2, 3, 5, 6, 7]  # request 1's padding rows repeat its one draft
    table = torch.zeros(3, k, dtype=torch.int64)
    table[2], table[0] = torch.tensor([12, 13, 14]), torch.tensor([22, 0, 0])
    ids = torch.tensor([11, 0, 0, 0, 21, 21, 21, 21])
    ids[torch.tensor(plan.draft_dst)] = table.view(-1)[torch.tensor(plan.draft_src)]
    assert ids.tolist() == [11, 12, 13, 14, 21, 22, 22, 22]
    samples = torch.tensor([12, 13, 99, 98, 22, 22, 22, 22])  # request 0 rejects its third draft; 1 accepts
    dev = [torch.tensor(x) for x in (plan.rows, plan.nexts, plan.live)]
    out = accept_on_device(samples, ids, *dev, k).tolist()
    assert out == [[2, 12, 13, 99, 98], [1, 22, 22, 22, 22]]  # request 1: its padding rows never match


def test_logprobs_and_sampling_with_drafts(baseline):
    """Logprob requests take the host acceptance path (same tokens and logprobs as plain decoding); sampled ones
    the device path, with valid tokens."""
    lp = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    plain = _llm(None).generate(PROMPTS[:2], lp)
    llm = _llm(None, speculative_algorithm="MTP", speculative_num_steps=2)
    llm.core.drafter = OracleDrafter(llm.core.drafter, llm, baseline["random"], 0.7, seed=5)
    spec = llm.generate(PROMPTS[:2], lp)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    for a, b in zip(spec, plain, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert [sorted(d) for d in a.top_logprobs] == [sorted(d) for d in b.top_logprobs]
    assert llm.core.spec_stats.accepted > 0
    hot = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, seed=3, ignore_eos=True)
    outs = _llm(None, speculative_algorithm="MTP", speculative_num_steps=2).generate(PROMPTS[:2], hot)
    assert all(len(o.token_ids) == 8 and all(0 <= t < 512 for t in o.token_ids) for o in outs)
