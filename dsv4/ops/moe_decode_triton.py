"""Routed experts at decode sizes: two launches, no grouping step (reference :func:`dsv4.ops.moe.moe_experts`;
called by :func:`dsv4.ops.moe_triton.moe_experts` when its configuration says ``direct``).

At a few dozen expert hits the grouped path's fixed costs (an act_quant launch, the one-program align kernel,
the combine launch, and for FP4 experts with an FP8 shared expert a second pair of GEMM launches) are a large
part of the layer's time. Here:

1. ``_direct_up_kernel``, a 1-D launch over (pair, I / BN column tile), pairs first: the ``M = N*k`` routed hits, then
   ``ceil(N / BM)`` shared-expert chunks of BM tokens. A routed program reads its expert id straight from ``ids``
   and scans all M ids (:func:`_pair_rows`): the hits of the same expert are ranked in pick order, and only the
   program whose hit ranks at a multiple of BM computes, for that hit and the next BM - 1 of its expert (so an
   expert picked by several tokens is read once per BM of them); the others exit at once. The activations are
   FP8-quantized on load (``prequant`` off) or once by act_quant's kernel; with 128-wide tiles the epilogue stores
   h act-quantized for the down GEMM. h rows are the hits' own (flat pick index ``t*k + j``, shared ``M + t``).
   Routed and shared experts of different forms run in the same launch: each has its own GEMM loop.
2. ``_direct_down_kernel``, the same launch over D / BN column tiles times ``split`` split-K slices of I: h @ w2^T into
   ``y_hits`` at the hit's row, then the routing combine without a launch of its own: every program of an output
   column tile adds one to that tile's counter (acq_rel, after a barrier), and the one that arrives last sums
   ``y[t] = sum_j y_hits[t*k + j] (+ y_hits[M + t])`` for every token over the tile's columns, in that fixed
   order (split-K partials summed in slice order and rounded first, as :mod:`dsv4.ops.moe_triton`'s combine),
   then sets the counter back to zero. The result does not depend on arrival order: deterministic.

Under ``may_skip`` (constexpr SKIP) a pair of id -1 leads nothing and the combine adds nothing for it.

The counter is Triton's scalar atomic: after the barrier one thread fences (MEMBAR.GPU), adds, invalidates its
L1 (CCTL.IVALL) and shares the old value through shared memory (read in the sm_90 SASS, 2026-12-04).

NOTE: the counters (one int32 per output column tile, zero between launches) are one buffer per device, shared
by every layer: launches on one stream only; two MoE layers running at once on two streams would race.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops import pdl
from dsv4.ops.moe_gemm_triton import _fp4_dot_fp8, _fp4_scales, _gemm
from dsv4.ops.pdl import enter as pdl_enter
from dsv4.ops.quant_triton import pow2_scale

_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}  # per device, the newest last (captured graphs may hold
# the older ones: kept alive)
# Tiles for the sweep (benchmarks/bench_moe.py) besides the table's: GEMV-shaped (one to a few valid rows of 16),
# memory-bound, so what varies is how evenly the programs spread over the SMs (at batch 1 the 64-wide gate/up
# tiles are 224 programs of 512 KB for 132 SMs; 16-wide ones 896 of 128 KB), the pipeline depth and the warps;
# 128-wide gate/up tiles store h act-quantized.
CANDIDATES = (
    dict(bm=16, bn_up=32, bn_down=32, bk=128, num_warps=4, num_stages=4),
    dict(bm=16, bn_up=64, bn_down=64, bk=128, num_warps=4, num_stages=4),
    dict(bm=16, bn_up=32, bn_down=64, bk=128, num_warps=2, num_stages=6),
    dict(bm=16, bn_up=16, bn_down=32, bk=128, num_warps=2, num_stages=5),
    dict(bm=16, bn_up=128, bn_down=128, bk=128, num_warps=8, num_stages=3),
)


# fuse_down tiles (128 wide: whole FP8 quantization groups of h per program; down slab 128 or 64 outputs a step)
FUSED_CANDIDATES = (
    dict(bm=16, bn_up=128, bn_down=128, bk=128, num_warps=8, num_stages=3, fuse_down=True),
    dict(bm=16, bn_up=128, bn_down=64, bk=128, num_warps=8, num_stages=3, fuse_down=True),  # 4 warps: FP4 spills
)


def can_fuse(stacks: list, act_quant: bool, cfg: dict) -> bool:
    """Whether ``fuse_down`` applies to the routed and shared stacks (:class:`dsv4.ops.moe.ExpertWeights`) under
    ``cfg``: one dense or FP8 form and dtypes, or FP4 with FP4/FP8 under act_quant with fp4_dot; under act_quant
    128-wide gate/up tiles over I a multiple of 128 (each program holds whole quantization groups of h)."""
    forms = {w.form for w in stacks}
    same = all(tuple(t is None or t.dtype for t in w) == tuple(t is None or t.dtype for t in stacks[0])
               for w in stacks)
    if "fp4" in forms:
        ok = forms <= {"fp4", "fp8"} and act_quant and bool(cfg["fp4_dot"])
    else:
        ok = same and len(forms) == 1
    return ok and (not act_quant or (cfg["bn_up"] == 128 and stacks[0].w1.shape[1] % 128 == 0))


def max_hits() -> int:
    """The most routed hits (N x top-k) the direct path takes: every program scans all of them."""
    return 128


@triton.jit
def _pair_rows(ids_ptr, p, M, N, E, M_P: tl.constexpr, BM: tl.constexpr, SKIP: tl.constexpr):
    """The rows of pair ``p`` of the launch: (lead, e, hit [BM] int32, ok [BM], routed). A routed pair (p < M) of
    expert ``e = ids[p]`` leads when its hit ranks at a multiple of BM among that expert's hits in pick order;
    its rows are that hit and the next BM - 1 of the expert. Shared pair ``s = p - M`` (e = E) leads always: the
    tokens s*BM .. s*BM + BM - 1, hit ``M + t``. SKIP: a pair of id -1 never leads (its hits are nobody's rows)."""
    routed = p < M
    q = tl.arange(0, M_P)
    ids = tl.load(ids_ptr + q, mask=q < M, other=-1).to(tl.int32)
    e = tl.load(ids_ptr + p, mask=routed, other=E).to(tl.int32)
    mine = (ids == e) & (q < M)
    rank = tl.cumsum(mine.to(tl.int32), 0) - 1
    my = tl.sum(tl.where(q == p, rank, 0), axis=0)
    want = my + tl.arange(0, BM)
    sel = mine[None, :] & (rank[None, :] == want[:, None])  # [BM, M_P]: at most one per row
    r_hit = tl.sum(tl.where(sel, q[None, :], 0), axis=1)
    r_ok = tl.sum(sel.to(tl.int32), axis=1) > 0
    t = (p - M) * BM + tl.arange(0, BM)
    hit = tl.where(routed, r_hit, M + t)
    ok = tl.where(routed, r_ok, t < N)
    lead = (my % BM == 0) | (p >= M)
    if SKIP:
        lead = lead & (e >= 0)
    return lead, tl.where(routed, e, E), hit, ok, routed


@triton.jit
def _direct_up_kernel(
    x_ptr, xs_ptr, ids_ptr, wts_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, sh1_ptr, sh3_ptr, shs1_ptr, shs3_ptr, h_ptr,
    hs_ptr, w2_ptr, s2_ptr, sh2_ptr, shs2_ptr, y_ptr, M, N, K_TOP, D, I, E, limit, shared_limit, w_stride, s_stride,
    w2_stride, s2_stride, y_split_stride, n_cols,
    M_P: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FORM: tl.constexpr,
    SH_FORM: tl.constexpr, ONE_LOOP: tl.constexpr, ACT_QUANT: tl.constexpr, A_Q: tl.constexpr, H_Q: tl.constexpr,
    FP8_DOT: tl.constexpr, SH_FP8_DOT: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, FUSE: tl.constexpr,
    BND: tl.constexpr, SKIP: tl.constexpr,
    PDL: tl.constexpr,
):
    """h[hit] = swiglu(x @ w1^T, x @ w3^T) * route weight for the rows of one pair (:func:`_pair_rows`) and one
    column tile; stored in the model dtype, or with H_Q as e4m3 codes with e8m0 scales [M + N, I/128] at
    ``hs_ptr``. A_Q: x holds act_quant's codes with scales [N, D/128] at ``xs_ptr``. ONE_LOOP: the shared expert
    has the routed stack's form and pointer types and runs through its loop; else each has its own (SH_FORM).

    FUSE (``fuse_down``, see :func:`can_fuse`): h is not stored; the
    program multiplies its h columns by the matching BN columns of w2 (:func:`_down_slab`) into the fp32 split-K
    partial ``y_hits[tile, hit]`` [D], every weight byte of the layer read by this one launch."""
    pdl_enter(PDL)
    pid = tl.program_id(0)
    p = pid // n_cols
    n0 = (pid - p * n_cols) * BN
    lead, e, hit, ok, routed = _pair_rows(ids_ptr, p, M, N, E, M_P, BM, SKIP)
    if lead:
        tok = tl.where(hit < M, hit // K_TOP, hit - M)
        wt = tl.load(wts_ptr + hit, mask=ok & (hit < M), other=1.0)
        x_off = tok.to(tl.int64) * D
        eo = e.to(tl.int64)
        if ONE_LOOP:
            pa, psa = w1_ptr + eo * w_stride, s1_ptr + eo * s_stride
            pb, psb = w3_ptr + eo * w_stride, s3_ptr + eo * s_stride
            lim = limit
            if not routed:
                pa, psa, pb, psb, lim = sh1_ptr, shs1_ptr, sh3_ptr, shs3_ptr, shared_limit
            g, u = _gemm(x_ptr, x_off, ok, xs_ptr, tok.to(tl.int64), D, 0, D, pa, psa, pb, psb, n0, I, BM, BN, BK,
                         FORM, True, ACT_QUANT, A_Q, FP8_DOT, DT, PREC)
        elif routed:
            lim = limit
            g, u = _gemm(x_ptr, x_off, ok, xs_ptr, tok.to(tl.int64), D, 0, D, w1_ptr + eo * w_stride,
                         s1_ptr + eo * s_stride, w3_ptr + eo * w_stride, s3_ptr + eo * s_stride, n0, I, BM, BN, BK,
                         FORM, True, ACT_QUANT, A_Q, FP8_DOT, DT, PREC)
        else:
            lim = shared_limit
            g, u = _gemm(x_ptr, x_off, ok, xs_ptr, tok.to(tl.int64), D, 0, D, sh1_ptr, shs1_ptr, sh3_ptr, shs3_ptr,
                         n0, I, BM, BN, BK, SH_FORM, True, ACT_QUANT, A_Q, SH_FP8_DOT, DT, PREC)
        g = g.to(DT).to(tl.float32)
        u = u.to(DT).to(tl.float32)
        g = tl.minimum(g, lim, propagate_nan=tl.PropagateNan.ALL)
        u = tl.minimum(tl.maximum(u, -lim, propagate_nan=tl.PropagateNan.ALL), lim, propagate_nan=tl.PropagateNan.ALL)
        h = g / (1.0 + tl.exp(-g)) * u * wt[:, None]
        rn = n0 + tl.arange(0, BN)
        h_row = hit.to(tl.int64)[:, None]
        if H_Q:  # act_quant of the rounded h, as the reference's, for whole 128-column groups of this tile
            hr = tl.reshape(h.to(DT).to(tl.float32), (BM, BN // 128, 128))
            sc, inv, byte = pow2_scale(tl.maximum(tl.max(tl.abs(hr), axis=2), 1e-4))
            q = tl.minimum(tl.maximum(hr * inv[:, :, None], -448.0), 448.0).to(tl.float8e4nv)
            if FUSE:
                tl.static_assert(BN == 128)
                hq, hsc = tl.reshape(q, (BM, BN)), tl.reshape(sc, (BM,))
                if ONE_LOOP:
                    pw, ps = w2_ptr + eo * w2_stride, s2_ptr + eo * s2_stride
                    if not routed:
                        pw, ps = sh2_ptr, shs2_ptr
                    _down_slab(hq, hsc, pw, ps, y_ptr, hit, ok, n0, D, I, y_split_stride, BM, BN, BND, FORM, True,
                               FP8_DOT, DT, PREC)
                elif routed:
                    _down_slab(hq, hsc, w2_ptr + eo * w2_stride, s2_ptr + eo * s2_stride, y_ptr, hit, ok, n0, D, I,
                               y_split_stride, BM, BN, BND, FORM, True, FP8_DOT, DT, PREC)
                else:
                    _down_slab(hq, hsc, sh2_ptr, shs2_ptr, y_ptr, hit, ok, n0, D, I, y_split_stride, BM, BN, BND,
                               SH_FORM, True, SH_FP8_DOT, DT, PREC)
            else:
                tl.store(h_ptr + h_row * I + rn[None, :], tl.reshape(q, (BM, BN)),
                         mask=ok[:, None] & (rn < I)[None, :])
                cg = n0 // 128 + tl.arange(0, BN // 128)
                tl.store(hs_ptr + h_row * (I // 128) + cg[None, :], byte, mask=ok[:, None] & (cg < I // 128)[None, :])
        elif FUSE:
            pw, ps = w2_ptr + eo * w2_stride, s2_ptr + eo * s2_stride
            if not routed:
                pw, ps = sh2_ptr, shs2_ptr
            _down_slab(h.to(DT), wt, pw, ps, y_ptr, hit, ok, n0, D, I, y_split_stride, BM, BN, BND, FORM, False,
                       False, DT, PREC)
        else:
            tl.store(h_ptr + h_row * I + rn[None, :], h.to(DT), mask=ok[:, None] & (rn < I)[None, :])


@triton.jit
def _down_slab(a, a_sc, w_ptr, s_ptr, y_ptr, hit, ok, n0, D, I, y_split_stride, BM: tl.constexpr, BN: tl.constexpr,
               BND: tl.constexpr, FORM: tl.constexpr, A_Q: tl.constexpr, FP8_DOT: tl.constexpr, DT: tl.constexpr,
               PREC: tl.constexpr):
    """y_hits[n0 / BN, hit] = a @ w2[:, n0:n0+BN]^T over all D outputs, BND at a time (the pipelined loop): ``a``
    [BM, BN] the h columns n0.. of the rows (A_Q: e4m3 codes with the row scales ``a_sc`` [BM], else the model
    dtype), ``w_ptr``/``s_ptr`` one expert's w2 [D, I] (FP8: block scales [D/128, I/128]; FP4, with e4m3 codes
    and FP8_DOT only: int32 words [D, I/8], group scales [D, I/32], one e4m3 MMA per 32-column group as
    ``_gemm``'s). fp32 partials, rows ``hit`` where ``ok``."""
    rk = n0 + tl.arange(0, BN)
    k_ok = rk < I
    kb = tl.cdiv(I, 128)
    y_row = y_ptr + (n0 // BN) * y_split_stride + hit.to(tl.int64)[:, None] * D
    if FORM == 2:
        tl.static_assert(A_Q and FP8_DOT and BN == 128)
        # the four 32-column groups of the codes: [BM, 4, 32] -> [BM, 32, (2, 2)], split as _fp4_dot_fp8 splits
        q4 = tl.reshape(tl.permute(tl.reshape(a, (BM, 4, 32)), (0, 2, 1)), (BM, 32, 2, 2))
        q_even, q_odd = tl.split(q4)  # groups (0, 2), (1, 3)
        q0, q2 = tl.split(q_even)
        q1, q3 = tl.split(q_odd)
        f = (a_sc * 64.0)[:, None]
        rows = tl.arange(0, BND).to(tl.int64)
        s_next = _fp4_scales(s_ptr, rows, rows < D, I, n0)  # one step ahead, as in _gemm
        for d0 in range(0, D, BND):
            rd = d0 + rows
            s = s_next
            s_next = _fp4_scales(s_ptr, rd + BND, rd + BND < D, I, n0)
            part = _fp4_dot_fp8(q0, q1, q2, q3, w_ptr, s, rd, rd < D, I, n0, BND) * f
            tl.store(y_row + rd[None, :], part, mask=ok[:, None] & (rd < D)[None, :])
    else:
        if A_Q and not (FORM == 1 and FP8_DOT):
            a = (a.to(tl.float32) * a_sc[:, None]).to(DT)
        if FORM == 1:  # the block scale one step ahead (it feeds no MMA operand: not staged by the pipeliner)
            s_next = tl.load(s_ptr + n0 // 128)
        for d0 in range(0, D, BND):
            rd = d0 + tl.arange(0, BND)
            w = tl.load(w_ptr + rd.to(tl.int64)[:, None] * I + rk[None, :], mask=(rd < D)[:, None] & k_ok[None, :],
                        other=0.0)
            if FORM == 1:
                s = s_next
                nxt = (d0 + BND) // 128
                s_next = tl.load(s_ptr + nxt * kb + n0 // 128, mask=d0 + BND < D, other=1.0)
                if A_Q and FP8_DOT:
                    part = tl.dot(a, tl.trans(w)) * (a_sc[:, None] * s)
                else:
                    part = tl.dot(a, tl.trans(w.to(DT)), input_precision=PREC) * s
            else:
                part = tl.dot(a, tl.trans(w.to(DT)), input_precision=PREC)
            tl.store(y_row + rd[None, :], part, mask=ok[:, None] & (rd < D)[None, :])


@triton.jit
def _direct_combine_kernel(y_ptr, ids_ptr, out_ptr, N, M, D, split, y_split_stride, K_TOP: tl.constexpr,
                           HAS_SHARED: tl.constexpr, SKIP: tl.constexpr, DT: tl.constexpr, BT: tl.constexpr,
                           BD: tl.constexpr, PDL: tl.constexpr):
    """out[t] = sum_j y[t*k + j] (+ y[M + t]) for the fused path's fp32 partials (see :func:`_hit_sum`)."""
    pdl_enter(PDL)
    t = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    _combine_rows(y_ptr, ids_ptr, out_ptr, t, cols, N, M, D, split, y_split_stride, K_TOP, HAS_SHARED, SKIP, DT)


@triton.jit
def _combine_rows(y_ptr, ids_ptr, out_ptr, t, cols, N, M, D, split, y_split_stride, K_TOP: tl.constexpr,
                  HAS_SHARED: tl.constexpr, SKIP: tl.constexpr, DT: tl.constexpr):
    """out[t, cols] = sum_j y[t*k + j] (+ y[M + t]) for rows t [BT] (int64), in that order: the fused path's
    combine launch and the down kernel's last program share it, so both round alike. SKIP: hits of id -1 add
    nothing (no program wrote their rows)."""
    mask = (t < N)[:, None] & (cols < D)[None, :]
    acc = tl.zeros(mask.shape, tl.float32)
    for j in tl.static_range(K_TOP):
        m = mask
        if SKIP:
            m = mask & (tl.load(ids_ptr + t * K_TOP + j, mask=t < N, other=-1) >= 0)[:, None]
        acc += _hit_sum(y_ptr, t * K_TOP + j, cols, m, D, split, y_split_stride, DT)
    if HAS_SHARED:
        acc += _hit_sum(y_ptr, M + t, cols, mask, D, split, y_split_stride, DT)
    tl.store(out_ptr + t[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hit_sum(y_ptr, row, cols, mask, D, split, y_split_stride, DT: tl.constexpr):
    """One hit's output for rows ``row`` [BT] (int64): split-K partials summed in slice order, rounded to the model
    dtype; fp32 [BT, BN]. Loads bypass L1 (``.cg``): other programs wrote them during this launch."""
    p = y_ptr + row[:, None] * D + cols[None, :]
    v = tl.load(p, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    for _ in range(1, split):
        p += y_split_stride
        v += tl.load(p, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    return v.to(DT).to(tl.float32)


@triton.jit
def _direct_down_kernel(
    h_ptr, hs_ptr, ids_ptr, w2_ptr, s2_ptr, sh2_ptr, shs2_ptr, y_ptr, out_ptr, cnt_ptr, M, N, D, I, E, w_stride,
    s_stride, n_cols, split, k_chunk, y_split_stride, arrivals,
    M_P: tl.constexpr, K_TOP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    FORM: tl.constexpr, SH_FORM: tl.constexpr, ONE_LOOP: tl.constexpr, HAS_SHARED: tl.constexpr,
    ACT_QUANT: tl.constexpr, A_Q: tl.constexpr, FP8_DOT: tl.constexpr, SH_FP8_DOT: tl.constexpr, DT: tl.constexpr,
    PREC: tl.constexpr, BT: tl.constexpr, SKIP: tl.constexpr,
    PDL: tl.constexpr,
):
    """y_hits[slice, hit] = h[hit] @ w2^T over split-K slice ``c % split`` of column tile ``c // split`` for the
    rows of one pair; y_hits fp32 [split, M + N, D] with split > 1, else [1, M + N, D] in the model dtype. The
    last of the ``arrivals`` programs of an output column tile writes ``out`` for those columns (see the module
    docstring)."""
    pdl_enter(PDL)
    pid = tl.program_id(0)
    p = pid // n_cols
    c = pid - p * n_cols
    pid_n = c // split
    ks = c - pid_n * split
    n0 = pid_n * BN
    lead, e, hit, ok, routed = _pair_rows(ids_ptr, p, M, N, E, M_P, BM, SKIP)
    if lead:
        # rows past the pair's hits read and write the spare row M + N of h and y_hits: no row mask is live
        # across the K loop (with one, ptxas saves predicate registers to the stack around it)
        hit = tl.where(ok, hit, M + N)
        ok = hit >= 0
        h_off = hit.to(tl.int64) * I
        k_lo = ks * k_chunk
        k_hi = tl.minimum(k_lo + k_chunk, I)
        eo = e.to(tl.int64)
        if ONE_LOOP:
            pw, ps = w2_ptr + eo * w_stride, s2_ptr + eo * s_stride
            if not routed:
                pw, ps = sh2_ptr, shs2_ptr
            y, _ = _gemm(h_ptr, h_off, ok, hs_ptr, hit.to(tl.int64), I, k_lo, k_hi, pw, ps, pw, ps, n0, D, BM, BN,
                         BK, FORM, False, ACT_QUANT, A_Q, FP8_DOT, DT, PREC)
        elif routed:
            pw, ps = w2_ptr + eo * w_stride, s2_ptr + eo * s_stride
            y, _ = _gemm(h_ptr, h_off, ok, hs_ptr, hit.to(tl.int64), I, k_lo, k_hi, pw, ps, pw, ps, n0, D, BM, BN,
                         BK, FORM, False, ACT_QUANT, A_Q, FP8_DOT, DT, PREC)
        else:
            y, _ = _gemm(h_ptr, h_off, ok, hs_ptr, hit.to(tl.int64), I, k_lo, k_hi, sh2_ptr, shs2_ptr, sh2_ptr,
                         shs2_ptr, n0, D, BM, BN, BK, SH_FORM, False, ACT_QUANT, A_Q, SH_FP8_DOT, DT, PREC)
        rn = n0 + tl.arange(0, BN)
        y_row = ks.to(tl.int64) * y_split_stride + hit.to(tl.int64) * D
        tl.store(y_ptr + y_row[:, None] + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=(rn < D)[None, :])
    # every thread's stores before the counter's release; the acquire orders the last arriver's loads after all
    tl.debug_barrier()
    done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if done == arrivals - 1:
        tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")  # zero again for the next launch
        cols = n0 + tl.arange(0, BN)
        for t0 in range(0, N, BT):
            t = (t0 + tl.arange(0, BT)).to(tl.int64)
            _combine_rows(y_ptr, ids_ptr, out_ptr, t, cols, N, M, D, split, y_split_stride, K_TOP, HAS_SHARED, SKIP,
                          DT)


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """The device's tile counters (int32, zero between launches), at least ``n``; allocated on first use (outside
    any CUDA-graph capture: the runner's eager warm-up comes first)."""
    held = _COUNTERS.setdefault(device, [])
    if not held or held[-1].numel() < n:
        held.append(torch.zeros(max(n, 1024), dtype=torch.int32, device=device))
    return held[-1]


def moe_experts_direct(x: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor,
                       routed: tuple, shared: tuple, forms: tuple[int, int], dots: tuple[bool, bool],
                       has_shared: bool, limits: tuple[float, float], cfg: dict, act_quant: bool, a_q: bool,
                       out: torch.Tensor, dt, prec: str, skip: bool = False) -> torch.Tensor:
    """The two launches for ``moe_triton.moe_experts`` (which checks the shapes, prepares the stacks and owns
    the arguments): x [N, D] (``xq``/``xs``: act_quant's codes and scales when ``a_q``, else x twice), ids [N, k],
    wts [N*k] fp32, ``routed``/``shared``: (w1, w3, w2, s1, s3, s2) as ``moe_triton._stack`` gives them,
    ``forms``/``dots``: the two stacks' form codes and e4m3-product flags; ``skip``: ids may hold -1 (hits no
    program computes, left out of the combine); writes and returns ``out`` [N, D]."""
    n, d = x.shape
    k = ids.shape[1]
    r1, r3, r2, rs1, rs3, rs2 = routed
    q1, q3, q2, qs1, qs3, qs2 = shared
    n_exp, inter = r1.shape[0], r1.shape[1]
    m = n * k
    bm, bk = cfg["bm"], cfg["bk"]
    m_p = max(16, triton.next_power_of_2(m))  # the id scan: [16, 16] at batch 1 (one compile per power of two)
    pairs = m + (triton.cdiv(n, bm) if has_shared else 0)
    one_loop = not has_shared or (forms[0] == forms[1] and dots[0] == dots[1] and all(
        a.dtype == b.dtype for a, b in zip((r1, r2, rs1, rs2), (q1, q2, qs1, qs2), strict=True)))
    k_chunk = triton.cdiv(triton.cdiv(inter, max(1, int(cfg["split"]))), bk) * bk
    split = triton.cdiv(inter, k_chunk)
    h_q = act_quant and cfg["bn_up"] % 128 == 0 and inter % 128 == 0
    dev = x.device
    # rows: the M routed hits, the N shared ones, a spare row for the down kernel's unused tile rows
    h = torch.empty(m + n + 1, inter, dtype=torch.float8_e4m3fn if h_q else x.dtype, device=dev)
    hs = torch.empty(m + n + 1, inter // 128, dtype=torch.uint8, device=dev) if h_q else h
    y_hits = torch.empty(split, m + n + 1, d, dtype=x.dtype if split == 1 else torch.float32, device=dev)
    common = dict(M_P=m_p, BM=bm, BK=bk, FORM=forms[0], SH_FORM=forms[1], ONE_LOOP=one_loop, ACT_QUANT=act_quant,
                  FP8_DOT=dots[0], SH_FP8_DOT=dots[1], DT=dt, PREC=prec, SKIP=skip, num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"], **pdl.launch(dev))
    n_up = triton.cdiv(inter, cfg["bn_up"])
    flat = ids.reshape(-1)  # the routers' int64 ids, read (and narrowed) as they are; a copy only if strided
    fuse = bool(cfg.get("fuse_down"))  # effective_config checked it applies (can_fuse)
    if fuse:  # fp32 partials per gate/up column tile, summed by one combine launch
        y_hits = torch.empty(n_up, m + n + 1, d, dtype=torch.float32, device=dev)
    _direct_up_kernel[(pairs * n_up,)](
        xq, xs, flat, wts, r1, r3, rs1, rs3, q1, q3, qs1, qs3, h, hs, r2, rs2, q2, qs2, y_hits, m, n, k, d, inter,
        n_exp, limits[0], limits[1], r1[0].numel(), rs1[0].numel(), r2[0].numel(), rs2[0].numel(), y_hits[0].numel(),
        n_up, BN=cfg["bn_up"], A_Q=a_q, H_Q=h_q, FUSE=fuse, BND=cfg["bn_down"], **common)
    if fuse:
        bd = min(128, triton.next_power_of_2(d))
        _direct_combine_kernel[(triton.cdiv(n, 4), triton.cdiv(d, bd))](
            y_hits, flat, out, n, m, d, n_up, y_hits[0].numel(), K_TOP=k, HAS_SHARED=has_shared, SKIP=skip, DT=dt,
            BT=4, BD=bd, **pdl.launch(dev))
        return out
    bn = cfg["bn_down"]
    n_tiles = triton.cdiv(d, bn)
    _direct_down_kernel[(pairs * n_tiles * split,)](
        h, hs, flat, r2, rs2, q2, qs2, y_hits, out, _counters(dev, n_tiles), m, n, d, inter, n_exp, r2[0].numel(),
        rs2[0].numel(), n_tiles * split, split, k_chunk, y_hits[0].numel(), pairs * split, K_TOP=k, BN=bn,
        HAS_SHARED=has_shared, A_Q=h_q, BT=16, **common)
    return out
