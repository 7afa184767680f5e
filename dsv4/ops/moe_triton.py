"""Triton routed experts as grouped GEMMs, with the shared expert in the same launches (reference:
:func:`dsv4.ops.moe.moe_experts`).

Four steps, none of which syncs the host (grids are static upper bounds, extra programs exit at once):

1. ``_align_kernel`` (one program) groups the ``M = N*k`` expert hits by expert: an atomic counter per
   expert gives each hit its rank, a prefix sum gives every expert its first sorted position and its run of
   ``BM``-row blocks. With a shared expert, its N hits (one per token, weight 1) follow as expert ``E``.
2. ``_gate_up_kernel``, a 1-D launch over (row block, I / BN column tile) in grouped order (:func:`_tile`:
   ``group`` row blocks at a time, all their column tiles before the next ones): a program finds its expert
   from the block runs, gathers its <= BM token rows of x and computes x @ w1^T and x @ w3^T, then the
   epilogue: both rounded to the model dtype (the official GEMMs output bf16), the clamped SwiGLU in fp32,
   times the route weight, rounded into ``h [hits, I]`` at the hits' sorted positions.
3. ``_down_kernel``, the same launch over D / BN column tiles times ``split`` split-K slices of I: h @ w2^T,
   stored at the hit's own row of ``y_hits``: rounded to the model dtype, or with split > 1 fp32 partials
   [split, hits, D].
4. ``_combine_kernel``: ``y[t] = sum_j y_hits[t*k + j] (+ y_hits[M + t])`` in fp32, in pick order (split-K
   partials summed in slice order and rounded first, as the unsplit GEMM rounds).

Each GEMM kernel holds one pipelined K loop (each loop keeps its own shared-memory buffers): the shared
expert's blocks run through the routed loop with its own pointers when its stack has the same form and dtypes,
otherwise steps 2 and 3 are launched twice (routed blocks, then shared ones). Launch parameters come from
:data:`DEFAULTS` by weight form and size class (:func:`size_class`), made legal (:func:`legal_config`) and
fitted to ``SMEM_BUDGET`` by the estimate :func:`smem_bytes` (:func:`fit_config`).

At decode sizes (the ``direct`` launch key, at most ``moe_decode_triton.max_hits()`` hits) steps 1-4 are two
launches instead (:mod:`dsv4.ops.moe_decode_triton`): each gate/up and down program reads its expert id from
``ids`` directly, and the down launch ends with the combine.

Under ``may_skip`` (expert parallel, DP padding) hits of id -1 are left out by the align kernel (no block holds
them) and by the combine; without it (constexpr SKIP off) the kernels compile as if no id could be -1.

The atomics place the hits of one expert in a run-dependent order, but every output row depends only on its
own input row and the expert's weights, and the combine sums in a fixed order: results are deterministic.

Both GEMM kernels run their K loop through :func:`dsv4.ops.moe_gemm_triton._gemm`, which reads each weight form
(dense, FP8 e4m3 with 128x128 block scales, packed FP4 e2m1 with scales per 32 inputs) and, under ``act_quant``,
quantizes each 128-column slice of the activations on load as :func:`dsv4.ops.quant.act_quant` does (its
docstring describes the forms and the e4m3 products, ``fp8_dot`` and ``fp4_dot``). With ``prequant`` x is
quantized once (``act_quant``'s kernel, e4m3 codes and e8m0 scales) instead of by every gate/up program, and with
128-wide gate/up tiles the epilogue stores h quantized the same way for the down GEMM: the same values, without
the per-program amax and rounding that otherwise take more issue slots than the prefill MMAs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops import moe_decode_triton as direct
from dsv4.ops import pdl
from dsv4.ops.moe import ExpertWeights
from dsv4.ops.moe_gemm_triton import _gemm
from dsv4.ops.pdl import enter as pdl_enter
from dsv4.ops.quant import e8m0_to_float
from dsv4.ops.quant_triton import act_quant as act_quant_kernel
from dsv4.ops.quant_triton import pow2_scale

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_FORM = {"dense": 0, "fp8": 1, "fp4": 2}
_ALIGN_CHUNK = 1024
# Tile configurations. Keys: bm (rows of a block, all of one expert), bn_up / bn_down (output columns of a
# gate/up and a down program), bk, num_warps, num_stages (constexpr: one compile each), and the launch
# parameters that need no recompile: group (row blocks per launch group, see _tile), split (split-K slices of
# the down GEMM), fp8_dot (e4m3 MMAs for FP8 weights under act_quant) and fp4_dot (e4m3 MMAs per 32-column group
# for FP4 weights under act_quant, instead of their exact dequantization into the model dtype) and prequant
# (under act_quant: x quantized once by one act_quant launch, instead of by every gate/up program on load: the
# prefill loops spend more issue slots on that than on their MMAs) and direct (at most
# moe_decode_triton.max_hits() hits: the two-launch decode path of dsv4.ops.moe_decode_triton, no grouping
# step, the combine inside the down launch, routed and shared experts of any forms in the same launches) and
# fuse_down (direct, see moe_decode_triton.can_fuse; under act_quant 128-wide gate/up tiles: each gate/up
# program also multiplies its h columns by w2's, a combine launch sums the partials: one GEMM launch).
# Decode (a few rows per expert): 16-row blocks and narrow column tiles, so that even 7 experts cover every SM;
# the down GEMM's K (I = 2048) split in slices at batch <= ~8 for more, shorter programs (no wave tail).
# Prefill (~100 rows per expert at 4096 tokens): 128-row blocks (one per expert, little padding), wide tiles and
# 3-4 stages; bk 64 where the activations are not FP8-quantized per 128 columns.
# Every entry fits SMEM_BUDGET by smem_bytes for bf16 activations in every weight form (fp32 ones are fitted
# down by fit_config); QUANT_CANDIDATES (bk 128, deeper pipelines) only for FP8/FP4 weights under act_quant
# (legal_config). benchmarks/bench_moe.py sweeps them and prints the winners per shape for DEFAULTS.
CANDIDATES = (
    dict(bm=16, bn_up=32, bn_down=32, bk=128, num_warps=4, num_stages=4),
    dict(bm=16, bn_up=64, bn_down=64, bk=128, num_warps=4, num_stages=4),
    dict(bm=64, bn_up=64, bn_down=128, bk=128, num_warps=4, num_stages=3),
    dict(bm=128, bn_up=64, bn_down=128, bk=128, num_warps=8, num_stages=2),
    dict(bm=64, bn_up=128, bn_down=128, bk=64, num_warps=4, num_stages=4),
    dict(bm=128, bn_up=64, bn_down=128, bk=64, num_warps=8, num_stages=4),
    dict(bm=128, bn_up=128, bn_down=128, bk=64, num_warps=8, num_stages=3),
    dict(bm=128, bn_up=128, bn_down=256, bk=64, num_warps=8, num_stages=3),
)
QUANT_CANDIDATES = (
    dict(bm=64, bn_up=64, bn_down=128, bk=128, num_warps=4, num_stages=4),
    dict(bm=128, bn_up=64, bn_down=128, bk=128, num_warps=8, num_stages=3),
    dict(bm=128, bn_up=128, bn_down=128, bk=128, num_warps=8, num_stages=2),
)
# Prefill tiles for benchmarks/moe_prefill_sweep.py (not yet measured; nothing in DEFAULTS uses them): at 4096
# tokens (96 rows per expert) the bf16 GEMMs stream every expert's weights once and are near the HBM bound, the
# FP8 ones at ~2.5x theirs. Deeper pipelines (the estimate now allows them); sm_90 compiles (ptxas, 2026-12-04):
# the FP8 gate/up tile of 128 rows spills at 8 warps (255 registers, 40 B stack: two accumulators plus the
# per-step scaled partials) and at 16 (128, 64 B), 64 rows at 8 warps fit (182, none). 32-row blocks for 1024
# tokens (24 rows per expert). Tuples: bm, bn_up, bn_down, bk, num_warps, num_stages.
_PREFILL_TILES = {
    "dense": ((128, 128, 256, 64, 8, 3), (128, 128, 256, 64, 8, 4), (128, 128, 128, 64, 8, 4),
              (128, 128, 256, 64, 16, 4), (64, 128, 256, 64, 4, 4), (64, 128, 128, 64, 4, 5),
              (128, 64, 128, 64, 8, 5), (64, 256, 256, 32, 8, 4), (64, 128, 256, 64, 8, 4),
              (64, 64, 128, 128, 4, 4), (32, 128, 256, 64, 4, 4), (32, 64, 128, 128, 4, 4)),
    "fp8": ((128, 128, 128, 128, 8, 2), (128, 128, 128, 128, 8, 3), (128, 128, 128, 128, 8, 4),
            (64, 128, 128, 128, 8, 4), (64, 128, 128, 128, 8, 5), (64, 128, 128, 128, 8, 3),
            (128, 128, 128, 128, 16, 3), (128, 128, 128, 128, 16, 4), (64, 128, 128, 128, 4, 4),
            (32, 128, 128, 128, 4, 4)),
    "fp4": ((128, 128, 128, 128, 8, 2), (128, 128, 128, 128, 16, 2), (64, 128, 128, 128, 4, 3),
            (64, 128, 128, 128, 8, 3)),
}
PREFILL_CANDIDATES = {form: tuple(dict(zip(("bm", "bn_up", "bn_down", "bk", "num_warps", "num_stages"), t, strict=True))
                                  for t in tiles) for form, tiles in _PREFILL_TILES.items()}
_LAUNCH = dict(group=8, split=1, fp8_dot=False, fp4_dot=False, prequant=False, direct=False, fuse_down=False)
# Defaults per weight form and size class (see size_class), from benchmarks/bench_moe.py's table picks on an H200
# (docs/benchmarks.md, 2026-12-04 session 5): fp8 tiny without split-K (87.4 us against 89.2 with k2); fp4 tiny
# the narrow tiles. Second run, after the FP4 rewrite (us per layer, best with prequant vs without): prequant
# wins at every FP4 batch (1: 140 vs 158; 16: 925 vs 1057; 64: 2156 vs 2430; 256: 2834 vs 3177) and at FP8 batch
# 1 / 16 / 256 (87.8 vs 89.8, 580 vs 597, 1839 vs 1912; a tie at 64: 1415 vs 1411); at 4096 tokens both forms are
# fastest with 128-wide gate/up tiles, two stages, no launch groups (FP8 4278 against >= 6239 for the 64-wide
# tiles; FP4 8608). Tiny batches take the direct path (2 launches instead of 5, 7 for FP4 with its FP8 shared
# expert), x quantized on load. Direct-path sweep at batch 1 (H200, 2026-12-04 session 8, graph replay, whole
# layer with the router): bf16 the 64-wide tiles with split-K 2 are best of 15 (110.3 us, 1.32x its floor); FP8
# the 128-wide tiles, 8 warps, 3 stages, split-K 2 (77.9 us against 84.3 for the 64-wide tiles without split).
DEFAULTS = {
    "dense": dict(tiny=dict(CANDIDATES[1], split=2, direct=True), small=CANDIDATES[1],
                  large=dict(CANDIDATES[7], group=8)),
    "fp8": dict(tiny=dict(direct.CANDIDATES[4], split=2, fp8_dot=True, direct=True),
                small=dict(CANDIDATES[1], fp8_dot=True, prequant=True),
                large=dict(QUANT_CANDIDATES[2], group=1, fp8_dot=True, prequant=True)),
    "fp4": dict(tiny=dict(CANDIDATES[0], fp8_dot=True, fp4_dot=True, direct=True),
                small=dict(CANDIDATES[1], fp8_dot=True, fp4_dot=True, prequant=True),
                large=dict(QUANT_CANDIDATES[2], group=1, fp8_dot=True, prequant=True)),
}


@triton.jit
def _align_kernel(ids_ptr, cnt_ptr, meta_ptr, rank_ptr, sorted_ptr, M, N_SHARED, E, BM: tl.constexpr,
                  E_P: tl.constexpr, CH: tl.constexpr, SKIP: tl.constexpr, PDL: tl.constexpr):
    """ids [M] (the flattened picks) -> meta [3, E_P] int32 (rows: hits, first sorted position, cumulative
    block end, per expert; the shared expert is entry E with N_SHARED hits placed last) and sorted [M + N_SHARED]
    (hit ids grouped by expert). cnt [E_P] and rank [M] are int32 scratch. SKIP: hits of id -1 are left out (no
    block computes them; sorted holds fewer entries)."""
    pdl_enter(PDL)
    ex = tl.arange(0, E_P)
    lane = tl.arange(0, CH)
    # counters live in L2 (atomics): zero them atomically too, so no cached plain store can race the adds
    tl.atomic_xchg(cnt_ptr + ex, tl.zeros([E_P], tl.int32))
    tl.debug_barrier()
    for c in range(0, M, CH):
        idx = c + lane
        ok = idx < M
        e = tl.load(ids_ptr + idx, mask=ok, other=0).to(tl.int32)
        if SKIP:
            ok = ok & (e >= 0)
        rank = tl.atomic_add(cnt_ptr + e, tl.full([CH], 1, tl.int32), mask=ok)
        tl.store(rank_ptr + idx, rank, mask=ok)
    tl.debug_barrier()
    cnt = tl.atomic_add(cnt_ptr + ex, tl.zeros([E_P], tl.int32))  # read back from L2
    cnt = tl.where(ex == E, N_SHARED, cnt)
    first = tl.cumsum(cnt, 0) - cnt
    tl.store(meta_ptr + ex, cnt)
    tl.store(meta_ptr + E_P + ex, first)
    tl.store(meta_ptr + 2 * E_P + ex, tl.cumsum((cnt + BM - 1) // BM, 0))
    tl.debug_barrier()
    for c in range(0, M, CH):
        idx = c + lane
        ok = idx < M
        e = tl.load(ids_ptr + idx, mask=ok, other=0).to(tl.int32)
        if SKIP:
            ok = ok & (e >= 0)
        pos = tl.load(meta_ptr + E_P + e, mask=ok, other=0) + tl.load(rank_ptr + idx, mask=ok, other=0)
        tl.store(sorted_ptr + pos, idx, mask=ok)
    shared_first = M
    if SKIP:  # the routed hits that remain
        shared_first = tl.sum(tl.where(ex == E, first, 0), axis=0)
    for c in range(0, N_SHARED, CH):
        idx = c + lane
        tl.store(sorted_ptr + shared_first + idx, M + idx, mask=idx < N_SHARED)


@triton.jit
def _block_expert(meta_ptr, b, E_P: tl.constexpr):
    """Expert of row block ``b`` (E_P when b is past the last block) and the block's index in that expert."""
    bend = tl.load(meta_ptr + 2 * E_P + tl.arange(0, E_P))
    e = tl.sum((bend <= b).to(tl.int32), axis=0)
    bstart = tl.load(meta_ptr + 2 * E_P + e - 1, mask=(e > 0) & (e < E_P), other=0)
    return e, b - bstart


@triton.jit
def _tile(meta_ptr, E, n_blocks, n_cols, group, PART: tl.constexpr, E_P: tl.constexpr):
    """(row block, column tile) of this program of a 1-D launch over ``n_blocks`` x ``n_cols`` tiles, in grouped
    order: ``group`` row blocks at a time, every column tile of those blocks before the next ones, blocks
    fastest. The group's activation rows stay in L2 over all its column tiles (the old blocks-fastest order
    re-read all of h from HBM once per column tile), and the blocks of one expert read each weight tile at
    about the same time. The shared expert's blocks follow the routed ones (PART 2 runs only those)."""
    pid = tl.program_id(0)
    width = group * n_cols
    gi = pid // width
    first = gi * group
    size = tl.minimum(n_blocks - first, group)
    r = pid - gi * width
    b = first + r % size
    if PART == 2:
        b += tl.load(meta_ptr + 2 * E_P + E - 1)
    return b, r // size


@triton.jit
def _runs(e, E, PART: tl.constexpr, E_P: tl.constexpr):
    """Whether this launch computes the blocks of expert ``e`` (E_P: past the last block)."""
    if PART == 1:
        return e < E
    elif PART == 2:
        return e == E
    else:
        return e < E_P


@triton.jit
def _gate_up_kernel(
    x_ptr, xs_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, sh1_ptr, sh3_ptr, shs1_ptr, shs3_ptr, wts_ptr, meta_ptr,
    sorted_ptr, h_ptr, hs_ptr, M, K_TOP, D, I, E, limit, shared_limit, w_stride, s_stride, n_blocks, n_cols, group,
    E_P: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FORM: tl.constexpr,
    PART: tl.constexpr, ACT_QUANT: tl.constexpr, A_Q: tl.constexpr, H_Q: tl.constexpr, FP8_DOT: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr,
    PDL: tl.constexpr,
):
    """h[sorted pos] = (swiglu(x @ w1^T, x @ w3^T) * route weight) in the model dtype, per row block of one
    expert (``w_stride``/``s_stride``: elements per routed expert of w1/w3 and of their scales). A_Q: x holds
    act_quant's e4m3 codes, with its e8m0 scales [N, D/128] at ``xs_ptr``. H_Q (BN a multiple of 128): h is
    stored act-quantized for the down GEMM, e4m3 codes with e8m0 scales [hits, I/128] at ``hs_ptr``.

    One GEMM loop per kernel (each pipelined loop holds its own shared-memory buffers): PART 0 runs every
    block, the shared expert's through the routed loop with its own pointers (same form and dtypes); with
    another form the routed (PART 1) and shared (PART 2) blocks are separate launches, FORM the one they read.
    The launch is 1-D over ``n_blocks`` x ``n_cols`` tiles in the grouped order of :func:`_tile`."""
    pdl_enter(PDL)
    b, pid_n = _tile(meta_ptr, E, n_blocks, n_cols, group, PART, E_P)
    e, j = _block_expert(meta_ptr, b, E_P)
    if _runs(e, E, PART, E_P):
        r = j * BM + tl.arange(0, BM)
        ok = r < tl.load(meta_ptr + e)
        sp = tl.load(meta_ptr + E_P + e) + r
        hit = tl.load(sorted_ptr + sp, mask=ok, other=0)
        routed = hit < M
        tok = tl.where(routed, hit // K_TOP, hit - M)
        wt = tl.load(wts_ptr + hit, mask=ok & routed, other=1.0)
        x_off = tok.to(tl.int64) * D
        n0 = pid_n * BN
        if PART == 2:
            pa, psa, pb, psb, lim = sh1_ptr, shs1_ptr, sh3_ptr, shs3_ptr, shared_limit
        else:
            eo = e.to(tl.int64)
            pa, psa = w1_ptr + eo * w_stride, s1_ptr + eo * s_stride
            pb, psb = w3_ptr + eo * w_stride, s3_ptr + eo * s_stride
            lim = limit
            if PART == 0:
                if e == E:
                    pa, psa, pb, psb, lim = sh1_ptr, shs1_ptr, sh3_ptr, shs3_ptr, shared_limit
        g, u = _gemm(x_ptr, x_off, ok, xs_ptr, tok.to(tl.int64), D, 0, D, pa, psa, pb, psb, n0, I, BM, BN, BK, FORM,
                     True, ACT_QUANT, A_Q, FP8_DOT, DT, PREC)
        g = g.to(DT).to(tl.float32)
        u = u.to(DT).to(tl.float32)
        g = tl.minimum(g, lim, propagate_nan=tl.PropagateNan.ALL)
        u = tl.minimum(tl.maximum(u, -lim, propagate_nan=tl.PropagateNan.ALL), lim,
                       propagate_nan=tl.PropagateNan.ALL)
        h = g / (1.0 + tl.exp(-g)) * u * wt[:, None]
        rn = n0 + tl.arange(0, BN)
        h_row = sp.to(tl.int64)[:, None]
        if H_Q:  # act_quant of the rounded h, as the reference's, for whole 128-column groups of this tile
            hr = tl.reshape(h.to(DT).to(tl.float32), (BM, BN // 128, 128))
            _, inv, byte = pow2_scale(tl.maximum(tl.max(tl.abs(hr), axis=2), 1e-4))
            q = tl.minimum(tl.maximum(hr * inv[:, :, None], -448.0), 448.0).to(tl.float8e4nv)
            tl.store(h_ptr + h_row * I + rn[None, :], tl.reshape(q, (BM, BN)), mask=ok[:, None] & (rn < I)[None, :])
            cg = n0 // 128 + tl.arange(0, BN // 128)
            tl.store(hs_ptr + h_row * (I // 128) + cg[None, :], byte, mask=ok[:, None] & (cg < I // 128)[None, :])
        else:
            tl.store(h_ptr + h_row * I + rn[None, :], h.to(DT), mask=ok[:, None] & (rn < I)[None, :])


@triton.jit
def _down_kernel(
    h_ptr, hs_ptr, w2_ptr, s2_ptr, sh2_ptr, shs2_ptr, meta_ptr, sorted_ptr, y_ptr, D, I, E, w_stride, s_stride,
    n_blocks, n_cols, group, split, k_chunk, y_split_stride,
    E_P: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FORM: tl.constexpr,
    PART: tl.constexpr, ACT_QUANT: tl.constexpr, A_Q: tl.constexpr, FP8_DOT: tl.constexpr, DT: tl.constexpr,
    PREC: tl.constexpr,
    PDL: tl.constexpr,
):
    """y_hits[hit] = h[sorted pos] @ w2^T, per row block of one expert (PART as in ``_gate_up_kernel``; A_Q: h
    holds e4m3 codes with e8m0 scales at ``hs_ptr``, quantized by the gate/up epilogue).

    Split-K: column tile ``c`` of the launch is output tile ``c // split`` over the inputs of slice ``c % split``
    (``k_chunk`` of them, a multiple of BK); with split > 1, y_hits holds fp32 partials [split, hits, D]
    (``y_split_stride`` apart) that the combine sums in slice order, so the result stays deterministic. With
    split 1 it is [hits, D] in the model dtype (the rounding of the official bf16-output GEMM)."""
    pdl_enter(PDL)
    b, pid_c = _tile(meta_ptr, E, n_blocks, n_cols, group, PART, E_P)
    pid_n = pid_c // split
    ks = pid_c - pid_n * split
    e, j = _block_expert(meta_ptr, b, E_P)
    if _runs(e, E, PART, E_P):
        r = j * BM + tl.arange(0, BM)
        ok = r < tl.load(meta_ptr + e)
        sp = tl.load(meta_ptr + E_P + e) + r
        hit = tl.load(sorted_ptr + sp, mask=ok, other=0)
        h_off = sp.to(tl.int64) * I
        n0 = pid_n * BN
        if PART == 2:
            pw, ps = sh2_ptr, shs2_ptr
        else:
            eo = e.to(tl.int64)
            pw, ps = w2_ptr + eo * w_stride, s2_ptr + eo * s_stride
            if PART == 0:
                if e == E:
                    pw, ps = sh2_ptr, shs2_ptr
        k_lo = ks * k_chunk
        y, _ = _gemm(h_ptr, h_off, ok, hs_ptr, sp.to(tl.int64), I, k_lo, tl.minimum(k_lo + k_chunk, I), pw, ps, pw,
                     ps, n0, D, BM, BN, BK, FORM, False, ACT_QUANT, A_Q, FP8_DOT, DT, PREC)
        rn = n0 + tl.arange(0, BN)
        y_row = ks.to(tl.int64) * y_split_stride + hit.to(tl.int64) * D
        tl.store(y_ptr + y_row[:, None] + rn[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=ok[:, None] & (rn < D)[None, :])


@triton.jit
def _hit_out(y_ptr, row, cols, mask, D, split, y_split_stride, DT: tl.constexpr):
    """One hit's expert output for rows ``row`` [BT] (int64): its split-K partials summed in slice order, rounded
    to the model dtype as the unsplit down GEMM rounds its output; fp32 [BT, BD]."""
    p = y_ptr + row[:, None] * D + cols[None, :]
    v = tl.load(p, mask=mask, other=0.0).to(tl.float32)
    for _ in range(1, split):
        p += y_split_stride  # pointer arithmetic: no int32 product of slice and stride to overflow
        v += tl.load(p, mask=mask, other=0.0).to(tl.float32)
    return v.to(DT).to(tl.float32)


@triton.jit
def _combine_kernel(y_ptr, ids_ptr, out_ptr, N, M, D, split, y_split_stride, K_TOP: tl.constexpr,
                    HAS_SHARED: tl.constexpr, SKIP: tl.constexpr, DT: tl.constexpr, BT: tl.constexpr,
                    BD: tl.constexpr, PDL: tl.constexpr):
    """out[t] = sum_j y_hits[t*k + j] (+ y_hits[M + t]) in fp32, in that order (see :func:`_hit_out`). SKIP: the
    rows of hits of id -1 were never written (no block held them) and are not read."""
    pdl_enter(PDL)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = (t < N)[:, None] & (cols < D)[None, :]
    t64 = t.to(tl.int64)
    acc = tl.zeros([BT, BD], tl.float32)
    for j in tl.static_range(K_TOP):
        m = mask
        if SKIP:
            m = mask & (tl.load(ids_ptr + t64 * K_TOP + j, mask=t < N, other=-1) >= 0)[:, None]
        acc += _hit_out(y_ptr, t64 * K_TOP + j, cols, m, D, split, y_split_stride, DT)
    if HAS_SHARED:
        acc += _hit_out(y_ptr, M + t64, cols, mask, D, split, y_split_stride, DT)
    tl.store(out_ptr + t64[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def size_class(n: int, k: int, e: int) -> str:
    """"tiny" (at most 64 hits: a handful of experts, too few programs without split-K), "small" (fewer than
    32 rows per touched expert on average) or "large"."""
    m = n * k
    if m <= 64:
        return "tiny"
    return "small" if m / min(e, m) < 32 else "large"


def default_config(n: int, k: int, e: int, form: str = "dense") -> dict:
    """The table entry (:data:`DEFAULTS`) for ``n`` tokens, top-``k`` of ``e`` experts in weight ``form``
    ("dense", "fp8", "fp4"), with every launch key present."""
    return _LAUNCH | DEFAULTS[form][size_class(n, k, e)]


def legal_config(cfg: dict, forms: set[str], act_quant: bool) -> dict:
    """``cfg`` made valid for the weight forms in use: bk 128 under act_quant (it quantizes per 128 columns),
    FP8 tiles inside one 128x128 scale block (bn, bk <= 128); missing launch keys from :data:`_LAUNCH`."""
    cfg = _LAUNCH | cfg
    if act_quant:
        cfg["bk"] = 128
    if "fp8" in forms:
        cfg.update(bk=min(cfg["bk"], 128), bn_up=min(cfg["bn_up"], 128), bn_down=min(cfg["bn_down"], 128))
    return cfg


# H100 gives a block at most 227 KiB; the estimate below bounds every sm_90 compile measured for these kernels
# (tests/test_kernel_resources.py compiles them), the rest is margin for what it does not model.
SMEM_BUDGET = 200 * 1024


def _loop_bytes(bm: int, bn: int, bk: int, stages: int, x_bytes: int, form: str, w_bytes: int, n_w: int,
                a_bytes: int | None = None, convert: bool = True) -> int:
    """Shared memory of one GEMM loop reading ``n_w`` weight tiles: every tile loaded per K step, once per
    pipeline stage (activations of ``a_bytes`` per element, default ``x_bytes``), plus with ``convert`` the
    weight tiles in the activation dtype (the MMA or FMA operand layout that a converted weight passes through)."""
    w_tile = bn * bk // 2 + bn * (bk // 32) * 4 if form == "fp4" else bn * bk * w_bytes
    a = x_bytes if a_bytes is None else a_bytes
    return stages * (bm * bk * a + n_w * w_tile) + (n_w * bn * bk * x_bytes if convert else 0)


def smem_bytes(cfg: dict, x_bytes: int, form: str, w_bytes: int, act_quant: bool = False) -> int:
    """Estimated shared memory (bytes) of the larger of the two GEMM kernels under ``cfg`` for activations of
    ``x_bytes`` per element and weights in ``form`` (``w_bytes`` per stored element).

    The grouped kernels feed the MMA straight from the staged tiles where no operand is converted: dense weights
    in the activation dtype without act_quant, and FP8 weights under fp8_dot with x pre-quantized (e4m3, one
    byte; h too when the gate/up tiles are 128-wide, counted at ``x_bytes`` here since I is not known). Their
    sm_90 compiles measure exactly stages x (activation + weight tiles) there (tests/test_kernel_resources.py),
    so the converted-copy term, a third of the estimate of the FP8 prefill tiles, is left out: it held them to
    two stages."""
    cfg = _LAUNCH | cfg
    bm, bk, st = cfg["bm"], cfg["bk"], cfg["num_stages"]
    conv, a_up, conv_down = True, x_bytes, True
    if not cfg["direct"]:
        if form == "dense" and not act_quant and w_bytes == x_bytes:
            conv = conv_down = False
        elif form == "fp8" and act_quant and cfg["fp8_dot"] and cfg["prequant"]:
            conv, a_up, conv_down = False, 1, cfg["bn_up"] % 128 != 0  # 64-wide: h quantized on load (registers)
    return max(_loop_bytes(bm, cfg["bn_up"], bk, st, x_bytes, form, w_bytes, 2, a_up, conv),
               _loop_bytes(bm, cfg["bn_down"], bk, st, x_bytes, form, w_bytes, 1, x_bytes, conv_down))


def fit_config(cfg: dict, x_bytes: int, loops: list[tuple[str, int]], act_quant: bool = False) -> dict:
    """``cfg`` with fewer stages, then thinner row blocks, then narrower output tiles, until every launch's loop
    (``loops``: (form, bytes per weight element) of the routed and the shared stack) fits SMEM_BUDGET. The direct
    path's kernels hold both loops when the forms differ, in exclusive branches: Triton gives them the same
    shared memory (the larger one's; tests/test_kernel_resources.py checks the compiled sizes)."""
    cfg = dict(cfg)
    while max(smem_bytes(cfg, x_bytes, f, w, act_quant) for f, w in loops) > SMEM_BUDGET:
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        elif cfg["bm"] > 16:
            cfg["bm"] //= 2
        elif max(cfg["bn_up"], cfg["bn_down"]) > 32:
            key = "bn_up" if cfg["bn_up"] >= cfg["bn_down"] else "bn_down"
            cfg[key] //= 2
        elif cfg["num_stages"] > 1:
            cfg["num_stages"] = 1
        else:
            raise ValueError(f"no MoE tile configuration fits {SMEM_BUDGET} bytes of shared memory: {cfg}")
    return cfg


def config_name(cfg: dict) -> str:
    cfg = _LAUNCH | cfg
    return "bm{bm} up{bn_up} down{bn_down} bk{bk} w{num_warps} s{num_stages} g{group} k{split}".format(**cfg) + (
        " fp8dot" if cfg["fp8_dot"] else "") + (" fp4dot" if cfg["fp4_dot"] else "") + (
        " pq" if cfg["prequant"] else "") + (" direct" if cfg["direct"] else "") + (
        " fused" if cfg["fuse_down"] else "")


def effective_config(n: int, k: int, experts: ExpertWeights, shared: ExpertWeights | None, x_bytes: int,
                     act_quant: bool, config: dict | None = None) -> dict:
    """The configuration :func:`moe_experts` runs: ``config`` over the default for the routed form, made legal
    for the forms in use and fitted to the shared-memory budget (fp8_dot, fp4_dot and prequant only under
    act_quant)."""
    stacks = [experts] + ([shared] if shared is not None else [])
    cfg = legal_config(default_config(n, k, experts.w1.shape[0], experts.form) | (config or {}),
                       {w.form for w in stacks}, act_quant)
    cfg["direct"] = bool(cfg["direct"]) and n * k <= direct.max_hits()
    # the product keys first: the shared-memory estimate depends on them (x quantized once only if D % 128 == 0)
    cfg["fp8_dot"] = bool(cfg["fp8_dot"]) and act_quant
    cfg["fp4_dot"] = bool(cfg["fp4_dot"]) and act_quant
    cfg["prequant"] = bool(cfg["prequant"]) and act_quant and experts.w2.shape[1] % 128 == 0
    cfg = fit_config(cfg, x_bytes, [(w.form, w.w1.element_size()) for w in stacks], act_quant)
    cfg["fuse_down"] = bool(cfg["fuse_down"]) and cfg["direct"] and direct.can_fuse(stacks, act_quant, cfg)
    return cfg


def _scales(w: ExpertWeights, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scales as the kernels read them: FP4 e8m0 ones as their bytes (decoded in the kernel: no launch, a
    quarter of fp32's bytes), other ones fp32 (e8m0 decoded exactly); dense stacks pass a dummy pointer that is
    never read."""
    if w.form == "dense":
        return like, like, like
    if w.form == "fp4" and w.w1_scale.dtype in (torch.uint8, torch.float8_e8m0fnu):
        return tuple(s.contiguous().view(torch.uint8) for s in (w.w1_scale, w.w3_scale, w.w2_scale))
    return tuple(e8m0_to_float(s).contiguous() for s in (w.w1_scale, w.w3_scale, w.w2_scale))


def _stack(w: ExpertWeights) -> tuple[torch.Tensor, ...]:
    """(w1, w3, w2, w1_scale, w3_scale, w2_scale) as the kernels read them: contiguous, packed FP4 bytes as int32
    words (eight codes each)."""
    ws = tuple(t.contiguous().view(torch.int32) if w.form == "fp4" else t.contiguous() for t in (w.w1, w.w3, w.w2))
    return ws + _scales(w, ws[0])


def group_hits(ids: torch.Tensor, n_exp: int, bm: int, n_shared: int = 0,
               skip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert hits ``ids`` [N, k] (or flattened) grouped by expert (one launch, no host sync); with ``skip`` hits of id -1
    are left out (``order`` then holds fewer valid entries: the counts in ``meta`` say how many).

    Returns ``meta`` int32 [3, E_P] (E_P = next power of two above E: per expert its hit count, its first sorted
    position and the cumulative number of ``bm``-row blocks; entry E is the shared expert with ``n_shared``
    hits) and ``order`` int32 [N*k + n_shared]: hit ids (flat pick index ``t*k + j``; ``N*k + t`` for the
    shared expert) grouped by expert, the shared ones last in token order.
    """
    m = ids.numel()
    e_p = triton.next_power_of_2(n_exp + 1)
    dev = ids.device
    cnt = torch.empty(e_p, dtype=torch.int32, device=dev)
    meta = torch.empty(3, e_p, dtype=torch.int32, device=dev)
    rank = torch.empty(max(m, 1), dtype=torch.int32, device=dev)
    order = torch.empty(m + n_shared, dtype=torch.int32, device=dev)
    # the kernel narrows the ids (int64 from the routers) as it loads them: no cast launch
    _align_kernel[(1,)](ids.reshape(-1), cnt, meta, rank, order, m, n_shared, n_exp, BM=bm, E_P=e_p,
                        CH=_ALIGN_CHUNK, SKIP=skip, num_warps=4, **pdl.launch(dev))
    return meta, order


def moe_experts(
    x: torch.Tensor, experts: ExpertWeights, weights: torch.Tensor, ids: torch.Tensor, limit: float | None,
    act_quant: bool = False, shared: ExpertWeights | None = None, shared_limit: float | None = None,
    out_dtype: torch.dtype = torch.float32, may_skip: bool = False, config: dict | None = None,
) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.moe.moe_experts` (same arguments; ``config`` overrides :func:`default_config`:
    keys bm, bn_up, bn_down, bk, num_warps, num_stages, group, split, fp8_dot, fp4_dot, prequant and direct, see
    :data:`CANDIDATES`; made legal and fitted by :func:`effective_config`). ``may_skip``: ids may hold -1, hits
    computed by no program and left out of the combine (the kernels' SKIP; without it they compile as if no id
    could be -1)."""
    n, d = x.shape
    k = ids.shape[1]
    n_exp, inter = experts.w1.shape[0], experts.w1.shape[1]
    out = torch.empty(n, d, dtype=out_dtype, device=x.device)
    if n == 0:
        return out
    has_shared = shared is not None
    sh = shared if has_shared else experts
    if sh.w1.shape[1] != inter or sh.w2.shape[1] != d:
        raise ValueError(f"shared expert shapes {tuple(sh.w1.shape)}, {tuple(sh.w2.shape)} do not fit the routed "
                         f"experts' I={inter}, D={d}")
    cfg = effective_config(n, k, experts, shared, x.element_size(), act_quant, config)
    bm, bk, group = cfg["bm"], cfg["bk"], max(1, int(cfg["group"]))
    if "fp4" in {experts.form, sh.form} and (d % 32 or inter % 32 or bk < 32):
        raise ValueError(f"FP4 experts need D and I divisible by 32 (got {d}, {inter}) and bk >= 32")
    dots = {"dense": False, "fp8": cfg["fp8_dot"], "fp4": cfg["fp4_dot"]}
    # split-K slices of the down GEMM's inputs, each a whole number of BK steps (and of 128-column groups)
    k_chunk = triton.cdiv(triton.cdiv(inter, max(1, int(cfg["split"]))), bk) * bk
    split = triton.cdiv(inter, k_chunk)
    x = x.contiguous()
    # x's e4m3 codes and e8m0 scales per 128 columns for every gate/up program (act_quant's own kernel: the
    # same rounding as the on-load quantization)
    prequant = cfg["prequant"] and d % 128 == 0
    xq, xs = act_quant_kernel(x, 128, "ue8m0") if prequant else (x, x)
    lim = limit if limit is not None and limit > 0 else float("inf")
    s_lim = shared_limit if shared_limit is not None and shared_limit > 0 else float("inf")
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    if cfg["direct"]:
        return direct.moe_experts_direct(
            x, xq, xs.view(torch.uint8), ids, weights.reshape(-1).float().contiguous(), _stack(experts), _stack(sh),
            (_FORM[experts.form], _FORM[sh.form]), (dots[experts.form], dots[sh.form]), has_shared, (lim, s_lim),
            cfg, act_quant, prequant, out, _TL[x.dtype], prec, may_skip)
    m, n_sh = n * k, n if has_shared else 0
    e_p = triton.next_power_of_2(n_exp + 1)
    dev = x.device
    flat = ids.reshape(-1)  # a copy only if strided: made once for the align kernel and the combine
    meta, order = group_hits(flat, n_exp, bm, n_sh, may_skip)

    r1, r3, r2, rs1, rs3, rs2 = _stack(experts)
    q1, q3, q2, qs1, qs3, qs2 = _stack(sh)
    # the shared expert shares the routed loop when its pointers have the same types (see _gate_up_kernel)
    one_loop = not has_shared or all(
        a.dtype == b.dtype for a, b in zip((r1, r2, rs1, rs2), (q1, q2, qs1, qs2), strict=True))
    # every expert with hits adds at most one partial block
    parts = ((0, min(n_exp, m) + m // bm + triton.cdiv(n_sh, bm)),) if one_loop else (
        (1, min(n_exp, m) + m // bm), (2, triton.cdiv(n_sh, bm)))
    # with x pre-quantized and whole 128-column groups per gate/up tile, h is stored quantized for the down GEMM
    h_q = prequant and cfg["bn_up"] % 128 == 0 and inter % 128 == 0
    h = torch.empty(m + n_sh, inter, dtype=torch.float8_e4m3fn if h_q else x.dtype, device=dev)
    hs = torch.empty(m + n_sh, inter // 128, dtype=torch.uint8, device=dev) if h_q else h
    # split 1: each hit's output in the model dtype; else fp32 partials per slice, summed by the combine
    y_hits = torch.empty(split, m + n_sh, d, dtype=x.dtype if split == 1 else torch.float32, device=dev)
    wts = weights.reshape(-1).float().contiguous()
    for part, blocks in parts:
        form = sh.form if part == 2 else experts.form
        common = dict(E_P=e_p, BM=bm, BK=bk, FORM=_FORM[form], PART=part, ACT_QUANT=act_quant,
                      FP8_DOT=dots[form], DT=_TL[x.dtype], PREC=prec, num_warps=cfg["num_warps"],
                      num_stages=cfg["num_stages"], **pdl.launch(x.device))
        n_up = triton.cdiv(inter, cfg["bn_up"])
        _gate_up_kernel[(blocks * n_up,)](
            xq, xs.view(torch.uint8), r1, r3, rs1, rs3, q1, q3, qs1, qs3, wts, meta, order, h, hs, m, k, d, inter,
            n_exp, lim, s_lim, r1[0].numel(), rs1[0].numel(), blocks, n_up, group, BN=cfg["bn_up"], A_Q=prequant,
            H_Q=h_q, **common)
        n_down = triton.cdiv(d, cfg["bn_down"]) * split
        _down_kernel[(blocks * n_down,)](
            h, hs, r2, rs2, q2, qs2, meta, order, y_hits, d, inter, n_exp, r2[0].numel(), rs2[0].numel(), blocks,
            n_down, group, split, k_chunk, y_hits[0].numel(), BN=cfg["bn_down"], A_Q=h_q, **common)
    bd = min(1024, triton.next_power_of_2(d))
    _combine_kernel[(triton.cdiv(n, 4), triton.cdiv(d, bd))](
        y_hits, flat, out, n, m, d, split, y_hits[0].numel(), K_TOP=k, HAS_SHARED=has_shared,
        SKIP=may_skip, DT=_TL[x.dtype], BT=4, BD=bd, **pdl.launch(x.device))
    return out
