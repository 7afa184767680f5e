"""mHC kernels against dsv4.ops.hyper on the GPU at V4-Flash width (hidden 4096, hc 4, 24 mixes; skipped without
CUDA): bf16 streams with fp32 mixing (bf16 outputs <= 1e-2, fp32 post/comb <= 1e-4; after a boundary the pre side
is checked on the kernel's own new streams, since a few of their elements may round the other way), fp32 streams
(<= 1e-4),
the fused boundary on both sides of its token limit, the chunked collapse (config ``cbd``) at 1, 8, 64 tokens, and
the boundary captured in a CUDA graph and replayed on new inputs (no host syncs, pooled scratch), in both collapse
forms."""

from __future__ import annotations

import pytest
import torch
from test_kernels_hyper import HC, mixing, site, streams

from dsv4.ops import hyper as ref
from dsv4.ops import hyper_triton as tri

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
D, ITERS, HC_EPS, EPS = 4096, 20, 1e-6, 1e-6
CONSTS = (HC, ITERS, HC_EPS, EPS)
CHUNKED = dict(cbd=512, cwarps=4)  # the collapse over (token, channel chunk) programs, norm from the Gram matrix


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Per-row max relative error, worst row; NaN fails."""
    a, b = a.float().flatten(1), b.float().flatten(1)
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    return ((a - b).abs().amax(-1) / b.abs().amax(-1).clamp_min(1e-12)).max().item()


def _check(name: str, got: tuple, want: tuple, tols: tuple) -> None:
    errs = [_rel(g, w) for g, w in zip(got, want, strict=True)]
    print(f"\n{name}: rel err " + ", ".join(f"{e:.2e}" for e in errs))
    for g, w, e, tol in zip(got, want, errs, tols, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert e <= tol


def _check_boundary(name: str, got: tuple, a, x, post, comb, s: tuple) -> None:
    """New streams against the reference post; y, post, comb against the reference pre+norm of those streams;
    and the whole boundary against the reference end to end (bf16 tolerance for everything)."""
    _check(name + " (x)", got[:1], (ref.hc_post(a, x, post, comb),), (1e-2,))
    _check(name + " (y, post, comb) on its own streams", got[1:], ref.hc_pre_norm(got[0], *s, *CONSTS),
           (1e-2, 1e-4, 1e-4))
    _check(name + " end to end", got, ref.hc_post_pre_norm(a, x, post, comb, *s, *CONSTS), (1e-2,) * 4)


@pytest.mark.parametrize("t", [1, 8, 64, 300])
def test_pre_norm_flash(t):
    x, s = streams(t, D, torch.bfloat16), site(D)
    _check(f"hc_pre_norm bf16 T={t} (y, post, comb)", tri.hc_pre_norm(x, *s, *CONSTS),
           ref.hc_pre_norm(x, *s, *CONSTS), (1e-2, 1e-4, 1e-4))


@pytest.mark.parametrize("t,fused", [(1, None), (1, True), (8, True), (16, None), (64, None), (65, None),
                                     (300, None)])
def test_boundary_flash(t, fused):
    """1 and 8 by default: post then pre+norm, forced: the fused kernel; 16 to 64: fused; 65 and 300: post then
    pre+norm."""
    x, a, (post, comb), s = streams(t, D, torch.bfloat16), torch.randn(t, D, device="cuda").bfloat16(), mixing(t), site(D)
    got = tri.hc_post_pre_norm(a, x, post, comb, *s, *CONSTS, fused=fused)
    _check_boundary(f"hc_post_pre_norm bf16 T={t} fused={fused}", got, a, x, post, comb, s)
    x1 = tri.hc_post(a, x, post, comb)
    same = [torch.equal(g, w) for g, w in zip(got, (x1, *tri.hc_pre_norm(x1, *s, *CONSTS)), strict=True)]
    print(f"fused == post then pre+norm, bit for bit: {same}")


@pytest.mark.parametrize("t", [1, 64])
def test_boundary_flash_fp32(t):
    x, a, (post, comb), s = streams(t, D), torch.randn(t, D, device="cuda"), mixing(t), site(D)
    _check(f"hc_post_pre_norm fp32 T={t}", tri.hc_post_pre_norm(a, x, post, comb, *s, *CONSTS, fused=True),
           ref.hc_post_pre_norm(a, x, post, comb, *s, *CONSTS), (1e-4,) * 4)


@pytest.mark.parametrize("t", [1, 8, 300])
def test_post_and_head_flash(t):
    x, a, (post, comb) = streams(t, D, torch.bfloat16), torch.randn(t, D, device="cuda").bfloat16(), mixing(t)
    _check(f"hc_post bf16 T={t}", (tri.hc_post(a, x, post, comb),), (ref.hc_post(a, x, post, comb),), (1e-2,))
    fn, scale, base, _ = site(D, m=HC)
    _check(f"hc_head bf16 T={t}", (tri.hc_head(x, fn, scale, base, HC_EPS, EPS),),
           (ref.hc_head(x, fn, scale, base, HC_EPS, EPS),), (1e-2,))


@pytest.mark.parametrize("config,fused", [(None, None), (CHUNKED, None), (CHUNKED, True)],
                         ids=["whole-row", "chunked", "chunked-fused"])
def test_boundary_cuda_graph(config, fused):
    """Captured once, replayed on fresh inputs copied into the captured buffers: each replay matches the
    reference (a host sync or an allocation outside the pool would fail the capture or the replays)."""
    t = 8
    x, a, (post, comb), s = streams(t, D, torch.bfloat16), torch.randn(t, D, device="cuda").bfloat16(), mixing(t), site(D)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and fill the scratch pool outside the capture
            tri.hc_post_pre_norm(a, x, post, comb, *s, *CONSTS, config=config, fused=fused)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tri.hc_post_pre_norm(a, x, post, comb, *s, *CONSTS, config=config, fused=fused)
    for i in range(3):
        new_post, new_comb = mixing(t)
        x.copy_(streams(t, D, torch.bfloat16))
        a.copy_(torch.randn(t, D, device="cuda"))
        post.copy_(new_post)
        comb.copy_(new_comb)
        graph.replay()
        _check_boundary(f"graph replay {i}", out, a, x, post, comb, s)



@pytest.mark.parametrize("t", [1, 8, 64])
def test_chunked_collapse_flash(t):
    """The chunked collapse at Flash width: pre+norm and the fused boundary (bf16 as the whole-row form; the
    norm of the unrounded collapse moves a few outputs by a bf16 step at most), the head."""
    x, a, (post, comb), s = streams(t, D, torch.bfloat16), torch.randn(t, D, device="cuda").bfloat16(), mixing(t), site(D)
    _check(f"hc_pre_norm chunked bf16 T={t} (y, post, comb)", tri.hc_pre_norm(x, *s, *CONSTS, config=CHUNKED),
           ref.hc_pre_norm(x, *s, *CONSTS), (1e-2, 1e-4, 1e-4))
    got = tri.hc_post_pre_norm(a, x, post, comb, *s, *CONSTS, config=CHUNKED, fused=True)
    _check_boundary(f"hc_post_pre_norm chunked bf16 T={t}", got, a, x, post, comb, s)
    whole = tri.hc_pre_norm(got[0], *s, *CONSTS)
    chunked = tri.hc_pre_norm(got[0], *s, *CONSTS, config=CHUNKED)
    print(f"chunked against whole-row collapse: y differs in {(whole[0] != chunked[0]).float().mean().item():.2%} "
          f"of elements, max {_rel(chunked[0], whole[0]):.2e}")
    fn, scale, base, _ = site(D, m=HC)
    _check(f"hc_head chunked bf16 T={t}", (tri.hc_head(x, fn, scale, base, HC_EPS, EPS, config=CHUNKED),),
           (ref.hc_head(x, fn, scale, base, HC_EPS, EPS),), (1e-2,))


@pytest.mark.parametrize("t", [1, 8, 64])
def test_chunked_collapse_flash_fp32(t):
    x, a, (post, comb), s = streams(t, D), torch.randn(t, D, device="cuda"), mixing(t), site(D)
    _check(f"hc_pre_norm chunked fp32 T={t}", tri.hc_pre_norm(x, *s, *CONSTS, config=CHUNKED),
           ref.hc_pre_norm(x, *s, *CONSTS), (1e-4,) * 3)
    _check(f"hc_post_pre_norm chunked fp32 T={t}",
           tri.hc_post_pre_norm(a, x, post, comb, *s, *CONSTS, config=CHUNKED, fused=True),
           ref.hc_post_pre_norm(a, x, post, comb, *s, *CONSTS), (1e-4,) * 4)
