"""Prefill + decode, chunked prefill and mixed batches all give the one-shot logits (fp32)."""

from __future__ import annotations

import pytest
import torch
from harness import build_model, new_cache, rel_err, run_chunks
from oracle import hf_to_dsv4_state, make_hf_model, tiny_config, tiny_config_b

from dsv4.engine.forward_batch import ForwardBatch

CONFIGS = {"a": tiny_config, "b": tiny_config_b}
N = 60


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def setup(request):
    cfg = CONFIGS[request.param]()
    model = build_model(cfg, hf_to_dsv4_state(make_hf_model(cfg, seed=2), cfg))
    ids = torch.randint(0, cfg.vocab_size, (N,), generator=torch.Generator().manual_seed(5)).tolist()
    cache, mgr = new_cache(cfg)
    one_shot = run_chunks(model, cache, mgr, mgr.alloc(), ids, [N])
    return cfg, model, ids, one_shot


@pytest.mark.parametrize("chunks", [
    [N],
    [1] * N,
    [17] + [1] * (N - 17),
    [1, 3, 7, 13, 36],
    [5, 1, 1, 33, 2, 18],
    [31, 29],
])
def test_chunked_equals_one_shot(setup, chunks):
    cfg, model, ids, one_shot = setup
    cache, mgr = new_cache(cfg)
    mgr.alloc()  # use a slot other than 0
    got = run_chunks(model, cache, mgr, mgr.alloc(), ids, chunks)
    assert rel_err(got, one_shot).max() <= 1e-5


def test_mixed_batch_equals_each_alone(setup):
    """Requests of different lengths, some extending and some decoding, share one forward."""
    cfg, model, ids, one_shot = setup
    cache, mgr = new_cache(cfg, slots=4)
    slots = [mgr.alloc() for _ in range(3)]
    # request 0 already holds 40 tokens and decodes; request 1 holds 9 and extends by 13; request 2 is new
    pre = {0: 40, 1: 9, 2: 0}
    for r, n in pre.items():
        if n:
            run_chunks(model, cache, mgr, slots[r], ids[:n], [n])
    plan = {0: ids[40:41], 1: ids[9:22], 2: ids[:30]}
    for r, toks in plan.items():
        mgr.reserve(slots[r], pre[r] + len(toks))
    # order in the batch differs from slot order on purpose
    order = [2, 0, 1]
    b = ForwardBatch.build([slots[r] for r in order], [pre[r] for r in order], [plan[r] for r in order],
                           all_logits=True)
    logits = model.logits(model(b, cache)[b.logits_rows])
    for i, r in enumerate(order):
        s, n = b.starts_cpu[i], b.extend_lens_cpu[i]
        want = one_shot[pre[r] : pre[r] + n]
        assert rel_err(logits[s : s + n], want).max() <= 1e-5, r
    # and the caches continue correctly: decode one more token for every request
    nxt = {0: ids[41:42], 1: ids[22:23], 2: ids[30:31]}
    for r in order:
        mgr.reserve(slots[r], pre[r] + len(plan[r]) + 1)
    b = ForwardBatch.build([slots[r] for r in order], [pre[r] + len(plan[r]) for r in order], [nxt[r] for r in order])
    logits = model.logits(model(b, cache)[b.logits_rows])
    for i, r in enumerate(order):
        p = pre[r] + len(plan[r])
        assert rel_err(logits[i : i + 1], one_shot[p : p + 1]).max() <= 1e-5
