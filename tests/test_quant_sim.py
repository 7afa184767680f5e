"""The official quantisation simulation (FP8 KV nope dims, Hadamard + FP4 indexer) against its own reference."""

from __future__ import annotations

import torch
from harness import build_model, new_cache, rel_err, run_chunks
from oracle import hf_to_dsv4_state, make_hf_model, tiny_config

from dsv4.config import CSA, HCA, SLIDING, QuantConfig
from dsv4.model.layers import fp8_sim_nope, gather_entries
from dsv4.ops.quant import fp4_act_quant_sim, hadamard_transform


def _cfg():
    # first layer CSA so its input is the same with and without the simulation; nope dim 64 = one FP8 block
    return tiny_config(head_dim=72, rope_dim=8, index_head_dim=32, layer_kinds=(CSA, HCA, SLIDING, CSA), compress_ratios=(4, 8, 0, 4))


def _models():
    cfg = _cfg()
    state = hf_to_dsv4_state(make_hf_model(cfg, seed=9), cfg)
    return cfg, build_model(cfg, state, quant_sim=False), build_model(cfg, state, quant_sim=True)


def test_first_layer_entries_are_the_simulation_of_the_exact_ones():
    cfg, plain, sim = _models()
    ids = torch.randint(0, cfg.vocab_size, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    caches = []
    for model in (plain, sim):
        cache, mgr = new_cache(cfg)
        slot = mgr.alloc()
        run_chunks(model, cache, mgr, slot, ids, [45])
        caches.append((cache, slot))
    (c0, s0), (c1, s1) = caches
    l0, l1 = c0.layers[0], c1.layers[0]
    n = 45 // 4
    exact = gather_entries(l0.comp, l0.page_table[s0], n)
    simmed = gather_entries(l1.comp, l1.page_table[s1], n)
    assert torch.equal(simmed, fp8_sim_nope(exact, cfg.nope_dim))
    assert not torch.equal(simmed, exact)
    keys0 = gather_entries(l0.index_keys, l0.page_table[s0], n)
    keys1 = gather_entries(l1.index_keys, l1.page_table[s1], n)
    assert torch.equal(keys1, fp4_act_quant_sim(hadamard_transform(keys0), 32))
    # the window ring holds the FP8-simulated nope dims and exact rope dims
    ring0, ring1 = l0.ring[s0, :45 % cfg.sliding_window], l1.ring[s1, :45 % cfg.sliding_window]
    assert torch.equal(ring1, fp8_sim_nope(ring0, cfg.nope_dim))


def test_simulated_values_are_on_their_grids_and_stable():
    cfg, _, sim = _models()
    ids = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    cache, mgr = new_cache(cfg)
    slot = mgr.alloc()
    run_chunks(sim, cache, mgr, slot, ids, [40])
    for lc in cache.layers.values():
        ring = lc.ring[slot]
        assert torch.equal(fp8_sim_nope(ring, cfg.nope_dim), ring)
        if lc.comp is not None:
            e = gather_entries(lc.comp, lc.page_table[slot], 40 // lc.ratio)
            assert torch.equal(fp8_sim_nope(e, cfg.nope_dim), e)
        if lc.index_keys is not None:
            k = gather_entries(lc.index_keys, lc.page_table[slot], 40 // lc.ratio)
            assert torch.equal(fp4_act_quant_sim(k, 32), k)


def test_simulated_model_incremental_close_to_one_shot():
    """Token-by-token decode and other chunkings reproduce the one-shot run. In fp32 any chunking changes matmul
    shapes, which can move a value across an FP8/FP4 rounding boundary (one grid step, then later rows differ by
    ~1e-3): which rows flip depends on the CPU's matmul kernels, so fp32 runs are held to a loose bound and the
    same argmax. In float64 the differences are far below any grid step: token by token must then agree to
    fp64-noise level at every row, which is what catches a wrong cache or window in the simulated paths."""
    cfg, _, sim = _models()
    ids = torch.randint(0, cfg.vocab_size, (50,), generator=torch.Generator().manual_seed(3)).tolist()
    cache, mgr = new_cache(cfg)
    one = run_chunks(sim, cache, mgr, mgr.alloc(), ids, [50])
    for chunks in ([1] * 50, [3, 7, 13, 27]):
        cache, mgr = new_cache(cfg)
        got = run_chunks(sim, cache, mgr, mgr.alloc(), ids, chunks)
        assert rel_err(got, one).max() <= 3e-2, chunks
        assert torch.equal(got.argmax(-1), one.argmax(-1)), chunks
    sim64 = sim.double()
    runs = []
    for chunks in ([50], [1] * 50):
        cache, mgr = new_cache(cfg, dtype=torch.float64)
        runs.append(run_chunks(sim64, cache, mgr, mgr.alloc(), ids, chunks))
    assert rel_err(runs[1], runs[0]).max() <= 1e-5



def test_fp8_checkpoint_with_activation_quantisation(tmp_path):
    """An FP8/FP4 checkpoint run as the official FP8 GEMMs run: inputs rounded through FP8 per 1x128."""
    from dsv4.checkpoint import write_random_checkpoint
    from dsv4.model.deepseek_v4 import DeepseekV4
    from dsv4.model.layers import ModelOptions
    from dsv4.ops.quant import act_quant_sim
    from dsv4.weights import load_weights

    cfg = _cfg().replace(hidden_size=128, moe_intermediate_size=64, expert_dtype="fp4",
                         quantization=QuantConfig())
    write_random_checkpoint(cfg, tmp_path, seed=3)
    models = {}
    for aq in (False, True):
        m = DeepseekV4(cfg, torch.float32, ModelOptions(quant_sim=True, act_quant=aq), with_mtp=False).eval()
        load_weights(m, cfg, tmp_path, progress=False)
        models[aq] = m
    # wq_a and wkv (the FP8-stored rows of the fused x projection) see the FP8-rounded input, the others not
    xp = models[True].layers[0].attn.x_proj
    assert xp.act_quant and [p.name for p in xp.quant_parts] == ["wq_a", "wkv"]
    x = torch.randn(5, cfg.hidden_size)
    want = torch.nn.functional.linear(act_quant_sim(x, 128), xp.weight[: xp.n_quant])
    assert torch.equal(xp(x)["wq_a"], want[:, : cfg.q_lora_rank])
    ids = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    out = {}
    for aq, m in models.items():
        cache, mgr = new_cache(cfg)
        out[aq] = run_chunks(m, cache, mgr, mgr.alloc(), ids, [40])
    assert not torch.equal(out[True], out[False])
    cache, mgr = new_cache(cfg)
    step = run_chunks(models[True], cache, mgr, mgr.alloc(), ids, [1] * 40)
    assert rel_err(step, out[True]).max() <= 1e-4
