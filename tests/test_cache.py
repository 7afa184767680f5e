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


def test_fp8_kv_cache_bytes_and_logits():
    """--kv-cache-dtype fp8: pools cost nope + scale bytes + rope dims per entry, and the model's logits equal the
    FP8 KV simulation's with the activation-dtype cache (fp32, references: bit for bit), through chunks, decodes
    and a snapshot/restore."""
    from dsv4.cache.manager import CacheManager
    from dsv4.config import CSA, HCA, SLIDING
    from dsv4.ops.kv_fp8 import fp8_kv_bytes_per_row

    # nope 64 (one whole FP8 block) and an FP4-sized indexer, as the simulation needs
    cfg = tiny_config(head_dim=72, rope_dim=8, index_head_dim=32, layer_kinds=(CSA, HCA, SLIDING),
                      compress_ratios=(4, 8, 0), num_layers=3, num_hash_layers=1)
    model = build_model(cfg, hf_to_dsv4_state(make_hf_model(cfg), cfg), quant_sim=True)
    ids = torch.randint(0, cfg.vocab_size, (36,)).tolist()
    logits = {}
    for kv_dtype in ("auto", "fp8"):
        cache = ModelCache(cfg, 3, 64, 128, page_size=4, kv_cache_dtype=kv_dtype, with_mtp=False)
        mgr = CacheManager(cache)
        slot = mgr.alloc()
        first = run_chunks(model, cache, mgr, slot, ids[:30], [17, 1, 1, 11])
        snap = mgr.snapshot(slot)
        run_chunks(model, cache, mgr, slot, ids[30:], [2, 4], start=30)
        mgr.restore(slot, snap)
        logits[kv_dtype] = torch.cat((first, run_chunks(model, cache, mgr, slot, ids[30:], [1] * 6, start=30)))
        if kv_dtype == "fp8":
            row = fp8_kv_bytes_per_row(cfg.head_dim, cfg.rope_dim, torch.float32)
            assert cache.bytes_per_token()["compressed_kv"] == pytest.approx(row * (1 / 4 + 1 / 8))
            assert cache.bytes_per_slot()["sliding_window"] == 3 * cfg.sliding_window * row
    assert torch.equal(logits["fp8"], logits["auto"])
