"""Cache accounting, slot/page lifecycle, snapshot/restore."""

from __future__ import annotations

import pytest
import torch
from harness import build_model, new_cache, rel_err, run_chunks
from oracle import hf_to_dsv4_state, make_hf_model, tiny_config

from dsv4.cache.manager import CacheFullError
from dsv4.cache.model_cache import ModelCache


def _all_free(mgr) -> bool:
    return mgr.num_free_slots == mgr.cache.num_slots and all(v == 0 for v in mgr.pages_in_use().values())


def test_alloc_free_abort_returns_everything():
    cfg = tiny_config()
    model = build_model(cfg, hf_to_dsv4_state(make_hf_model(cfg), cfg))
    cache, mgr = new_cache(cfg, slots=3)
    ids = list(range(1, 50))
    a, b = mgr.alloc(), mgr.alloc()
    run_chunks(model, cache, mgr, a, ids, [49])
    run_chunks(model, cache, mgr, b, ids[:20], [7, 13])  # "aborted" mid-prefill
    assert mgr.pages_in_use()[4] > 0 and mgr.pages_in_use()[8] > 0
    mgr.free(b)
    mgr.free(a)
    assert _all_free(mgr)
    with pytest.raises(KeyError):
        mgr.free(a)


def test_capacity_limits():
    cfg = tiny_config()
    cache = ModelCache(cfg, num_slots=2, max_seq_len=64, max_total_tokens=64, page_size=4)
    from dsv4.cache.manager import CacheManager

    mgr = CacheManager(cache)
    assert not mgr.can_fit(None, 65)  # longer than max_seq_len
    s = mgr.alloc()
    mgr.reserve(s, 64)
    with pytest.raises(CacheFullError):
        mgr.reserve(s, 65)
    mgr.alloc()
    assert not mgr.can_fit(None, 1)  # no slot left
    with pytest.raises(CacheFullError):
        mgr.alloc()


def test_bytes_per_token_counts_every_kind():
    cfg = tiny_config()
    cache, _ = new_cache(cfg)
    bpt = cache.bytes_per_token()
    # layers: CSA(4), HCA(8), CSA(4); fp32 entries of head_dim 32, indexer keys of 16
    assert bpt["compressed_kv"] == pytest.approx(4 * 32 * (2 / 4 + 1 / 8))
    assert bpt["indexer_keys"] == pytest.approx(4 * 16 * 2 / 4)
    per_slot = cache.bytes_per_slot()
    assert per_slot["sliding_window"] == 4 * 4 * cfg.sliding_window * cfg.head_dim
    assert per_slot["compressor_state"] > 0 and per_slot["indexer_state"] > 0


def test_snapshot_restore_identical_and_resumable():
    cfg = tiny_config()
    model = build_model(cfg, hf_to_dsv4_state(make_hf_model(cfg), cfg))
    cache, mgr = new_cache(cfg, ring_slack=4)
    ids = torch.randint(0, cfg.vocab_size, (50,), generator=torch.Generator().manual_seed(0)).tolist()
    slot = mgr.alloc()
    run_chunks(model, cache, mgr, slot, ids[:37], [37])
    before = {(lid, n): t[slot].clone() for lid, lc in cache.layers.items() for n, t in lc.slot_tensors().items()}
    snap = mgr.snapshot(slot)
    expected = run_chunks(model, cache, mgr, slot, ids[37:], [5, 8], start=37)  # crosses windows of 4 and 8
    mgr.restore(slot, snap)
    for (lid, n), t in before.items():
        assert torch.equal(getattr(cache.layers[lid], n)[slot], t), (lid, n)
    again = run_chunks(model, cache, mgr, slot, ids[37:], [13], start=37)
    assert rel_err(again, expected).max() <= 1e-5
