"""Programmatic dependent launch (dsv4/ops/pdl.py) on the GPU (skipped without an sm_90+ CUDA device).

A chain of PDL-launched kernels where each reads what the previous one wrote (the mHC boundary's two launches,
RMSNorm, the per-head q norm + rope, the next boundary...) gives bit for bit what the same chain gives launched
without PDL, eagerly and replayed from a CUDA graph on new inputs: a kernel that read before its predecessor
finished would show up as a difference (or, run after run, as noise)."""

from __future__ import annotations

import pytest
import torch
from test_kernels_hyper import HC, mixing, site, streams

from dsv4.ops import hyper_triton, norm_triton, pdl, qkv_triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                reason="needs an sm_90+ CUDA GPU")
D, ITERS, EPS, LAYERS, HEADS, HD, RD = 4096, 20, 1e-6, 6, 8, 512, 64


def _chain(x, a, post, comb, sites, cos, sin):
    outs = []
    for fn, scale, base, w in sites:
        x, y, post, comb = hyper_triton.hc_post_pre_norm(a, x, post, comb, fn, scale, base, w, HC, ITERS, EPS, EPS)
        h = norm_triton.rms_norm(y, w, EPS)
        q = qkv_triton.q_norm_rope(h.view(h.shape[0], HEADS, HD), EPS, cos, sin)
        a = q.view_as(h)
        outs += [y, post, comb, q]
    return [x, *outs]


@pytest.mark.parametrize("t", [1, 8, 64])
def test_pdl_chain_bit_identical(t):
    assert HEADS * HD == D
    dev = "cuda"
    sites = [site(D, device=dev) for _ in range(LAYERS)]
    x, a = streams(t, D, torch.bfloat16, dev), torch.randn(t, D, device=dev).bfloat16()
    post, comb = mixing(t, dev)
    ang = torch.randn(t, RD // 2, device=dev) * 10
    cos, sin = ang.cos(), ang.sin()
    args = (x, a, post, comb, sites, cos, sin)
    try:
        pdl.set_enabled(False)
        want = _chain(*args)
        pdl.set_enabled(True)
        for _ in range(3):
            got = _chain(*args)
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        # captured with PDL, replayed on new inputs copied into the static ones
        static = [s.clone() for s in (x, a, post, comb)]
        _chain(*static, sites, cos, sin)  # compile outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = _chain(*static, sites, cos, sin)
        for _ in range(3):
            new = (streams(t, D, torch.bfloat16, dev), torch.randn(t, D, device=dev).bfloat16(), *mixing(t, dev))
            for s, n in zip(static, new, strict=True):
                s.copy_(n)
            g.replay()
            pdl.set_enabled(False)
            ref = _chain(*new, sites, cos, sin)
            pdl.set_enabled(True)
            torch.cuda.synchronize()
            assert all(torch.equal(o, r) for o, r in zip(out, ref, strict=True))
    finally:
        pdl.set_enabled(True)
