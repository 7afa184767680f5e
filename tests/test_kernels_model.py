"""The whole model with ops="triton" (Triton interpreter on CPU) gives the ops="ref" logits (fp32, tiny config):
prefill, decode, a chunk longer than the window ring, and a mixed batch of extend and decode rows."""

from __future__ import annotations

import pytest
import torch
from harness import new_cache, rel_err
from oracle import hf_to_dsv4_state, make_hf_model, tiny_config

from dsv4.engine.forward_batch import ForwardBatch
from dsv4.model.deepseek_v4 import DeepseekV4
from dsv4.model.layers import ModelOptions

pytest.importorskip("triton")


def _model(cfg, state, ops: str) -> DeepseekV4:
    m = DeepseekV4(cfg, torch.float32, ModelOptions(quant_sim=False, ops=ops), with_mtp=False).eval()
    m.load_state_dict(state, strict=False)
    return m


def _script(model: DeepseekV4, cfg, ids: list[int], device: str = "cpu") -> list[torch.Tensor]:
    """Request A: prefill 6, decode 2, extend 11 (> window 8 = ring), decode 1. Then A decodes beside a new
    request B prefilling 5 tokens. Returns every step's logits."""
    cache, mgr = new_cache(cfg, slots=3, max_seq=64)
    mgr.alloc()  # not slot 0
    a, b = mgr.alloc(), mgr.alloc()
    out, p = [], 0
    for n in (6, 1, 1, 11, 1):
        mgr.reserve(a, p + n)
        batch = ForwardBatch.build([a], [p], [ids[p : p + n]], all_logits=True, device=device)
        out.append(model.logits(model(batch, cache)[batch.logits_rows]).cpu())
        p += n
    mgr.reserve(a, p + 1)
    mgr.reserve(b, 5)
    batch = ForwardBatch.build([b, a], [0, p], [ids[30:35], ids[p : p + 1]], all_logits=True, device=device)
    out.append(model.logits(model(batch, cache)[batch.logits_rows]).cpu())
    return out


def test_triton_model_matches_reference():
    cfg = tiny_config()
    state = hf_to_dsv4_state(make_hf_model(cfg, seed=int(torch.randint(0, 1000, ()))), cfg)
    ids = torch.randint(0, cfg.vocab_size, (40,)).tolist()
    ref = _script(_model(cfg, state, "ref"), cfg, ids)
    # Triton on CPU runs in the interpreter; on a GPU machine the kernels run on the GPU (fp32)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        tri_model = _model(cfg, state, "triton")
        assert tri_model.layers[1].attn.ops.name == "triton"
        got = _script(tri_model, cfg, ids, dev)
    for step, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert rel_err(g, r).max() <= 1e-5, step
