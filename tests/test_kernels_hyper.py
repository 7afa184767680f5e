"""The mHC kernels against dsv4.ops.hyper (fresh random inputs each run; Triton interpreter on CPU)."""

from __future__ import annotations

import logging

import pytest
import torch
from harness import rel_err

pytest.importorskip("triton")

from dsv4.ops import hyper as ref  # noqa: E402
from dsv4.ops import hyper_triton as tri  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HC, ITERS, HC_EPS, EPS = 4, 20, 1e-6, 1e-6


def site(d: int, m: int = (2 + HC) * HC, device: str = DEV) -> tuple[torch.Tensor, ...]:
    """(fn, scale, base, norm weight) with mixes of order one and a few (so sigmoid and softmax are not flat)."""
    k = HC * d
    return (torch.randn(m, k, device=device) * 3 * k**-0.5, torch.randn(3 if m > HC else 1, device=device),
            torch.randn(m, device=device), 1 + 0.2 * torch.randn(d, device=device))


def streams(t: int, d: int, dtype=torch.float32, device: str = DEV) -> torch.Tensor:
    # correlated streams with per-token scales, like a residual stream
    base = torch.randn(t, 1, d, device=device) * torch.exp(torch.randn(t, 1, 1, device=device))
    return (base + 0.3 * torch.randn(t, HC, d, device=device) * base.abs().mean()).to(dtype)


def mixing(t: int, device: str = DEV) -> tuple[torch.Tensor, torch.Tensor]:
    """A sub-layer's post [T, hc] in (0, 2) and a doubly-stochastic-ish comb [T, hc, hc]."""
    comb = torch.softmax(torch.randn(t, HC, HC, device=device), -1)
    return 2 * torch.rand(t, HC, device=device), comb / comb.sum(-2, keepdim=True)


def check(got: tuple | torch.Tensor, want: tuple | torch.Tensor, tol: float) -> None:
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                    strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        err = rel_err(g.flatten(1).float(), w.flatten(1).float()).max()
        assert err <= tol, err


@pytest.mark.parametrize("t,d,config", [(1, 64, None), (5, 48, None), (37, 96, None), (3, 160, dict(bd=16)),
                                        (20, 64, dict(bt=32, bd=16))])
def test_pre_norm_fp32(t, d, config):
    """d 48 and 160: channel chunks cut short; t 37: a partial token block; bd 16: many chunks per split."""
    x, s = streams(t, d), site(d)
    check(tri.hc_pre_norm(x, *s, HC, ITERS, HC_EPS, EPS, config=config),
          ref.hc_pre_norm(x, *s, HC, ITERS, HC_EPS, EPS), 1e-5)


@pytest.mark.parametrize("t,d", [(1, 64), (9, 48)])
def test_post_fp32(t, d):
    x, a, (post, comb) = streams(t, d), torch.randn(t, d, device=DEV), mixing(t)
    check(tri.hc_post(a, x, post, comb), ref.hc_post(a, x, post, comb), 1e-5)


@pytest.mark.parametrize("t,d", [(1, 64), (6, 48), (33, 96)])
def test_boundary_fp32_and_same_as_unfused(t, d):
    x, a, (post, comb), s = streams(t, d), torch.randn(t, d, device=DEV), mixing(t), site(d)
    got = tri.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS)
    check(got, ref.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS), 1e-5)
    # the fused kernel forms the streams in the post kernel's order and mixes them in the same split: bit-equal
    x1 = tri.hc_post(a, x, post, comb)
    for g, w in zip(got, (x1, *tri.hc_pre_norm(x1, *s, HC, ITERS, HC_EPS, EPS)), strict=True):
        assert torch.equal(g, w)


def test_boundary_fallback_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(tri, "_fallback_logged", False)
    monkeypatch.setattr(tri, "MAX_FUSED_TOKENS", 4)  # the interpreter is slow; the switch is what is tested
    t, d = 6, 32
    x, a, (post, comb), s = streams(t, d), torch.randn(t, d, device=DEV), mixing(t), site(d)
    want = ref.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS)
    with caplog.at_level(logging.INFO, logger=tri.__name__):
        for _ in range(2):
            check(tri.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS), want, 1e-5)
    assert len([r for r in caplog.records if "separate kernels" in r.getMessage()]) == 1


@pytest.mark.parametrize("t,d", [(1, 64), (11, 48)])
def test_head_fp32(t, d):
    x = streams(t, d)
    fn, scale, base, _ = site(d, m=HC)
    check(tri.hc_head(x, fn, scale, base, HC_EPS, EPS), ref.hc_head(x, fn, scale, base, HC_EPS, EPS), 1e-5)


def test_bf16_streams():
    """bf16 streams and outputs, fp32 mixing: at most a bf16 step apart (sums in another order can round the
    other way). The pre side is checked on the kernel's own new streams: one element rounded the other way moves
    a mix of a tiny model by ~1e-4, which would say nothing about the pre kernel."""
    t, d = 7, 64
    x, a, (post, comb), s = streams(t, d, torch.bfloat16), torch.randn(t, d).to(DEV).bfloat16(), mixing(t), site(d)
    got = tri.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS)
    check(got[0], ref.hc_post(a, x, post, comb), 1e-2)
    want = ref.hc_pre_norm(got[0], *s, HC, ITERS, HC_EPS, EPS)
    check(got[1], want[0], 1e-2)
    check(got[2:], want[1:], 1e-5)
    fn, scale, base, _ = site(d, m=HC)
    check(tri.hc_head(x, fn, scale, base, HC_EPS, EPS), ref.hc_head(x, fn, scale, base, HC_EPS, EPS), 1e-2)


def test_pool_reuse_and_empty(monkeypatch):
    """The pooled scratch (partials, coefficients, arrival counters) is reused across calls and shapes do not
    leak into each other; no tokens, no launch."""
    monkeypatch.setattr(tri, "_POOL", {})
    d, s = 64, site(64)
    x1, x2 = streams(3, d), streams(5, d)
    tri.hc_pre_norm(x1, *s, HC, ITERS, HC_EPS, EPS)
    first = dict(tri._POOL)
    assert {k[0] for k in first} == {"part", "coef", "cnt"}
    check(tri.hc_pre_norm(x2, *s, HC, ITERS, HC_EPS, EPS), ref.hc_pre_norm(x2, *s, HC, ITERS, HC_EPS, EPS), 1e-5)
    check(tri.hc_pre_norm(x1, *s, HC, ITERS, HC_EPS, EPS), ref.hc_pre_norm(x1, *s, HC, ITERS, HC_EPS, EPS), 1e-5)
    assert len(tri._POOL) == 5  # T=3 and T=5 share their one token block's counter
    assert all(tri._POOL[k] is v for k, v in first.items())
    y, post, comb = tri.hc_pre_norm(streams(0, d), *s, HC, ITERS, HC_EPS, EPS)
    assert y.shape == (0, d) and post.shape == (0, HC) and comb.shape == (0, HC, HC)


def test_counters_reset_and_replayable(monkeypatch):
    """The last program of each token block resets its arrival counter: after any call every counter is zero
    again, and a second call on the same pooled buffers (what a CUDA-graph replay does) gives the same bits.
    Three token blocks of 16, three splits: several programs arrive at each counter."""
    monkeypatch.setattr(tri, "_POOL", {})
    t, d = 37, 96
    x, a, (post, comb), s = streams(t, d), torch.randn(t, d, device=DEV), mixing(t), site(d)
    cfg = dict(splits=3, bd=16, bt=16, fuse=False)
    got = tri.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS, config=cfg)
    counters = [v for k, v in tri._POOL.items() if k[0] == "cnt"]
    assert len(counters) == 1 and counters[0].shape == (3,) and not counters[0].any()
    check(got, ref.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS), 1e-5)
    again = tri.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS, config=cfg)
    assert all(torch.equal(g, w) for g, w in zip(got, again, strict=True))
    assert not counters[0].any()


@pytest.mark.parametrize("ct,cd", [(1, 64), (2, 32), (4, 16)])
def test_one_launch_collapse_equals_two(ct, cd):
    """The last program collapsing its tokens itself (one launch; tiles smaller than the row and than the token
    block, so both of its loops run several times) gives the second launch's bits, for the boundary, pre+norm
    and the head."""
    t, d = 5, 48
    x, a, (post, comb), s = streams(t, d), torch.randn(t, d, device=DEV), mixing(t), site(d)
    one, two = dict(fuse=True, ct=ct, cd=cd), dict(fuse=False, ct=ct, cd=cd)
    for cfg_a, cfg_b in ((one, two), (one, dict(fuse=False, ct=1, cd=64))):
        got = tri.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS, config=cfg_a)
        want = tri.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS, config=cfg_b)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    check(got, ref.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS), 1e-5)
    fn, scale, base, _ = site(d, m=HC)
    h1 = tri.hc_head(x, fn, scale, base, HC_EPS, EPS, config=one)
    assert torch.equal(h1, tri.hc_head(x, fn, scale, base, HC_EPS, EPS, config=two))
    check(h1, ref.hc_head(x, fn, scale, base, HC_EPS, EPS), 1e-5)


def test_batch_invariance():
    """A row's result does not depend on the rest of the batch nor on the per-batch launch parameters (token
    block, warps, collapse tiling): only the channel split, which is fixed per hidden size."""
    t, d = 6, 64
    x, a, (post, comb), s = streams(t, d), torch.randn(t, d, device=DEV), mixing(t), site(d)
    full = tri.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS, config=dict(bt=16, fuse=False))
    for lo, hi, cfg in ((2, 3, dict(fuse=True)), (1, 5, dict(bt=32, num_warps=8, ct=4, cd=32, fuse=False))):
        part = tri.hc_post_pre_norm(a[lo:hi], x[lo:hi], post[lo:hi], comb[lo:hi], *s, HC, ITERS, HC_EPS, EPS,
                                    config=cfg)
        assert all(torch.equal(g, w[lo:hi]) for g, w in zip(part, full, strict=True))


def test_rejects_other_stream_counts():
    x = torch.randn(2, 2, 32, device=DEV)
    fn, scale, base, w = site(32)
    with pytest.raises(ValueError, match="hc_mult"):
        tri.hc_pre_norm(x, fn, scale, base, w, 2, ITERS, HC_EPS, EPS)
