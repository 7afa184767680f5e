"""Routing, greedy/sampling and RMSNorm(+FP8) kernels against their references on the GPU at V4-Flash shapes
(skipped without CUDA): hidden 4096, 256 routed experts, top-6, vocab 129280.

Routing ids and greedy/sampled tokens bit-exact; scored-routing weights bit-exact (libdevice softplus as torch's
CUDA kernel, pick-order sums as the reference), hash-routing weights fp32 <= 1e-5 (the fused router dots sum in
another order than cuBLAS); norms bf16 <= 1e-2, FP8 codes bit-exact given the same norm output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_kernels_sampling import _logits

from dsv4.ops import moe as moe_ref
from dsv4.ops import norm as norm_ref
from dsv4.ops import norm_triton as norm_tri
from dsv4.ops import quant
from dsv4.ops import routing_triton as route_tri
from dsv4.ops import sampling as samp_ref
from dsv4.ops import sampling_triton as samp_tri

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
D, E, TOPK, VOCAB = 4096, 256, 6, 129280
GREEDY_BATCHES = (1, 2, 3, 7, 16, 63, 64, 65, 128, 255, 256, 257, 511, 512)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().flatten(1), b.float().flatten(1)
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    return ((a - b).abs().amax(-1) / b.abs().amax(-1).clamp_min(1e-12)).max().item()


@pytest.mark.parametrize("n", [1, 16, 64, 256, 4096])
def test_route_scored_flash(n):
    x = torch.randn(n, D, device="cuda").bfloat16()
    w = torch.randn(E, D, device="cuda") / D**0.5
    bias = torch.randn(E, device="cuda") * 0.01
    logits = F.linear(x.float(), w)
    logits[: n // 2, 3] = logits[: n // 2, 1]  # exact ties
    w_ref, ids_ref = moe_ref.route_scored(logits, bias, TOPK, "sqrtsoftplus", 1.5)
    got_w, ids = route_tri.route_scored(logits, bias, TOPK, "sqrtsoftplus", 1.5)
    assert torch.equal(ids, ids_ref)
    same = (got_w == w_ref).float().mean().item()
    print(f"route_scored n={n}: ids equal, weights bit-equal {same:.4f}, rel {_rel(got_w, w_ref):.2e}")
    assert _rel(got_w, w_ref) <= 1e-5


@pytest.mark.parametrize("n", [1, 16, 256, 4096])
def test_route_hash_flash(n):
    x = torch.randn(n, D, device="cuda").bfloat16()
    w = torch.randn(E, D, device="cuda") / D**0.5
    tid2eid = torch.rand(VOCAB, E, device="cuda").argsort(dim=1)[:, :TOPK].contiguous()
    ids_in = torch.randint(0, VOCAB, (n,), device="cuda")
    w_ref, ids_ref = moe_ref.route_hash(x, w, ids_in, tid2eid, "sqrtsoftplus", 1.5)
    got_w, ids = route_tri.route_hash(x, w, ids_in, tid2eid, "sqrtsoftplus", 1.5)
    assert torch.equal(ids, ids_ref)
    print(f"route_hash n={n}: rel {_rel(got_w, w_ref):.2e}")
    assert _rel(got_w, w_ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_flash_every_batch(dtype):
    for r in GREEDY_BATCHES:
        x = _logits(r, VOCAB, dtype)
        want = samp_ref.greedy(x)
        out = torch.full((r,), -1, dtype=torch.int32, device="cuda")
        assert torch.equal(samp_tri.greedy(x, out).long(), want), r
        assert torch.equal(samp_tri.greedy(x), want), r
        finite = ~torch.isnan(x).any(-1)
        # torch.argmax documents the first maximal index; on rows without NaN the two must agree
        assert torch.equal(want[finite], torch.argmax(x[finite], dim=-1)), r


def test_greedy_in_a_cuda_graph():
    r = 64
    x = torch.randn(r, VOCAB, device="cuda")
    out = torch.empty(r, dtype=torch.int32, device="cuda")
    samp_tri.greedy(x, out)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        samp_tri.greedy(x, out)
    for _ in range(3):
        x.copy_(_logits(r, VOCAB))
        g.replay()
        assert torch.equal(out.long(), samp_ref.greedy(x))


@pytest.mark.parametrize("r", [1, 64, 512])
def test_sample_flash(r):
    x = torch.randn(r, VOCAB, device="cuda") * 3
    temperature = torch.rand(r, device="cuda") + 0.2
    temperature[::5] = 0
    top_k = torch.randint(-1, 100, (r,), device="cuda")
    top_p = torch.rand(r, device="cuda") * 0.5 + 0.5
    min_p = torch.rand(r, device="cuda") * 0.1
    seeds = torch.randint(-2**63, 2**63 - 1, (r,), device="cuda")
    steps = torch.randint(0, 1000, (r,), device="cuda")
    want = samp_ref.sample_seeded(x, temperature, top_k, top_p, min_p, seeds, steps)
    assert torch.equal(samp_tri.sample(x, temperature, top_k, top_p, min_p, seeds, steps), want)


@pytest.mark.parametrize("m", [1, 64, 256, 4096])
def test_rms_norm_flash(m):
    x = (torch.randn(m, D, device="cuda") * torch.exp2(torch.randint(-6, 6, (m, 1), device="cuda"))).bfloat16()
    w = 1 + 0.1 * torch.randn(D, device="cuda")
    y = norm_tri.rms_norm(x, w, 1e-6)
    y_ref = norm_ref.rms_norm(x, w, 1e-6)
    print(f"rms_norm m={m}: bf16 equal {(y == y_ref).float().mean().item():.4f}, rel {_rel(y, y_ref):.2e}")
    assert _rel(y, y_ref) <= 1e-2
    q, s = norm_tri.rms_norm_quant(x, w, 1e-6)
    q_own, s_own = quant.act_quant(y, 128)
    assert torch.equal(q.view(torch.uint8), q_own.view(torch.uint8))
    assert torch.equal(s.view(torch.uint8), s_own.view(torch.uint8))
    q_ref, s_ref = norm_ref.rms_norm_quant(x, w, 1e-6)
    assert _rel(quant.act_dequant(q, s), quant.act_dequant(q_ref, s_ref)) <= 0.13  # one e4m3 step at most
    assert torch.equal(norm_tri.rms_norm_quant_sim(x, w, 1e-6), quant.act_quant_sim(y, 128))
    assert _rel(norm_tri.rms_norm_quant_sim(x, w, 1e-6), norm_ref.rms_norm_quant_sim(x, w, 1e-6)) <= 0.13
