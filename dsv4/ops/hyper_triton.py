"""Triton kernels for mHC (references: :mod:`dsv4.ops.hyper`): pre + RMSNorm, post, the fused layer boundary
(post of one sub-layer, pre + RMSNorm of the next) and the final hyper head. Written for ``hc_mult == 4`` (every
DSV4 config): the per-token 4 x 4 Sinkhorn is sixteen register vectors, so its 40 dependent normalisations are
plain in-thread arithmetic (no shuffles, no shared memory, no barriers).

Launch 1, ``_split_kernel``, grid (splits S, token blocks): program (s, tb) owns a fixed channel range of every
stream (``CH`` chunks of ``BD`` channels). In the boundary form it first builds the new streams on its range
(``post * a + comb^T x``, the post kernel's order), stores them rounded to the model dtype and mixes the rounded
values, as the unfused ops would. It writes two partials of its range into a scratch ``[S, T, 48]``: the 24 mixes
(``flat @ fn^T``, tl.dot in IEEE fp32) and the 16 entries of the per-token Gram matrix of the streams
(``G[i, j] = sum_d x_i[d] x_j[d]``, also a tl.dot). The trace of G is the sum of squares of the flattened streams
(the mix RMS); ``pre^T G pre`` is the sum of squares of the collapse (the RMSNorm), so no phase after the mixes
needs a reduction over D. The program then increments the token block's arrival counter (acq_rel atomic, after a
CTA barrier so that every thread's partials are ordered before it); the last of the S programs to arrive sums the
S partials in the fixed order s = 0..S-1, computes the mixes, sigmoids and Sinkhorn, writes post, comb and the
collapse coefficients (pre, RMSNorm factor), and resets the counter to zero (CUDA-graph replays need no memset).

Collapse: with ``fuse`` that last program also collapses its tokens' streams (one launch in all: best when a
few tokens make the collapse a few tens of KB); otherwise ``_collapse_kernel``, grid (token tiles, channel
tiles), collapses and normalises in parallel (launch 2).

Batch invariance: a row's bits depend only on (S, BD), which :func:`default_config` takes from the hidden size
alone (``SPLITS``); the token block, warps and collapse tiling may change with the batch (``ROWS``). tl.dot in
IEEE fp32 is an FMA chain over k per output element (no reduction tree), partials are summed in a fixed order,
and every later step is elementwise or an explicit sum of named terms.

The collapse's RMSNorm uses ``pre^T G pre`` (the unrounded collapse) where the reference takes the collapse
rounded to the model dtype: in bf16 that moves the norm factor by ~1e-5 relative (rounding errors average out
over D), far below one bf16 step; in fp32 there is no rounding.

The fused boundary runs for up to :data:`MAX_FUSED_TOKENS` tokens (decode, verify, draft steps), with its
scratch and counters taken from a pool keyed by shape, so CUDA-graph replays of those steps reuse fixed buffers
and never allocate. Larger batches (extend) run post and pre+norm as two ops with per-call scratch: pooling every
prefill length would keep one buffer per length alive. That switch is logged once.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
MAX_FUSED_TOKENS = 64
HC = 4
PW = 48  # scratch row: 32 mix columns (24 used) + 16 Gram entries
CW = 8  # coefficient row: pre_0..3, RMSNorm factor, pad
# Channel split per hidden size: (splits, channels per chunk). A row's bits depend on these, so they must not
# change with the batch. Set from `python benchmarks/kernels.py --only hyper` (it prints the winning entry).
SPLITS: dict[int, tuple[int, int]] = {4096: (64, 32)}
# Per batch size (first entry with rows <= max_rows): token block and warps of launch 1, whether the last
# program collapses (one launch), the collapse tile (tokens x channels) and the collapse kernel's warps.
ROWS: tuple[tuple[int, dict], ...] = (
    (1, dict(bt=16, num_warps=4, fuse=True, ct=1, cd=4096, cwarps=8)),
    (8, dict(bt=16, num_warps=4, fuse=False, ct=1, cd=1024, cwarps=4)),
    (64, dict(bt=16, num_warps=4, fuse=False, ct=2, cd=1024, cwarps=4)),
    (1 << 62, dict(bt=32, num_warps=8, fuse=False, ct=4, cd=1024, cwarps=8)),
)
_POOL: dict[tuple, torch.Tensor] = {}
_fallback_logged = False


@triton.jit
def _col(tile, cols, j: tl.constexpr):
    """Column j of a [BT, N] tile as a [BT] vector (a sum of one value and zeros: exact in any order)."""
    return tl.sum(tl.where(cols[None, :] == j, tile, 0.0), axis=1)


@triton.jit
def _row_norm(a, b, c, d, eps):
    s = a + b + c + d + eps
    return a / s, b / s, c / s, d / s


@triton.jit
def _row_softmax(a, b, c, d, eps):
    mx = tl.maximum(tl.maximum(a, b), tl.maximum(c, d))
    a, b, c, d = tl.exp(a - mx), tl.exp(b - mx), tl.exp(c - mx), tl.exp(d - mx)
    s = a + b + c + d
    return a / s + eps, b / s + eps, c / s + eps, d / s + eps


@triton.jit
def _collapse_tile(xs_ptr, coef_ptr, w_ptr, out_ptr, t0, d0, T, D, CT: tl.constexpr, CD: tl.constexpr,
                   NORM: tl.constexpr, DT: tl.constexpr):
    """out[t, d] for tokens t0..t0+CT, channels d0..d0+CD: the collapse ``sum_j pre_j x_j`` rounded to the
    model dtype, then (NORM) ``w * (h * rn)``. Streams loaded past L1 (.cg): in the one-launch form other
    programs of this launch wrote them."""
    t = (t0 + tl.arange(0, CT)).to(tl.int64)
    d = d0 + tl.arange(0, CD)
    tm = t < T
    m2 = tm[:, None] & (d < D)[None, :]
    h = tl.zeros([CT, CD], dtype=tl.float32)
    for j in tl.static_range(4):
        p = tl.load(coef_ptr + t * 8 + j, mask=tm, other=0.0, cache_modifier=".cg")
        xj = tl.load(xs_ptr + t[:, None] * (4 * D) + j * D + d[None, :], mask=m2, other=0.0, cache_modifier=".cg")
        h += p[:, None] * xj.to(tl.float32)
    h = h.to(DT).to(tl.float32)
    if NORM:
        rn = tl.load(coef_ptr + t * 8 + 4, mask=tm, other=0.0, cache_modifier=".cg")
        w = tl.load(w_ptr + d, mask=d < D, other=0.0)
        h = w[None, :] * (h * rn[:, None])
    tl.store(out_ptr + t[:, None] * D + d[None, :], h.to(DT), mask=m2)


@triton.jit
def _finish(part_ptr, scale_ptr, base_ptr, coef_ptr, post_ptr, comb_ptr, tb, T, D, iters, hc_eps, norm_eps,
            S: tl.constexpr, BT: tl.constexpr, HEAD: tl.constexpr, NORM: tl.constexpr):
    """The last program of a token block: partials -> mixes -> pre/post/comb and the collapse coefficients."""
    t = (tb * BT + tl.arange(0, BT)).to(tl.int64)
    tm = t < T
    n = tl.arange(0, 32)
    g = tl.arange(0, 16)
    acc = tl.zeros([BT, 32], dtype=tl.float32)
    gram = tl.zeros([BT, 16], dtype=tl.float32)
    for s in tl.static_range(S):  # fixed order: the sum does not depend on which program arrived last
        row = (s * T + t) * 48
        acc += tl.load(part_ptr + row[:, None] + n[None, :], mask=tm[:, None], other=0.0, cache_modifier=".cg")
        gram += tl.load(part_ptr + row[:, None] + 32 + g[None, :], mask=tm[:, None], other=0.0,
                        cache_modifier=".cg")
    ss = _col(gram, g, 0) + _col(gram, g, 5) + _col(gram, g, 10) + _col(gram, g, 15)
    r = tl.rsqrt(ss / (4 * D) + norm_eps)
    s0 = tl.load(scale_ptr)
    p0 = tl.sigmoid(_col(acc, n, 0) * r * s0 + tl.load(base_ptr + 0)) + hc_eps
    p1 = tl.sigmoid(_col(acc, n, 1) * r * s0 + tl.load(base_ptr + 1)) + hc_eps
    p2 = tl.sigmoid(_col(acc, n, 2) * r * s0 + tl.load(base_ptr + 2)) + hc_eps
    p3 = tl.sigmoid(_col(acc, n, 3) * r * s0 + tl.load(base_ptr + 3)) + hc_eps
    crow = coef_ptr + t * 8
    tl.store(crow + 0, p0, mask=tm)
    tl.store(crow + 1, p1, mask=tm)
    tl.store(crow + 2, p2, mask=tm)
    tl.store(crow + 3, p3, mask=tm)
    if NORM:
        q = (p0 * p0 * _col(gram, g, 0) + p1 * p1 * _col(gram, g, 5) + p2 * p2 * _col(gram, g, 10)
             + p3 * p3 * _col(gram, g, 15))
        q += 2 * (p0 * (p1 * _col(gram, g, 1) + p2 * _col(gram, g, 2) + p3 * _col(gram, g, 3))
                  + p1 * (p2 * _col(gram, g, 6) + p3 * _col(gram, g, 7)) + p2 * p3 * _col(gram, g, 11))
        tl.store(crow + 4, tl.rsqrt(tl.maximum(q, 0.0) / D + norm_eps), mask=tm)
    if not HEAD:
        s1 = tl.load(scale_ptr + 1)
        prow = post_ptr + t * 4
        for j in tl.static_range(4):
            tl.store(prow + j, 2 * tl.sigmoid(_col(acc, n, 4 + j) * r * s1 + tl.load(base_ptr + 4 + j)), mask=tm)
        s2 = tl.load(scale_ptr + 2)
        # c{i}{k} = C[i][k]; the row softmax is the first row step
        c00, c01, c02, c03 = _row_softmax(_col(acc, n, 8) * r * s2 + tl.load(base_ptr + 8),
                                          _col(acc, n, 9) * r * s2 + tl.load(base_ptr + 9),
                                          _col(acc, n, 10) * r * s2 + tl.load(base_ptr + 10),
                                          _col(acc, n, 11) * r * s2 + tl.load(base_ptr + 11), hc_eps)
        c10, c11, c12, c13 = _row_softmax(_col(acc, n, 12) * r * s2 + tl.load(base_ptr + 12),
                                          _col(acc, n, 13) * r * s2 + tl.load(base_ptr + 13),
                                          _col(acc, n, 14) * r * s2 + tl.load(base_ptr + 14),
                                          _col(acc, n, 15) * r * s2 + tl.load(base_ptr + 15), hc_eps)
        c20, c21, c22, c23 = _row_softmax(_col(acc, n, 16) * r * s2 + tl.load(base_ptr + 16),
                                          _col(acc, n, 17) * r * s2 + tl.load(base_ptr + 17),
                                          _col(acc, n, 18) * r * s2 + tl.load(base_ptr + 18),
                                          _col(acc, n, 19) * r * s2 + tl.load(base_ptr + 19), hc_eps)
        c30, c31, c32, c33 = _row_softmax(_col(acc, n, 20) * r * s2 + tl.load(base_ptr + 20),
                                          _col(acc, n, 21) * r * s2 + tl.load(base_ptr + 21),
                                          _col(acc, n, 22) * r * s2 + tl.load(base_ptr + 22),
                                          _col(acc, n, 23) * r * s2 + tl.load(base_ptr + 23), hc_eps)
        c00, c10, c20, c30 = _row_norm(c00, c10, c20, c30, hc_eps)  # column normalisations
        c01, c11, c21, c31 = _row_norm(c01, c11, c21, c31, hc_eps)
        c02, c12, c22, c32 = _row_norm(c02, c12, c22, c32, hc_eps)
        c03, c13, c23, c33 = _row_norm(c03, c13, c23, c33, hc_eps)
        for _ in range(iters - 1):
            c00, c01, c02, c03 = _row_norm(c00, c01, c02, c03, hc_eps)
            c10, c11, c12, c13 = _row_norm(c10, c11, c12, c13, hc_eps)
            c20, c21, c22, c23 = _row_norm(c20, c21, c22, c23, hc_eps)
            c30, c31, c32, c33 = _row_norm(c30, c31, c32, c33, hc_eps)
            c00, c10, c20, c30 = _row_norm(c00, c10, c20, c30, hc_eps)
            c01, c11, c21, c31 = _row_norm(c01, c11, c21, c31, hc_eps)
            c02, c12, c22, c32 = _row_norm(c02, c12, c22, c32, hc_eps)
            c03, c13, c23, c33 = _row_norm(c03, c13, c23, c33, hc_eps)
        crow = comb_ptr + t * 16
        tl.store(crow + 0, c00, mask=tm)
        tl.store(crow + 1, c01, mask=tm)
        tl.store(crow + 2, c02, mask=tm)
        tl.store(crow + 3, c03, mask=tm)
        tl.store(crow + 4, c10, mask=tm)
        tl.store(crow + 5, c11, mask=tm)
        tl.store(crow + 6, c12, mask=tm)
        tl.store(crow + 7, c13, mask=tm)
        tl.store(crow + 8, c20, mask=tm)
        tl.store(crow + 9, c21, mask=tm)
        tl.store(crow + 10, c22, mask=tm)
        tl.store(crow + 11, c23, mask=tm)
        tl.store(crow + 12, c30, mask=tm)
        tl.store(crow + 13, c31, mask=tm)
        tl.store(crow + 14, c32, mask=tm)
        tl.store(crow + 15, c33, mask=tm)


@triton.jit
def _split_kernel(x_ptr, a_ptr, pin_ptr, cin_ptr, xs_ptr, fn_ptr, part_ptr, cnt_ptr, scale_ptr, base_ptr, w_ptr,
                  coef_ptr, post_ptr, comb_ptr, out_ptr, T, D, iters, hc_eps, norm_eps, S: tl.constexpr,
                  CH: tl.constexpr, M: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, POST: tl.constexpr,
                  HEAD: tl.constexpr, NORM: tl.constexpr, FUSE: tl.constexpr, CT: tl.constexpr, CD: tl.constexpr,
                  DT: tl.constexpr):
    s, tb = tl.program_id(0), tl.program_id(1)
    K = 4 * D
    t = (tb * BT + tl.arange(0, BT)).to(tl.int64)
    tmask = t < T
    k = tl.arange(0, 4)
    n = tl.arange(0, 32)
    g = tl.arange(0, 16)
    kk = tl.arange(0, 4 * BD)  # (stream, channel) of a chunk, stream-major like the flattened streams
    # Gram selector: row (i, j, d) of the [BT, 16 * BD] products feeds column i * 4 + j
    sel = ((tl.arange(0, 16 * BD) // BD)[:, None] == g[None, :]).to(tl.float32)
    t3, tm3, k3 = t[:, None, None], tmask[:, None, None], k[None, :, None]
    acc = tl.zeros([BT, 32], dtype=tl.float32)
    gram = tl.zeros([BT, 16], dtype=tl.float32)
    if POST:
        post = tl.load(pin_ptr + t3 * 4 + k3, mask=tm3, other=0.0)  # [BT, 4, 1]
    for c in range(CH):
        d0 = (s * CH + c) * BD
        d = d0 + tl.arange(0, BD)
        d3 = d[None, None, :]
        m3 = tm3 & (d3 < D)
        offs = t3 * K + k3 * D + d3  # [BT, 4, BD]
        if POST:
            a = tl.load(a_ptr + t3 * D + d3, mask=m3, other=0.0).to(tl.float32)  # [BT, 1, BD]
            y = post * a
            for i in tl.static_range(4):
                xi = tl.load(x_ptr + t3 * K + i * D + d3, mask=m3, other=0.0).to(tl.float32)
                ci = tl.load(cin_ptr + t3 * 16 + i * 4 + k3, mask=tm3, other=0.0)  # comb[t, i, k]
                y += ci * xi
            y = y.to(DT)
            tl.store(xs_ptr + offs, y, mask=m3)
            y = y.to(tl.float32)
        else:
            y = tl.load(x_ptr + offs, mask=m3, other=0.0).to(tl.float32)
        dk = d0 + kk % BD
        col = (kk // BD) * D + dk
        w = tl.load(fn_ptr + n[None, :] * K + col[:, None], mask=(dk < D)[:, None] & (n < M)[None, :], other=0.0)
        acc = tl.dot(tl.reshape(y, [BT, 4 * BD]), w, acc, input_precision="ieee")
        prod = tl.reshape(y[:, :, None, :] * y[:, None, :, :], [BT, 16 * BD])
        gram = tl.dot(prod, sel, gram, input_precision="ieee")
    row = (s * T + t[:, None]) * 48
    tl.store(part_ptr + row + n[None, :], acc, mask=tmask[:, None])
    tl.store(part_ptr + row + 32 + g[None, :], gram, mask=tmask[:, None])
    tl.debug_barrier()  # every thread's partials (and new streams) before the release below
    arrived = tl.atomic_add(cnt_ptr + tb, 1, sem="acq_rel", scope="gpu")
    if arrived == S - 1:
        tl.debug_barrier()
        _finish(part_ptr, scale_ptr, base_ptr, coef_ptr, post_ptr, comb_ptr, tb, T, D, iters, hc_eps, norm_eps,
                S, BT, HEAD, NORM)
        if FUSE:
            tl.debug_barrier()  # this CTA's coefficient stores before its collapse reads them
            for t0 in range(tb * BT, tl.minimum(tb * BT + BT, T), CT):
                for dc in range(0, D, CD):
                    _collapse_tile(xs_ptr, coef_ptr, w_ptr, out_ptr, t0, dc, T, D, CT, CD, NORM, DT)
        tl.atomic_xchg(cnt_ptr + tb, 0, sem="relaxed", scope="gpu")  # ready for the next launch / replay


@triton.jit
def _collapse_kernel(xs_ptr, coef_ptr, w_ptr, out_ptr, T, D, CT: tl.constexpr, CD: tl.constexpr,
                     NORM: tl.constexpr, DT: tl.constexpr):
    _collapse_tile(xs_ptr, coef_ptr, w_ptr, out_ptr, tl.program_id(0) * CT, tl.program_id(1) * CD, T, D, CT, CD,
                   NORM, DT)


@triton.jit
def _post_kernel(a_ptr, x_ptr, post_ptr, comb_ptr, out_ptr, D, HC: tl.constexpr, BD: tl.constexpr,
                 DT: tl.constexpr):
    t, db = tl.program_id(0).to(tl.int64), tl.program_id(1)
    K = HC * D
    d = db * BD + tl.arange(0, BD)
    dmask = d < D
    k = tl.arange(0, HC)
    a = tl.load(a_ptr + t * D + d, mask=dmask, other=0.0).to(tl.float32)
    y = tl.load(post_ptr + t * HC + k)[:, None] * a[None, :]
    for i in tl.static_range(HC):  # the same order as the boundary kernel: fused and unfused agree bit for bit
        xi = tl.load(x_ptr + t * K + i * D + d, mask=dmask, other=0.0).to(tl.float32)
        y += tl.load(comb_ptr + t * (HC * HC) + i * HC + k)[:, None] * xi[None, :]
    tl.store(out_ptr + t * K + k[:, None] * D + d[None, :], y.to(DT), mask=dmask[None, :])


def default_config(t: int, d: int, device: torch.device) -> dict:
    """Launch parameters for ``t`` tokens of hidden size ``d``: ``splits`` and ``bd`` (channels per chunk) from
    :data:`SPLITS` by ``d`` only (batch invariance), the rest from :data:`ROWS` by ``t``. On the CPU
    (interpreter) a few splits of 16 channels, so that tests stay fast and still cover several chunks."""
    if device.type != "cuda":
        return dict(splits=min(4, triton.cdiv(d, 16)), bd=16, bt=16, num_warps=4, fuse=t <= 2, ct=2,
                    cd=min(64, triton.next_power_of_2(d)), cwarps=4)
    splits, bd = SPLITS.get(d, (max(1, min(64, d // 64)), 32))
    rows = next(cfg for limit, cfg in ROWS if t <= limit)
    return dict(rows, splits=splits, bd=bd, cd=min(rows["cd"], triton.next_power_of_2(d)))


def _pooled(key: tuple, make) -> torch.Tensor:
    buf = _POOL.get(key)
    if buf is None:
        buf = _POOL[key] = make()
    return buf


def _scratch(s: int, t: int, tb: int, device: torch.device, pooled: bool) -> tuple[torch.Tensor, ...]:
    """(partials [S, T, 48] fp32, coefficients [T, 8] fp32, arrival counters [token blocks] int32 zeros)."""
    def part() -> torch.Tensor:
        return torch.empty(s, t, PW, dtype=torch.float32, device=device)

    def coef() -> torch.Tensor:
        return torch.empty(t, CW, dtype=torch.float32, device=device)

    def cnt() -> torch.Tensor:
        return torch.zeros(tb, dtype=torch.int32, device=device)

    if not pooled:
        return part(), coef(), cnt()
    return (_pooled(("part", s, t, device), part), _pooled(("coef", t, device), coef),
            _pooled(("cnt", tb, device), cnt))


def _check(x: torch.Tensor, hc_mult: int) -> None:
    hc = x.shape[1]
    if hc != hc_mult or hc != HC:
        raise ValueError(f"the mHC kernels take streams [T, {HC}, D] (hc_mult {HC}), got {hc} (hc_mult {hc_mult})")


def _run(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_weight: torch.Tensor | None,
         iters: int, hc_eps: float, norm_eps: float, a: torch.Tensor | None = None, post: torch.Tensor | None = None,
         comb: torch.Tensor | None = None, head: bool = False, pooled: bool = True,
         config: dict | None = None) -> tuple[torch.Tensor, ...]:
    """Launch 1 (and 2 unless fused). x: [T, 4, D] contiguous, T >= 1. Returns (streams collapsed: x, or the new
    streams when ``a`` is given; out [T, D]; post [T, 4]; comb [T, 4, 4]) (post, comb None for the head)."""
    t, _, d = x.shape
    m = fn.shape[0]
    cfg = dict(default_config(t, d, x.device), **(config or {}))
    bt, bd = cfg["bt"], cfg["bd"]
    n_chunks = triton.cdiv(d, bd)
    chunks = triton.cdiv(n_chunks, max(1, min(cfg["splits"], n_chunks)))
    s = triton.cdiv(n_chunks, chunks)
    tb = triton.cdiv(t, bt)
    part, coef, cnt = _scratch(s, t, tb, x.device, pooled)
    xs = x if a is None else torch.empty_like(x)
    out = torch.empty(t, d, dtype=x.dtype, device=x.device)
    post_out = None if head else torch.empty(t, HC, dtype=torch.float32, device=x.device)
    comb_out = None if head else torch.empty(t, HC, HC, dtype=torch.float32, device=x.device)
    w = out if norm_weight is None else norm_weight.float().contiguous()
    ct, cd = cfg["ct"], min(cfg["cd"], triton.next_power_of_2(d))
    fuse = bool(cfg["fuse"])
    _split_kernel[(s, tb)](
        x, x if a is None else a.contiguous(), x if post is None else post, x if comb is None else comb, xs,
        fn.float().contiguous(), part, cnt, scale.float().contiguous(), base.float().contiguous(), w, coef,
        out if head else post_out, out if head else comb_out, out, t, d, iters, hc_eps, norm_eps, S=s, CH=chunks,
        M=m, BT=bt, BD=bd, POST=a is not None, HEAD=head, NORM=norm_weight is not None, FUSE=fuse, CT=ct, CD=cd,
        DT=_TL[x.dtype], num_warps=cfg["num_warps"])
    if not fuse:
        _collapse_kernel[(triton.cdiv(t, ct), triton.cdiv(d, cd))](
            xs, coef, w, out, t, d, CT=ct, CD=cd, NORM=norm_weight is not None, DT=_TL[x.dtype],
            num_warps=cfg["cwarps"])
    return xs, out, post_out, comb_out


def hc_pre_norm(
    x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_weight: torch.Tensor,
    hc_mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float, config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel for :func:`dsv4.ops.hyper.hc_pre_norm`. x: [T, 4, D] (bf16/fp32); fn [24, 4*D] fp32."""
    _check(x, hc_mult)
    t, hc, d = x.shape
    if t == 0:
        return x.new_empty(0, d), x.new_empty(0, hc, dtype=torch.float32), x.new_empty(0, hc, hc, dtype=torch.float32)
    _, out, post, comb = _run(x.contiguous(), fn, scale, base, norm_weight, sinkhorn_iters, hc_eps, norm_eps,
                              pooled=t <= MAX_FUSED_TOKENS, config=config)
    return out, post, comb


def hc_post(a: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.hyper.hc_post`. a: [T, D]; x: [T, hc, D]; post [T, hc], comb [T, hc, hc] fp32."""
    t, hc, d = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if t:
        bd = min(1024, triton.next_power_of_2(d))
        _post_kernel[(t, triton.cdiv(d, bd))](a.contiguous(), x.contiguous(), post.float().contiguous(),
                                              comb.float().contiguous(), out, d, HC=hc, BD=bd, DT=_TL[x.dtype])
    return out


def hc_post_pre_norm(
    a: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, fn: torch.Tensor,
    scale: torch.Tensor, base: torch.Tensor, norm_weight: torch.Tensor, hc_mult: int, sinkhorn_iters: int,
    hc_eps: float, norm_eps: float, config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel for :func:`dsv4.ops.hyper.hc_post_pre_norm`: one boundary in one or two launches for up to
    :data:`MAX_FUSED_TOKENS` tokens; beyond, :func:`hc_post` then :func:`hc_pre_norm` (logged once)."""
    _check(x, hc_mult)
    t = x.shape[0]
    if t > MAX_FUSED_TOKENS:
        global _fallback_logged
        if not _fallback_logged:
            _fallback_logged = True
            log.info("mHC boundary: %d tokens > %d, running post and pre+norm as separate kernels (shown once)",
                     t, MAX_FUSED_TOKENS)
        x = hc_post(a, x, post, comb)
        return (x, *hc_pre_norm(x, fn, scale, base, norm_weight, hc_mult, sinkhorn_iters, hc_eps, norm_eps,
                                config))
    if t == 0:
        return (x.clone(), *hc_pre_norm(x, fn, scale, base, norm_weight, hc_mult, sinkhorn_iters, hc_eps, norm_eps))
    return _run(x.contiguous(), fn, scale, base, norm_weight, sinkhorn_iters, hc_eps, norm_eps, a=a,
                post=post.float().contiguous(), comb=comb.float().contiguous(), config=config)


def hc_head(
    x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_eps: float, norm_eps: float,
    config: dict | None = None,
) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.hyper.hc_head`. x: [T, 4, D]; fn [4, 4*D], scale [1], base [4] fp32."""
    _check(x, x.shape[1])
    t, _, d = x.shape
    if t == 0:
        return x.new_empty(0, d)
    return _run(x.contiguous(), fn, scale, base, None, 1, hc_eps, norm_eps, head=True,
                pooled=t <= MAX_FUSED_TOKENS, config=config)[1]
