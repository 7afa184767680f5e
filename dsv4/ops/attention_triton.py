"""Triton sparse attention over the window ring and the paged compressed entries (reference:
:func:`dsv4.ops.attention.paged_sparse_attention`).

One program takes ``BLOCK_H`` heads of one query row (one token: decode, extend and verify rows alike) and
``BLOCK_D`` of the value columns (the scores always span the whole head dim; chunks of the value dims keep the
fp32 accumulators small and give small batches more programs, for a repeated QK^T). A row's
candidate keys form one virtual sequence: its window (index ``j < W``: position ``pos - W + 1 + j``; those of this
batch are read from the batch's own ``kv`` rows, older ones from the ring), then its compressed entries (index
``W + c``: CSA the indexer's pick ``picks[t, c]``, HCA entry ``c``, for ``c < (pos + 1) // ratio``), whose pool
rows are looked up in the page table inside the kernel. That chain (pick -> page -> pool row) runs ahead of the
key loads (picks two blocks ahead, rows one), so a block waits for one load, not three in turn. Nothing is
prepared on the host: no syncs, no shapes that depend on the data, so a decode step can be captured in a CUDA
graph.

Batch invariance: a row's result is bitwise the same whatever else is in the batch. The virtual sequence is cut
into groups of keys whose size depends only on the row's own key count (at most ``groups`` groups of at least
``min_group_blocks`` blocks). Each group is reduced from a fresh state by an online softmax over blocks of
``BLOCK_N`` keys, and the row's result is the left fold of its group states in order (:func:`_merge`), then the
sink and the normalisation (:func:`_finalize`). Two forms compute exactly that: no-split (one program folds all
groups; for many rows) and split (one program per group writes the group's state; :func:`_combine_kernel` folds
them; for few rows). Both run the same compiled kernel (``SPLIT`` is a runtime argument, not specialised), and
the fold and epilogue arithmetic is written with explicit ``fma`` so the compiler cannot contract it differently
in the two kernels; that arithmetic is elementwise in the columns (the statistics are per head), so the fold
runs in column chunks of its own width (``COMBINE``) and gives the same bits. Block sizes, warps and group sizes
are fixed per head count and KV dtype, never per batch.

Numerics: online softmax in base 2 with fp32 statistics and accumulators; the (unnormalised) probabilities are
rounded to the activation dtype before the PV product, as the official kernel does (the reference rounds the
normalised ones: in bf16 the two differ by ~3e-3 norm-wise, in fp32 by ~1e-6); the per-head sink (a raw logit)
joins the denominator at the end. The single K=V head is loaded once per block and used for both products.
FP8 stores (:class:`~dsv4.ops.kv_fp8.Fp8KV`) are dequantised on load, in the activation dtype: e4m3 x 2^k is
exact in bf16/fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dsv4.ops import pdl
from dsv4.ops.kv_fp8 import KV_QUANT_BLOCK, Fp8KV
from dsv4.ops.pdl import enter as pdl_enter

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
LOG2E = 1.4426950408889634
# Split-K for up to 32 rows, no-split above. H100 2026-11-24 (docs/benchmarks.md) and H200 2026-12-04
# (benchmarks/kernels.py --quick --only attention, 64k): split wins at 1 and 8 rows and loses at 64 in every
# configuration (h32n32w8s2g16m2 CSA b64: 180 us no-split, 266 split; at 256 too). 32 rows is untimed;
# no-split there fills under half the SMs (2 head blocks x 32 rows), so it stays on the split side. Either
# form gives bitwise the same rows, so this choice only moves time.
SPLIT_MAX_ROWS = 32


@triton.jit
def _row_span(pos, W, RATIO, PICK_W, HAS_COMP: tl.constexpr, IS_CSA: tl.constexpr, BLOCK_N: tl.constexpr,
              MAX_GROUPS: tl.constexpr, MIN_GROUP_BLOCKS: tl.constexpr):
    """One row's compressed-key count, virtual key count, blocks per group and group count (the row's alone)."""
    n_comp = pos * 0
    if HAS_COMP:
        n_comp = (pos + 1) // RATIO
        if IS_CSA:
            n_comp = tl.minimum(n_comp, PICK_W)
    n_virt = W + n_comp
    n_blocks = (n_virt + BLOCK_N - 1) // BLOCK_N
    gb = tl.maximum((n_blocks + MAX_GROUPS - 1) // MAX_GROUPS, MIN_GROUP_BLOCKS)
    return n_comp, n_virt, gb, (n_blocks + gb - 1) // gb


@triton.jit
def _key_entries(j, t64, n_comp, picks_ptr, W, PICK_STRIDE, HAS_COMP: tl.constexpr, IS_CSA: tl.constexpr):
    """Compressed entry of virtual indices j [BN] (CSA: the pick, loaded here) and whether it is visible."""
    c = j - W
    cok = (j >= W) & (c < n_comp)
    e = tl.maximum(c, 0).to(tl.int64)
    if HAS_COMP:
        if IS_CSA:
            e = tl.load(picks_ptr + t64 * PICK_STRIDE + c, mask=cok, other=-1).to(tl.int64)
            cok = cok & (e >= 0)
            e = tl.maximum(e, 0)
    return e, cok


@triton.jit
def _key_rows(j, e, cok, t64, pos, p0, slot, kv_ptr, ring_ptr, ring_sc_ptr, ring_rope_ptr, comp_ptr, comp_sc_ptr,
              comp_rope_ptr, pt_ptr, W, R, PS, PT_STRIDE,
              HD: tl.constexpr, NOPE: tl.constexpr, RD: tl.constexpr, NSC: tl.constexpr, HAS_COMP: tl.constexpr,
              FP8: tl.constexpr):
    """Where the keys of virtual indices j [BN] (entries e, cok from :func:`_key_entries`) live: (visible, this
    batch's own, own row, stored row, its scale row, its rope row) [BN] (the last three are the store's
    nope/scale/rope rows for FP8, the one row otherwise), shared by every column gather of the block."""
    is_win = j < W
    k = pos - W + 1 + j
    kc = tl.maximum(k, 0)
    own = is_win & (k >= p0)  # this batch's key: row t - pos + k of kv
    ok = is_win & (k >= 0)
    row = slot * R + kc % R  # flat ring row
    own_p = kv_ptr + (t64 - pos + kc) * HD
    if FP8:
        nope_p = ring_ptr + row * NOPE
        sc_p = ring_sc_ptr + row * NSC
        rope_p = ring_rope_ptr + row * RD
    else:
        nope_p = ring_ptr + row * HD
        sc_p = nope_p
        rope_p = nope_p
    if HAS_COMP:
        # int64 whatever the page table's and picks' dtypes: pool row x row width passes 2^31 in a large pool
        page = tl.load(pt_ptr + slot * PT_STRIDE + e // PS, mask=cok, other=0).to(tl.int64)
        crow = page * PS + e % PS  # flat pool row
        ok = ok | cok
        if FP8:
            nope_p = tl.where(is_win, nope_p, comp_ptr + crow * NOPE)
            sc_p = tl.where(is_win, sc_p, comp_sc_ptr + crow * NSC)
            rope_p = tl.where(is_win, rope_p, comp_rope_ptr + crow * RD)
        else:
            nope_p = tl.where(is_win, nope_p, comp_ptr + crow * HD)
    if not FP8:
        nope_p = tl.where(own, own_p, nope_p)
    return ok, own, own_p, nope_p, sc_p, rope_p


@triton.jit
def _key_cols(ok, own, own_p, nope_p, sc_p, rope_p, D0, HD: tl.constexpr, NOPE: tl.constexpr, RD: tl.constexpr,
              NSC: tl.constexpr, DW: tl.constexpr, QB: tl.constexpr, FP8: tl.constexpr, DT: tl.constexpr,
              HAS_OWN: tl.constexpr = True):
    """Columns D0 .. D0 + DW of the keys located by :func:`_key_rows` -> [BN, DW] in DT, 0 where not visible.
    FP8: e4m3 x 2^k is exact in bf16 and fp32, so the product is formed in DT (fp32 for fp16, whose range
    may not hold 2^k): half the registers of an fp32 tile, the same values. The scale bytes are loaded once
    per 64-column block and broadcast, not once per element. ``HAS_OWN`` False: the caller knows no key is this
    batch's own (``own`` all false), and the own-key tile is not compiled (its registers)."""
    d = D0 + tl.arange(0, DW)
    if FP8:
        KDT: tl.constexpr = tl.float32 if DT == tl.float16 else DT
        BN: tl.constexpr = ok.shape[0]
        stored = ok & ~own
        SB: tl.constexpr = QB if DW >= QB else DW  # column blocks of the tile, each within one scale block
        blk = D0 // SB + tl.arange(0, DW // SB)
        d3 = blk[:, None] * SB + tl.arange(0, SB)[None, :]
        f8 = tl.load(nope_p[:, None, None] + d3[None, :, :], mask=stored[:, None, None] & (d3 < NOPE)[None, :, :],
                     other=0.0)
        sb = blk if SB == QB else blk * SB // QB  # each column block's scale byte
        sc = tl.load(sc_p[:, None] + sb[None, :], mask=stored[:, None] & (sb < NSC)[None, :], other=127)
        scf = (sc.to(tl.int32) << 23).to(tl.float32, bitcast=True).to(KDT)  # e8m0 byte -> 2^(byte - 127), exact
        deq3 = f8.to(KDT) * scf[:, :, None]
        if NOPE % SB == 0 and RD <= SB:
            # a stored row's rope dims (activation dtype) fill the column block at NOPE: loaded as one [BN, SB]
            # tile and broadcast, not as a masked [BN, DW] tile; this batch's own keys (window blocks only) are
            # loaded whole only in blocks that hold one
            r = tl.arange(0, SB)
            rope = tl.load(rope_p[:, None] + r[None, :], mask=stored[:, None] & (r < RD)[None, :], other=0.0)
            kt = tl.reshape(tl.where((blk == NOPE // SB)[None, :, None], rope.to(KDT)[:, None, :], deq3), [BN, DW])
            if HAS_OWN and tl.max(own.to(tl.int32), axis=0) > 0:
                act = tl.load(own_p[:, None] + d[None, :], mask=own[:, None] & (d < HD)[None, :], other=0.0)
                kt = tl.where(own[:, None], act.to(KDT), kt)
        else:  # rope dims across column blocks: activation-dtype values as one masked tile (own rows, rope dims)
            act_p = tl.where(own[:, None], own_p[:, None] + d[None, :], rope_p[:, None] + (d - NOPE)[None, :])
            act = tl.load(act_p, mask=ok[:, None] & (d < HD)[None, :] & (own[:, None] | (d >= NOPE)[None, :]),
                          other=0.0)
            kt = tl.where(stored[:, None] & (d < NOPE)[None, :], tl.reshape(deq3, [BN, DW]), act.to(KDT))
    else:
        kt = tl.load(nope_p[:, None] + d[None, :], mask=ok[:, None] & (d < HD)[None, :], other=0.0)
    return kt.to(DT)


@triton.jit
def _online_block(q, kt, vt, ok, m_i, l_i, acc, qk_scale, DT: tl.constexpr, PREC: tl.constexpr):
    """One block of keys kt [BN, HD_P] (0 where no query row sees them; vt [BN, BLOCK_D]: the value columns this
    program accumulates, kt itself when it takes them all) into the running softmax of q [BH, HD_P]; ok: which
    (query row, key) pairs are visible, [1, BN] (every row alike) or [BH, BN]."""
    s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # a row with nothing visible yet keeps max -inf: shift by 0 so exp2 gives 0, not NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DT), vt, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _request_has_rows(t, slot, pos, p0, slot_ptr, T, MIN_ROWS):
    """Whether row t's request has at least MIN_ROWS rows in the batch: a request's rows are consecutive from
    batch row t - (pos - p0), and no two requests of a batch share a slot."""
    last = t - (pos - p0) + MIN_ROWS - 1
    return tl.load(slot_ptr + last, mask=(last >= 0) & (last < T), other=-1) == slot


@triton.jit
def _merge(m, l, acc, m_g, l_g, acc_g):
    """Fold one group's state (m_g, l_g [BH], acc_g [BH, HD_P]) into the running one (explicit fma: the same
    rounding in the attention kernel and in the combine kernel)."""
    m_new = tl.maximum(m, m_g)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    a = tl.exp2(m - m_safe)
    b = tl.exp2(m_g - m_safe)
    l = tl.fma(l, a, l_g * b)
    acc = tl.fma(acc, a[:, None], acc_g * b[:, None])
    return m_new, l, acc


@triton.jit
def _finalize(m, l, acc, sink):
    """(m, l, acc) and the sink logits (base 2) [BH] -> the normalised output [BH, HD_P] fp32."""
    m_fin = tl.maximum(m, sink)
    a = tl.exp2(m - m_fin)
    inv = a / tl.fma(l, a, tl.exp2(sink - m_fin))
    return acc * inv[:, None]


@triton.jit
def _store_rows(out_ptr, offs, mask, o, cos_ptr, sin_ptr, t, D0, HD: tl.constexpr, ROWS: tl.constexpr,
                BD: tl.constexpr, ROPE_HALF: tl.constexpr, DT: tl.constexpr):
    """Round o [ROWS, BD] fp32 (columns D0 .. D0 + BD of the rows) to DT, rotate its pairs among the trailing
    rope dims by the conjugate rope at row t (a scalar, or [ROWS, 1]: each row's own), round again, store at
    out_ptr + offs (offs, mask [ROWS, BD]: contiguous along the last dim)."""
    o = o.to(DT).to(tl.float32)
    e, od = tl.split(tl.reshape(o, [ROWS, BD // 2, 2]))
    i = D0 // 2 + tl.arange(0, BD // 2)
    j = i - (HD // 2 - ROPE_HALF)
    is_rope = (j >= 0) & (i < HD // 2)
    c = tl.load(cos_ptr + t * ROPE_HALF + j[None, :], mask=is_rope[None, :], other=1.0)
    s = tl.load(sin_ptr + t * ROPE_HALF + j[None, :], mask=is_rope[None, :], other=0.0)
    r = tl.reshape(tl.join(tl.fma(e, c, od * s), tl.fma(od, c, -(e * s))), [ROWS, BD])
    tl.store(out_ptr + offs, r.to(DT), mask=mask)


@triton.jit(do_not_specialize=["PICK_STRIDE", "PICK_W", "SPLIT", "G_STRIDE", "HEADS_FIRST", "SKIP_ROWS", "T"])
def _attn_kernel(
    q_ptr, kv_ptr, ring_ptr, ring_sc_ptr, ring_rope_ptr, comp_ptr, comp_sc_ptr, comp_rope_ptr, pt_ptr, picks_ptr,
    slot_ptr, p0_ptr, pos_ptr, sink_ptr, cos_ptr, sin_ptr, out_ptr, acc_ptr, ml_ptr,
    H, W, R, PS, PT_STRIDE, PICK_STRIDE, PICK_W, RATIO, SPLIT, G_STRIDE, qk_scale, HEADS_FIRST, SKIP_ROWS, T,
    HD: tl.constexpr, HD_P: tl.constexpr, ROPE_HALF: tl.constexpr, NOPE: tl.constexpr, NSC: tl.constexpr,
    QB: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MAX_GROUPS: tl.constexpr,
    MIN_GROUP_BLOCKS: tl.constexpr, HAS_COMP: tl.constexpr, IS_CSA: tl.constexpr, FP8: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    t, hd_blk, gp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if HEADS_FIRST:  # see _grid: the head blocks of one row are neighbouring programs
        t, hd_blk = tl.program_id(1), tl.program_id(0)
    # axis "heads" enumerates (head block, value-column chunk): the chunks of a head block share its scores
    hb = hd_blk // (HD_P // BLOCK_D)
    D0 = (hd_blk % (HD_P // BLOCK_D)) * BLOCK_D
    t64 = t.to(tl.int64)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    d = tl.arange(0, HD_P)
    dv = D0 + tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    p0 = tl.load(p0_ptr + t).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    n_comp, n_virt, gb, n_groups = _row_span(pos, W, RATIO, PICK_W, HAS_COMP, IS_CSA, BLOCK_N, MAX_GROUPS,
                                             MIN_GROUP_BLOCKS)
    g_lo = 0 * n_groups
    g_hi = n_groups
    if SPLIT:
        g_lo += gp
        g_hi = tl.minimum(g_hi, gp + 1)
    if SKIP_ROWS > 0:  # the multi-query kernel (attention_mq_triton) takes requests of SKIP_ROWS rows or more
        if _request_has_rows(t, slot, pos, p0, slot_ptr, T, SKIP_ROWS):
            g_hi = g_lo
    if g_lo < g_hi:
        q = tl.load(q_ptr + (t64 * H + heads[:, None]) * HD + d[None, :], mask=hmask[:, None] & (d < HD)[None, :],
                    other=0.0).to(DT)
        m_s = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_s = tl.zeros([BLOCK_H], tl.float32)
        acc_s = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        m_g = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_g = tl.zeros([BLOCK_H], tl.float32)
        acc_g = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        # The pick -> page -> row chain runs ahead of the keys: block j's rows were resolved one step earlier
        # (their page loads in flight during block j - 1) and its picks two steps earlier, so a block waits for
        # its key rows only, not for three dependent loads in turn. Blocks are consecutive across groups.
        ar = tl.arange(0, BLOCK_N)
        j_lo = g_lo * gb * BLOCK_N
        e, cok = _key_entries(j_lo + ar, t64, n_comp, picks_ptr, W, PICK_STRIDE, HAS_COMP, IS_CSA)
        ok, own, own_p, nope_p, sc_p, rope_p = _key_rows(
            j_lo + ar, e, cok, t64, pos, p0, slot, kv_ptr, ring_ptr, ring_sc_ptr, ring_rope_ptr, comp_ptr,
            comp_sc_ptr, comp_rope_ptr, pt_ptr, W, R, PS, PT_STRIDE, HD, NOPE, 2 * ROPE_HALF, NSC, HAS_COMP, FP8)
        e, cok = _key_entries(j_lo + BLOCK_N + ar, t64, n_comp, picks_ptr, W, PICK_STRIDE, HAS_COMP, IS_CSA)
        for g in range(g_lo, g_hi):
            m_g = tl.full([BLOCK_H], float("-inf"), tl.float32)
            l_g = tl.zeros([BLOCK_H], tl.float32)
            acc_g = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
            for j0 in range(g * gb * BLOCK_N, tl.minimum((g + 1) * gb * BLOCK_N, n_virt), BLOCK_N):
                kt = _key_cols(ok, own, own_p, nope_p, sc_p, rope_p, 0, HD, NOPE, 2 * ROPE_HALF, NSC, HD_P, QB, FP8, DT)
                if BLOCK_D == HD_P:
                    vt = kt
                else:  # this program's value columns, again (an L1 hit): registers hold no [BN, HD_P] slice
                    vt = _key_cols(ok, own, own_p, nope_p, sc_p, rope_p, D0, HD, NOPE, 2 * ROPE_HALF, NSC, BLOCK_D, QB, FP8,
                                   DT)
                vis = ok
                e2, cok2 = _key_entries(j0 + 2 * BLOCK_N + ar, t64, n_comp, picks_ptr, W, PICK_STRIDE, HAS_COMP,
                                        IS_CSA)
                ok, own, own_p, nope_p, sc_p, rope_p = _key_rows(
                    j0 + BLOCK_N + ar, e, cok, t64, pos, p0, slot, kv_ptr, ring_ptr, ring_sc_ptr, ring_rope_ptr,
                    comp_ptr, comp_sc_ptr, comp_rope_ptr, pt_ptr, W, R, PS, PT_STRIDE, HD, NOPE, 2 * ROPE_HALF, NSC,
                    HAS_COMP, FP8)
                e, cok = e2, cok2
                m_g, l_g, acc_g = _online_block(q, kt, vt, vis[None, :], m_g, l_g, acc_g, qk_scale, DT, PREC)
            m_s, l_s, acc_s = _merge(m_s, l_s, acc_s, m_g, l_g, acc_g)
        if SPLIT:
            part = (t64 * G_STRIDE + g_lo) * H + heads
            tl.store(acc_ptr + part[:, None] * HD + dv[None, :], acc_g, mask=hmask[:, None] & (dv < HD)[None, :])
            first = hmask & (D0 == 0)  # every chunk has the same statistics: one writes them
            tl.store(ml_ptr + part * 2, m_g, mask=first)
            tl.store(ml_ptr + part * 2 + 1, l_g, mask=first)
        else:
            sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0) * 1.4426950408889634
            _store_rows(out_ptr, (t64 * H + heads[:, None]) * HD + dv[None, :], hmask[:, None] & (dv < HD)[None, :],
                        _finalize(m_s, l_s, acc_s, sink), cos_ptr, sin_ptr, t, D0, HD, BLOCK_H, BLOCK_D, ROPE_HALF,
                        DT)


@triton.jit(do_not_specialize=["PICK_W", "G_STRIDE", "HEADS_FIRST", "SKIP_ROWS", "T"])
def _combine_kernel(acc_ptr, ml_ptr, slot_ptr, p0_ptr, pos_ptr, sink_ptr, cos_ptr, sin_ptr, out_ptr, H, W, RATIO, PICK_W,
                    G_STRIDE, HEADS_FIRST, SKIP_ROWS, T,
                    HD: tl.constexpr, HD_P: tl.constexpr, ROPE_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MAX_GROUPS: tl.constexpr,
                    MIN_GROUP_BLOCKS: tl.constexpr, HAS_COMP: tl.constexpr, IS_CSA: tl.constexpr, DT: tl.constexpr,
                    PDL: tl.constexpr):
    """Fold the split programs' group states of one row, in group order, then the same epilogue, for BLOCK_H heads
    and columns D0 .. D0 + BLOCK_D (even: a rope pair never straddles two programs). The fold and the epilogue
    are elementwise in the columns (the statistics are per head, each program recomputes them), so any chunking
    gives the same bits, and small batches get HD_P / BLOCK_D times the programs. Every group's loads come before
    the first merge in program order (no load waits on a merge; ptxas may still interleave them, see COMBINE)."""
    pdl_enter(PDL)
    t, hc = tl.program_id(0), tl.program_id(1)
    if HEADS_FIRST:
        t, hc = tl.program_id(1), tl.program_id(0)
    hb = hc // (HD_P // BLOCK_D)
    D0 = (hc % (HD_P // BLOCK_D)) * BLOCK_D
    t64 = t.to(tl.int64)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    d = D0 + tl.arange(0, BLOCK_D)
    mask = hmask[:, None] & (d < HD)[None, :]
    pos = tl.load(pos_ptr + t).to(tl.int64)
    _, _, _, n_groups = _row_span(pos, W, RATIO, PICK_W, HAS_COMP, IS_CSA, BLOCK_N, MAX_GROUPS, MIN_GROUP_BLOCKS)
    if SKIP_ROWS > 0:
        if _request_has_rows(t, tl.load(slot_ptr + t), pos, tl.load(p0_ptr + t).to(tl.int64), slot_ptr, T,
                             SKIP_ROWS):
            return
    sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0) * 1.4426950408889634
    ms = ()
    ls = ()
    accs = ()
    for g in tl.static_range(MAX_GROUPS):  # the row's groups only (masks): at most MAX_GROUPS tiles in registers
        part = (t64 * G_STRIDE + g) * H + heads
        in_row = g < n_groups
        ms = ms + (tl.load(ml_ptr + part * 2, mask=hmask & in_row, other=float("-inf")),)
        ls = ls + (tl.load(ml_ptr + part * 2 + 1, mask=hmask & in_row, other=0.0),)
        accs = accs + (tl.load(acc_ptr + part[:, None] * HD + d[None, :], mask=mask & in_row, other=0.0),)
    m_s = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_s = tl.zeros([BLOCK_H], tl.float32)
    acc_s = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for g in tl.static_range(MAX_GROUPS):
        # the same _merge calls in the same order as the no-split kernel; groups past the row's count are
        # selected away, not merged (merging an empty state could turn a -0 into +0)
        m_n, l_n, acc_n = _merge(m_s, l_s, acc_s, ms[g], ls[g], accs[g])
        in_row = g < n_groups
        m_s = tl.where(in_row, m_n, m_s)
        l_s = tl.where(in_row, l_n, l_s)
        acc_s = tl.where(in_row, acc_n, acc_s)
    _store_rows(out_ptr, (t64 * H + heads[:, None]) * HD + d[None, :], mask, _finalize(m_s, l_s, acc_s, sink),
                cos_ptr, sin_ptr, t, D0, HD, BLOCK_H, BLOCK_D, ROPE_HALF, DT)


# The configurations benchmarks/kernels.py times and tests/gpu checks (each with split and no-split; block_d
# absent = the whole head dim). Resources on sm_90, CSA at V4-Flash shapes, bf16 activations ("loop": spill
# instructions in the key loop; `python tests/test_attention_resources.py --candidates` prints the table):
#   h32n32w8s2      bf16 KV 255 regs, no loop spills (124 B outside), 66 KB;  FP8 KV no loop spills, 84 KB
#   h16n32w4s2      bf16 KV 255 regs, no loop spills (172 B outside), 49 KB;  FP8 KV 43 LDL in the loop
#   h16n32d256w4s2  bf16 KV 240 regs, no spills at all, 65 KB;               FP8 KV 24 LDL in the loop
#   h32n32d256w8s2  bf16 KV 217 regs, no spills at all, 82 KB;               FP8 KV no loop spills, 92 KB
#   h64n32d256w8s1  bf16 KV no spills at all (wgmma, q in shared), 112 KB;   FP8 KV 25 LDL in the loop
#   h64n32d256w8s2  bf16 KV 16 LDL in the loop, 160 KB;                      FP8 KV 2 LDL in the loop, 140 KB
# Before the pick -> page -> row prefetch, block_d and the FP8 rope/own split every candidate spilled 400-3000 B,
# most of it in the key loop, and FP8 KV took 131-263 KB of shared memory. The block_n 64 points (h16n64w4s2,
# h32n64w8s2) were dropped: with FP8 KV they asked for 246 and 263 KB, beyond the 227 KB of an H100/H200 block.
CANDIDATES = tuple(
    dict(block_h=bh, block_n=32, num_warps=w, num_stages=st, groups=g, min_group_blocks=mg) | (
        dict(block_d=bd) if bd else {})
    for bh, bd, w, st, g, mg in ((32, 0, 8, 2, 16, 2), (16, 0, 4, 2, 16, 2), (16, 256, 4, 2, 16, 2),
                                 (32, 256, 8, 2, 16, 2), (64, 256, 8, 1, 16, 2), (64, 256, 8, 2, 16, 2),
                                 (16, 0, 4, 2, 32, 1))
)
# Defaults from the H200 sweep after the prefetch, block_d and the FP8 rope/own split (2026-12-04,
# benchmarks/kernels.py --quick --only attention, 64k context, us; docs/benchmarks.md "session 5"). bf16 KV:
# h16n32w4s2g16m2 is best or within 1% at every batch (CSA b1 23.1, b8 34.3, b64 73.5, b256 284; HCA b64 67.7,
# b256 255; extend 1024 rows 1016), ahead of h32n32w8s2g16m2 (26.6 / 40.3 / 88.1 / 340; extend 1220). FP8 KV:
# h32n32w8s2g16m2 is best at b64 (CSA 216 vs 241) and b256 (866 vs 929) and 9-15% behind h16n32 at b1/b8
# (41.5 vs 36.0, 70.5 vs 64.9): the large batches decide. One configuration per KV dtype, whatever the batch
# (batch invariance).
DEFAULT = CANDIDATES[1]
DEFAULT_FP8 = CANDIDATES[0]
# The split form's fold (_combine_kernel): heads x columns per program (block_d even, a power of two; clipped to
# the head dim), whatever the batch; a config's "combine" entry overrides it (tests: chunks of a small head dim).
# H200 2026-12 (torch profiler over CUDA-graph replays, no PDL, V4-Flash shapes, bf16, CSA at 8k context, us per
# call, b1 / b4 / b16 / b32): the former unchunked fold (16 heads x 512 columns, one group's load per merge)
# 15.1 / 16.0 / 17.5 / 35.4; h2d64w1 3.4 / 4.0 / 6.8 / 16.4; h8d64w4 4.2 / 4.5 / 6.8 / 15.4; h16d128w8
# 4.4 / 4.8 / 6.0 / 15.0 (HCA b1 6.5 -> 2.8, sliding b1 4.8 -> 2.3). Batches of 1-16 decide. NOTE: in the sm_90
# SASS ptxas still interleaves the group loads with the merges (64 registers at h2d64w1, 32 at h8d64w4), so the
# loads are not all in flight before the first merge: likely much of the gap to the ~1 us floor.
COMBINE = dict(block_h=2, block_d=64, num_warps=1)


def config_name(cfg: dict) -> str:
    return (f"h{cfg['block_h']}n{cfg['block_n']}" + (f"d{cfg['block_d']}" if "block_d" in cfg else "")
            + f"w{cfg['num_warps']}s{cfg['num_stages']}g{cfg['groups']}m{cfg['min_group_blocks']}")


def default_config(t: int, h: int, hd: int, device: torch.device, fp8: bool = False) -> dict:
    """Block sizes, group shape and the split decision for ``t`` query rows (``fp8``: FP8 KV stores).

    Everything but ``split`` is fixed whatever ``t`` (batch invariance: the rows' reduction order must not depend
    on the batch; the KV dtype is fixed for a model). block_h: heads per program (>= 16: the
    smallest dot tile); block_n: keys per step; block_d: value columns per program (the scores stay full width);
    groups / min_group_blocks: a row's keys are cut into at most ``groups`` groups of at least
    ``min_group_blocks`` blocks; split: one program per group plus the combine kernel.
    """
    return dict(DEFAULT_FP8 if fp8 else DEFAULT, split=t <= SPLIT_MAX_ROWS)


MAX_GRID_Y = 65535  # CUDA's limit on grid dimensions 1 and 2


def _grid(t: int, hb: int, *rest: int) -> tuple[tuple[int, ...], int]:
    """Launch grid and HEADS_FIRST for t rows of hb head blocks. The head blocks of one row read the same keys:
    as the fastest grid axis they run side by side and share those reads through L2 (rows first, the head
    blocks of a row run t programs apart and each fetches the row's keys from HBM once the batch's keys
    outgrow L2). Rows go on axis 1 while they fit its limit. Programs compute the same thing either way (batch
    invariance is untouched: only the launch order changes)."""
    if t <= MAX_GRID_Y:
        return (hb, t, *rest), 1
    return (t, hb, *rest), 0


def _parts(store: torch.Tensor | Fp8KV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(store) if isinstance(store, Fp8KV) else (store, store, store)


class Operands(NamedTuple):
    """The attention kernels' operands as they take them (this module's and the multi-query one's)."""

    q: torch.Tensor
    kv: torch.Tensor  # this batch's keys as the store will hold them
    cos: torch.Tensor
    sin: torch.Tensor
    sink: torch.Tensor
    ring_p: tuple  # the ring's (nope, scale, rope) parts, or the plain store three times
    comp_p: tuple  # the pool's, or the ring's when there is none
    pt: torch.Tensor  # the page table (slot when unused)
    pk: torch.Tensor  # the picks (slot when unused)
    has_comp: bool
    is_csa: bool
    rope_half: int
    nope: int
    hd_p: int


def operands(q: torch.Tensor, kv: torch.Tensor, ring: torch.Tensor | Fp8KV, comp: torch.Tensor | Fp8KV | None,
             page_table: torch.Tensor | None, picks: torch.Tensor | None, slot: torch.Tensor, sink: torch.Tensor,
             cos: torch.Tensor, sin: torch.Tensor) -> Operands:
    has_comp, is_csa = comp is not None, picks is not None
    if has_comp and isinstance(comp, Fp8KV) != isinstance(ring, Fp8KV):
        raise ValueError("ring and comp must both be FP8 stores or both plain tensors")
    ring_p = _parts(ring)
    return Operands(q.contiguous(), kv.to(ring.dtype).contiguous(), cos.float().contiguous(),
                    sin.float().contiguous(), sink.float().contiguous(), ring_p, _parts(comp) if has_comp else ring_p,
                    page_table if has_comp else slot, picks.contiguous() if is_csa else slot, has_comp, is_csa,
                    cos.shape[-1], q.shape[-1] - 2 * cos.shape[-1], triton.next_power_of_2(q.shape[-1]))


def paged_sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, ring: torch.Tensor | Fp8KV, comp: torch.Tensor | Fp8KV | None,
    page_table: torch.Tensor | None, picks: torch.Tensor | None, slot: torch.Tensor, p0: torch.Tensor,
    pos: torch.Tensor, sink: torch.Tensor, scale: float, window: int, ratio: int, cos: torch.Tensor,
    sin: torch.Tensor, config: dict | None = None, skip_rows: int = 0,
) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.attention.paged_sparse_attention` (same arguments; ``config`` overrides
    :func:`default_config`, for benchmarks and tests), one program per query row. ``skip_rows`` > 0: leave the
    rows of requests with at least that many rows in the batch unwritten (the multi-query kernel's,
    :mod:`dsv4.ops.attention_mq_triton`). No host syncs; launch shapes depend only on tensor shapes."""
    t, h, hd = q.shape
    out = torch.empty_like(q)
    if t == 0:
        return out
    fp8 = isinstance(ring, Fp8KV)
    cfg = default_config(t, h, hd, q.device, fp8) | (config or {})
    if q.dtype == torch.float32:  # exact checks only: two stages of fp32 key tiles can pass the shared memory
        cfg["num_stages"] = 1     # limit (h64n32d256w8s2: 238 KB; FP8 KV h16n32d256w4s2: 254 KB)
    block_h, block_n, groups = cfg["block_h"], cfg["block_n"], cfg["groups"]
    (q, kv, cos, sin, sink, ring_p, comp_p, pt, pk, has_comp, is_csa, rope_half, nope,
     hd_p) = operands(q, kv, ring, comp, page_table, picks, slot, sink, cos, sin)
    # value columns per program (the score tile stays full width); FP8 scales cover KV_QUANT_BLOCK columns
    block_d = min(max(cfg.get("block_d", hd_p), KV_QUANT_BLOCK if fp8 else 1), hd_p)
    hb = triton.cdiv(h, block_h) * (hd_p // block_d)
    split = bool(cfg["split"])
    ps = comp.shape[1] if has_comp else 1
    # the most groups any row can have, from shapes alone: its keys are at most the window plus the pick width
    # (CSA) or every entry the page table can address (HCA)
    max_keys = window + (pk.shape[1] if is_csa else page_table.shape[1] * ps if has_comp else 0)
    n_prog = min(groups, triton.cdiv(triton.cdiv(max_keys, block_n), cfg["min_group_blocks"])) if split else 1
    acc = torch.empty((t, n_prog, h, hd) if split else (1,), dtype=torch.float32, device=q.device)
    ml = torch.empty((t, n_prog, h, 2) if split else (1,), dtype=torch.float32, device=q.device)
    dt = _TL[q.dtype]
    meta = dict(HD=hd, HD_P=hd_p, ROPE_HALF=rope_half, BLOCK_N=block_n, MAX_GROUPS=groups,
                MIN_GROUP_BLOCKS=cfg["min_group_blocks"], HAS_COMP=has_comp, IS_CSA=is_csa, DT=dt)
    grid, heads_first = _grid(t, hb, n_prog)
    _attn_kernel[grid](
        q, kv, *ring_p, *comp_p, pt, pk, slot, p0, pos, sink, cos, sin, out, acc, ml,
        h, window, ring.shape[1], ps, pt.stride(0) if has_comp else 0, pk.stride(0) if is_csa else 0,
        pk.shape[1] if is_csa else 0, ratio, int(split), n_prog, scale * LOG2E, heads_first, skip_rows, t,
        NOPE=nope, NSC=triton.cdiv(nope, KV_QUANT_BLOCK), QB=KV_QUANT_BLOCK, BLOCK_H=block_h, BLOCK_D=block_d, FP8=fp8,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **meta, **pdl.launch(q.device),
    )
    if split:
        comb = COMBINE | cfg.get("combine", {})
        comb_d = min(comb["block_d"], hd_p)
        if comb_d < 2 or comb_d & (comb_d - 1):  # a power of two (a tile), even (rope pairs stay whole)
            raise ValueError(f"combine block_d must be a power of two >= 2, got {comb['block_d']}")
        grid, heads_first = _grid(t, triton.cdiv(h, comb["block_h"]) * (hd_p // comb_d))
        _combine_kernel[grid](acc, ml, slot, p0, pos, sink, cos, sin, out, h, window, ratio,
                              pk.shape[1] if is_csa else 0, n_prog, heads_first, skip_rows, t,
                              BLOCK_H=comb["block_h"], BLOCK_D=comb_d, num_warps=comb["num_warps"], **meta,
                              **pdl.launch(q.device))
    return out
