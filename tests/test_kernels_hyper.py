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
    got = tri.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS, fused=True)
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
    got = tri.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS, fused=True)
    check(got[0], ref.hc_post(a, x, post, comb), 1e-2)
    want = ref.hc_pre_norm(got[0], *s, HC, ITERS, HC_EPS, EPS)
    check(got[1], want[0], 1e-2)
    check(got[2:], want[1:], 1e-5)
    fn, scale, base, _ = site(d, m=HC)
    check(tri.hc_head(x, fn, scale, base, HC_EPS, EPS), ref.hc_head(x, fn, scale, base, HC_EPS, EPS), 1e-2)


def test_pool_reuse_and_empty(monkeypatch):
    """The pooled scratch is reused across calls and shapes do not leak into each other; no tokens, no launch."""
    monkeypatch.setattr(tri, "_POOL", {})
    d, s = 64, site(64)
    x1, x2 = streams(3, d), streams(5, d)
    tri.hc_pre_norm(x1, *s, HC, ITERS, HC_EPS, EPS)
    (buf,) = tri._POOL.values()
    check(tri.hc_pre_norm(x2, *s, HC, ITERS, HC_EPS, EPS), ref.hc_pre_norm(x2, *s, HC, ITERS, HC_EPS, EPS), 1e-5)
    check(tri.hc_pre_norm(x1, *s, HC, ITERS, HC_EPS, EPS), ref.hc_pre_norm(x1, *s, HC, ITERS, HC_EPS, EPS), 1e-5)
    assert len(tri._POOL) == 2 and any(v is buf for v in tri._POOL.values())
    y, post, comb = tri.hc_pre_norm(streams(0, d), *s, HC, ITERS, HC_EPS, EPS)
    assert y.shape == (0, d) and post.shape == (0, HC) and comb.shape == (0, HC, HC)


@pytest.mark.parametrize("bound", [512, 1 << 62], ids=["bt64", "bt128"])
def test_prefill_blocks(bound):
    """The table's prefill rows (64- and 128-token blocks, pipelined) at a token count that leaves a ragged
    last block; fp32, so the sums' order is the only difference from the reference."""
    cfg = dict(dict(tri.DEFAULTS)[bound], programs=4)
    t, d = 3 * cfg["bt"] // 2 + 1, 64
    x, a, (post, comb), s = streams(t, d), torch.randn(t, d, device=DEV), mixing(t), site(d)
    check(tri.hc_pre_norm(x, *s, HC, ITERS, HC_EPS, EPS, config=cfg),
          ref.hc_pre_norm(x, *s, HC, ITERS, HC_EPS, EPS), 1e-5)
    check(tri.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS, config=cfg),
          ref.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS), 1e-5)


def test_mix_precision_forms():
    """bf16 streams: the three-part bf16 split of fn (tensor cores) and plain fp32 FMA give mixes that agree
    to fp32 precision (post and comb within 1e-5 of the reference on the same streams); fp32 streams ignore a
    request for the split (it is exact only for bf16 operands); an unknown form is refused."""
    t, d = 9, 96
    x, s = streams(t, d, torch.bfloat16), site(d)
    want = ref.hc_pre_norm(x, *s, HC, ITERS, HC_EPS, EPS)
    for prec in ("bf16x3", "ieee"):
        got = tri.hc_pre_norm(x, *s, HC, ITERS, HC_EPS, EPS, config=dict(prec=prec))
        check(got[0], want[0], 1e-2)
        check(got[1:], want[1:], 1e-5)
    x32 = streams(t, d)
    forced = tri.hc_pre_norm(x32, *s, HC, ITERS, HC_EPS, EPS, config=dict(prec="bf16x3"))
    plain = tri.hc_pre_norm(x32, *s, HC, ITERS, HC_EPS, EPS, config=dict(prec="ieee"))
    assert all(torch.equal(f, p) for f, p in zip(forced, plain, strict=True))
    with pytest.raises(ValueError, match="precision"):
        tri.hc_pre_norm(x, *s, HC, ITERS, HC_EPS, EPS, config=dict(prec="tf32"))


@pytest.mark.parametrize("t,d,cbd", [(1, 64, 16), (5, 48, 32), (37, 40, 16), (3, 160, 64)])
def test_chunked_collapse_fp32(t, d, cbd):
    """The collapse over (token, channel chunk) programs, its norm from the streams' Gram matrix: pre+norm, the
    fused boundary (bit-equal to post then pre+norm in the same form) and the head. d 48, 40, 160: a short last
    chunk; t 37: a partial token block of the mix."""
    cfg = dict(cbd=cbd, cwarps=2)
    x, a, (post, comb), s = streams(t, d), torch.randn(t, d, device=DEV), mixing(t), site(d)
    check(tri.hc_pre_norm(x, *s, HC, ITERS, HC_EPS, EPS, config=cfg), ref.hc_pre_norm(x, *s, HC, ITERS, HC_EPS, EPS),
          1e-5)
    got = tri.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS, config=cfg, fused=True)
    check(got, ref.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS), 1e-5)
    x1 = tri.hc_post(a, x, post, comb)
    for g, w in zip(got, (x1, *tri.hc_pre_norm(x1, *s, HC, ITERS, HC_EPS, EPS, config=cfg)), strict=True):
        assert torch.equal(g, w)
    fn, scale, base, _ = site(d, m=HC)
    check(tri.hc_head(x, fn, scale, base, HC_EPS, EPS, config=cfg), ref.hc_head(x, fn, scale, base, HC_EPS, EPS),
          1e-5)


@pytest.mark.parametrize("t,d,cbd", [(7, 64, 16), (18, 48, 32)])
def test_chunked_collapse_bf16(t, d, cbd):
    """bf16 streams: the Gram matrix gives the norm of the unrounded collapse, the reference that of the rounded
    one; the normed outputs stay within a bf16 step (post/comb, fp32, within 1e-5), as in test_bf16_streams."""
    cfg = dict(cbd=cbd)
    x, a, (post, comb), s = streams(t, d, torch.bfloat16), torch.randn(t, d).to(DEV).bfloat16(), mixing(t), site(d)
    got = tri.hc_pre_norm(x, *s, HC, ITERS, HC_EPS, EPS, config=cfg)
    want = ref.hc_pre_norm(x, *s, HC, ITERS, HC_EPS, EPS)
    check(got[0], want[0], 1e-2)
    check(got[1:], want[1:], 1e-5)
    got = tri.hc_post_pre_norm(a, x, post, comb, *s, HC, ITERS, HC_EPS, EPS, config=cfg, fused=True)
    check(got[0], ref.hc_post(a, x, post, comb), 1e-2)
    want = ref.hc_pre_norm(got[0], *s, HC, ITERS, HC_EPS, EPS)
    check(got[1], want[0], 1e-2)
    check(got[2:], want[1:], 1e-5)
    fn, scale, base, _ = site(d, m=HC)
    check(tri.hc_head(x, fn, scale, base, HC_EPS, EPS, config=cfg), ref.hc_head(x, fn, scale, base, HC_EPS, EPS),
          1e-2)


def test_chunked_collapse_pool_and_refusal(monkeypatch):
    """The Gram columns make a pooled row of their own (the whole-row form's buffer is untouched); a chunk that
    is not a power of two >= 16 is refused."""
    monkeypatch.setattr(tri, "_POOL", {})
    s, x = site(64), streams(3, 64)
    tri.hc_pre_norm(x, *s, HC, ITERS, HC_EPS, EPS)
    tri.hc_pre_norm(x, *s, HC, ITERS, HC_EPS, EPS, config=dict(cbd=32))
    assert sorted(k[2] for k in tri._POOL) == [32, 32 + HC * HC]
    for bad in (8, 48):
        with pytest.raises(ValueError, match="cbd"):
            tri.hc_pre_norm(x, *s, HC, ITERS, HC_EPS, EPS, config=dict(cbd=bad))
