"""The engine's sampler on its kernel path (run here by the interpreter): a request's seed and step pick its noise."""

from __future__ import annotations

import pytest
import torch

from dsv4.engine import sampler
from dsv4.engine.request import Request
from dsv4.engine.sampling_params import SamplingParams
from dsv4.ops import sampling as ref
from dsv4.tokenizer import ByteTokenizer, IncrementalDetokenizer

V = 300


def _req(params: SamplingParams, rid: str, generated: int = 0) -> Request:
    r = Request(rid, None, [0], params, frozenset(), IncrementalDetokenizer(ByteTokenizer(V), [0]),
                sampler.request_generator(params, 42, rid, torch.device("cpu")))
    r.output_ids = list(range(generated))
    return r


def test_steps_count_generated_tokens_and_verify_rows():
    a, b = _req(SamplingParams(seed=1), "a", generated=3), _req(SamplingParams(seed=2), "b")
    assert sampler._steps([a, b, a, a]) == [3, 0, 4, 5]  # a verify of a: 1 + 2 drafts, in order


def test_seed_word_keeps_64_bits():
    r = _req(SamplingParams(seed=2**63 - 1), "x")
    assert sampler._seed_word(r) == 2**63 - 1
    r.generator = ref.make_generator(2**64 - 1, "cpu")  # a generator's seed is unsigned: its bits, as int64
    assert sampler._seed_word(r) == -1
    assert sampler._seed_word(_req(SamplingParams(seed=5), "x")) == 5
    assert sampler._seed_word(_req(SamplingParams(temperature=0), "x")) == 0  # greedy: no generator, no noise


def test_kernel_path_tokens_and_logprobs(monkeypatch):
    pytest.importorskip("triton")
    from dsv4.ops import sampling_triton

    monkeypatch.setattr(sampler, "_kernels", lambda device_type: sampling_triton)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=7, logprobs=2),
              SamplingParams(temperature=0),
              SamplingParams(temperature=1.2, top_k=20, min_p=0.02)]  # unseeded: the hash of (engine seed, id)
    reqs = [_req(p, f"r{i}", generated=i) for i, p in enumerate(params)]
    rows = [reqs[0], reqs[1], reqs[2], reqs[2]]  # r2 verifies one draft: two rows, steps 2 and 3
    logits = torch.randn(4, V) * 2
    got = sampler.sample_batch(rows, logits)
    seeds = torch.tensor([ref_seed(r) for r in rows])
    want = ref.sample_seeded(logits, torch.tensor([0.8, 0.0, 1.2, 1.2]), torch.tensor([0, 0, 20, 20]),
                             torch.tensor([0.9, 1.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 0.02, 0.02]), seeds,
                             torch.tensor([0, 1, 2, 3]))
    assert [s.token_id for s in got] == want.tolist()
    lp = torch.log_softmax(logits[0], dim=-1)
    assert got[0].logprob == pytest.approx(float(lp[want[0]]), abs=1e-6)
    assert list(got[0].top_logprobs) == lp.topk(2).indices.tolist()
    assert got[1].logprob is None
    # the same request alone, at the same step, draws the same token
    assert sampler.sample_batch([reqs[2]], logits[2:3])[0].token_id == want[2]


def ref_seed(r: Request) -> int:
    return sampler.request_seed(r.params, 42, r.request_id) if not r.params.greedy else 0
