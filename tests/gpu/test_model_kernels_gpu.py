"""Model logits with the Triton kernels against the references on a Flash-shaped two-layer model (CSA then HCA,
V4-Flash widths, random FP8/FP4 checkpoint), bf16 and fp32, prefill chunks longer than the ring plus decodes."""

from __future__ import annotations

import pytest
import torch
from harness import run_chunks

from dsv4.cache.manager import CacheManager
from dsv4.cache.model_cache import ModelCache
from dsv4.checkpoint import write_random_checkpoint
from dsv4.config import CSA, HCA, flash_config
from dsv4.model.deepseek_v4 import DeepseekV4
from dsv4.model.layers import ModelOptions
from dsv4.weights import load_weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # 6 experts = top-6 and index_topk 512 > every entry count: no discrete choice can flip between runs
    cfg = flash_config().replace(vocab_size=4096, num_layers=2, layer_kinds=(CSA, HCA), compress_ratios=(4, 128),
                                 n_routed_experts=6, num_hash_layers=1, num_mtp_layers=0)
    d = tmp_path_factory.mktemp("flash2")
    write_random_checkpoint(cfg, d, seed=0, quantize=True)
    return cfg, d


def _logits(cfg, d, dtype, ops: str, quant_sim: bool, ids: list[int], chunks: list[int],
            kv_cache_dtype: str = "auto") -> torch.Tensor:
    with torch.device("cuda"):
        m = DeepseekV4(cfg, dtype, ModelOptions(quant_sim=quant_sim, ops=ops), with_mtp=False).eval()
    load_weights(m, cfg, d, progress=False)
    assert m.layers[0].attn.ops.name == ops
    cache = ModelCache(cfg, 2, 1024, 2048, page_size=64, dtype=dtype, device="cuda", with_mtp=False,
                       kv_cache_dtype=kv_cache_dtype)
    mgr = CacheManager(cache)
    return run_chunks(m, cache, mgr, mgr.alloc(), ids, chunks, device="cuda").float()


# fp32 runs without the FP8 simulation: with it, an fp32 ulp of difference in the kv norm (the kernel sums in
# another order) can move a value across an FP8 rounding boundary (seen: max 1.09e-4, median 1.3e-6)
@pytest.mark.parametrize("dtype,quant_sim,tol", [(torch.bfloat16, False, 1e-2), (torch.bfloat16, True, 3e-2),
                                                 (torch.float32, False, 1e-4)])
def test_model_triton_vs_ref(ckpt, dtype, quant_sim, tol):
    cfg, d = ckpt
    ids = torch.randint(0, cfg.vocab_size, (500,), generator=torch.Generator().manual_seed(3)).tolist()
    chunks = [300, 1, 1, 150, 4] + [1] * 44
    want = _logits(cfg, d, dtype, "ref", quant_sim, ids, chunks)
    got = _logits(cfg, d, dtype, "triton", quant_sim, ids, chunks)
    assert not torch.isnan(got).any()
    rows = (got - want).abs().amax(-1) / want.abs().amax(-1)
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"\nmodel logits triton vs ref, {dtype}, quant_sim={quant_sim}: max rel err {rows.max():.3e}, "
          f"median {rows.median():.3e}, argmax agreement {agree:.3f}")
    assert rows.max() <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_model_fp8_kv_cache(ckpt, dtype):
    """--kv-cache-dtype fp8 with the kernels: the logits equal the FP8 KV simulation's with an activation-dtype
    cache (the stores hold the simulated values exactly; bf16 allows the kernels' own rounding-order noise), and
    the FP8 cache with the references equals the same (bitwise in fp32)."""
    cfg, d = ckpt
    ids = torch.randint(0, cfg.vocab_size, (400,), generator=torch.Generator().manual_seed(4)).tolist()
    chunks = [300, 1, 1, 60, 4] + [1] * 34
    want = _logits(cfg, d, dtype, "triton", True, ids, chunks)
    got = _logits(cfg, d, dtype, "triton", True, ids, chunks, kv_cache_dtype="fp8")
    assert not torch.isnan(got).any()
    rows = (got - want).abs().amax(-1) / want.abs().amax(-1)
    print(f"\nmodel logits fp8 KV cache vs simulation, triton, {dtype}: max rel err {rows.max():.3e}, "
          f"identical {torch.equal(got, want)}")
    assert rows.max() <= (1e-2 if dtype == torch.bfloat16 else 1e-5)
    if dtype == torch.float32:
        ref_sim = _logits(cfg, d, dtype, "ref", True, ids, chunks)
        ref_fp8 = _logits(cfg, d, dtype, "ref", True, ids, chunks, kv_cache_dtype="fp8")
        assert torch.equal(ref_fp8, ref_sim)
