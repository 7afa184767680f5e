"""Multi-query sparse attention for extend and verify rows (reference:
:func:`dsv4.ops.attention.paged_sparse_attention`), and the entry that routes each row to it or to the single-row
kernel (:mod:`dsv4.ops.attention_triton`).

Consecutive rows of one request share most of their keys: rows p and p + 1 see the same window but for one key,
and (HCA) the same compressed entries but for at most one. The single-row kernel loads them once per row; here
one program takes up to ``ROWS`` consecutive rows of one request x ``BLOCK_H`` heads as one query tile (the MMA's
M dimension is ``ROWS * BLOCK_H``: 64, a wgmma tile, at the defaults) and ``BLOCK_D`` value columns, loads each
key block once for all of them and masks each (row, key) pair by the row's own visibility: row p sees window
positions ``(p - W, p]`` and, for HCA, entries ``c < (p + 1) // ratio``. CSA picks differ per row: each row's
picks go through the same tile with every other row masked (see :data:`MQ_CSA` for why this is not a union of
the rows' picks and when it pays).

Row groups: program g takes batch rows ``g * ROWS .. g * ROWS + ROWS - 1`` and walks the runs of one request in
them (a group that straddles requests does two or more runs), so the grid is ``ceil(T / ROWS)`` from the shape
alone: no host sync, no data-dependent launch (CUDA graphs capture it). Runs of a request with one row in the
batch are skipped (the single-row kernel takes those: decode rows keep their kernel in every batch; see
:data:`MIN_ROWS`).

Batch invariance, as in the single-row kernel: a row's result depends on its request alone, not on which run
it falls in. Key blocks are aligned to absolute positions (window blocks at multiples of ``BLOCK_N`` of the
position, compressed blocks at multiples of the entry or pick index), so a row meets its keys in the same
blocks at the same offsets whatever run holds it; a block it sees nothing of is an exact no-op of the online
softmax (scores -inf, probabilities 0, rescale by exactly 1). The result differs in rounding from the
single-row kernel's (another cut of the keys into blocks), within the same tolerance of the reference.

Numerics as in the single-row kernel (the same helpers: :func:`~dsv4.ops.attention_triton._key_cols` for bf16 and
FP8 stores, :func:`~dsv4.ops.attention_triton._online_block`, ``_finalize`` and the inverse-rope epilogue): base-2
online softmax in fp32, probabilities rounded to the activation dtype before the PV product, sink at the end.
The window and compressed keys form one online pass (no groups, no split form). Few rows are few programs:
verify at batch 1 is one row group x 8 head/value blocks at the defaults, where the single-row kernel's split
form runs 16 groups per row (benchmarks/kernels.py --only attention_mq times b1 / b8 / b64; if small verify
batches lose, :data:`MIN_ROWS` 5 keeps them on the single-row kernel, or a split form with groups aligned to
absolute key blocks, as batch invariant as the blocks, would give them programs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops import attention_triton as single
from dsv4.ops import pdl
from dsv4.ops.attention_triton import (
    _TL,
    LOG2E,
    _finalize,
    _key_cols,
    _key_entries,
    _key_rows,
    _online_block,
    _request_has_rows,
    _store_rows,
)
from dsv4.ops.kv_fp8 import KV_QUANT_BLOCK, Fp8KV
from dsv4.ops.pdl import enter as pdl_enter

# CSA picks (the default; ``csa_batched`` in a config: all rows' picks in one batched product, see CANDIDATES):
# per row through the shared tile (each row's pick blocks with the other rows masked), not a union.
# A union without deduplication is the same blocks in another order (the same key loads, the same M x keys
# MMA work); deduplication would need a sort of the R rows' picks per group, and saves only where neighbouring
# rows pick the same entries. Per row, a row meets its picks in its own order whatever run holds it (batch
# invariance) with no sort. The window (W of a row's W + top-k keys) is what the rows share; the picks cost R x
# the single-row MMA work (M = R * BLOCK_H tile rows for one row's picks), paid for by the wgmma tile's
# throughput if at all. Unmeasured on a GPU: benchmarks/kernels.py --only attention_mq prints attn_extend_csa /
# attn_verify_csa for both forms; False leaves CSA layers on the single-row kernel.
MQ_CSA = True
# Off by default: measured on an H200 (session 6, benchmarks/kernels.py --only attention_mq, 64k context) the
# multi-query form is slower than the single-row kernel for every shape timed: extend of 1024 rows CSA 9.8 ms
# against 1.05 ms, HCA 2.3 ms against 0.98 ms; verify b256 x 4 rows CSA 2.6 ms against 0.29 ms. The whole-model
# 4096-token prefill took 71 ms with it, 37.7 ms without. Kept (tested, opt-in) for a rework.
ENABLED = False
# FP8 stores stay on the single-row kernel: on an H200 the multi-query kernel hit an illegal memory access with FP8
# stores (tests/gpu/test_kernels_gpu.py, session 6) that the interpreter does not show; bf16 stores passed.
MQ_FP8 = False
# Requests with fewer rows than this in the batch stay on the single-row kernel. 2: every extend and verify
# request takes the multi-query form. Rows of the two forms differ in rounding (another cut of the keys into
# blocks), so a verify row may no longer be bitwise the decode row of the same token; 5 keeps verify rows (k + 1
# <= 4) on the single-row kernel, bitwise as before, and the multi-query form for prefill and extend chunks alone.
MIN_ROWS = 2

# (rows, block_h, block_n, block_d, warps, stages); the first is the default. rows x block_h = 64 (one wgmma
# M tile); block_d 256 keeps the fp32 accumulator at 64 registers a thread with 8 warps. Resources on sm_90
# at V4-Flash shapes (`python tests/test_attention_resources.py --mq`; "loops": the key loops, every one):
#   r4h16n16d256w8s1  bf16 KV CSA / HCA and FP8 KV CSA: 255 regs, no spill in any key loop, 90 KB
#   r2h32n16d256w8s1  the same
#   r4h16n16d256w8s1b csa_batched (CSA picks of the 4 rows as one batched [4, 16, 512] x [4, 512, 16] product,
#                     mma.sync: a quarter of the MMA work of the masked tile): 119 LDL / 45 STL in the picks
#                     loop (bf16 KV), 101 / 54 (FP8 KV), 96 KB
#   r4h16n16d128w8s1b the same in 4 value chunks: 23 LDL in the picks loop, 4 in the window loops (bf16 KV)
# Dropped: r4h16n32d256w8s1 (78-115 LDL in the bf16 KV window loops, 112 KB).
# Two stages spill in every loop (18-65 LDL) for 112 KB: left out. One configuration for every batch and KV
# dtype (batch invariance; untimed on a GPU yet: benchmarks/kernels.py --only attention_mq sweeps these).
CANDIDATES = tuple(dict(rows=r, block_h=bh, block_n=bn, block_d=bd, num_warps=w, num_stages=st) | (
    dict(csa_batched=True) if b else {}) for r, bh, bn, bd, w, st, b in (
        (4, 16, 16, 256, 8, 1, 0), (2, 32, 16, 256, 8, 1, 0), (4, 16, 16, 256, 8, 1, 1), (4, 16, 16, 128, 8, 1, 1)))
DEFAULT = CANDIDATES[0]


def config_name(cfg: dict) -> str:
    return (f"r{cfg['rows']}h{cfg['block_h']}n{cfg['block_n']}d{cfg['block_d']}w{cfg['num_warps']}"
            f"s{cfg['num_stages']}" + ("b" if cfg.get("csa_batched") else ""))


@triton.jit
def _comp_keys(c, cok, slot, comp_ptr, comp_sc_ptr, comp_rope_ptr, pt_ptr, PS, PT_STRIDE, HD: tl.constexpr,
               NOPE: tl.constexpr, RD: tl.constexpr, NSC: tl.constexpr, FP8: tl.constexpr):
    """Stored rows of compressed entries c [BN] (visible where cok): :func:`_key_rows`'s outputs for them."""
    zero = c * 0
    # _key_rows' window arguments are unused for entries (j >= W marks them compressed): W = 1, j = 1
    # (the window pointers, never read here, take the entries' own: kv and rope rows are activation-dtype ones)
    return _key_rows(zero + 1, c, cok, zero, zero, zero, slot, comp_rope_ptr, comp_ptr, comp_sc_ptr, comp_rope_ptr,
                     comp_ptr, comp_sc_ptr, comp_rope_ptr, pt_ptr, 1, 1, PS, PT_STRIDE, HD, NOPE, RD, NSC, True, FP8)


@triton.jit
def _kv_tiles(ok, own, own_p, nope_p, sc_p, rope_p, D0, HD: tl.constexpr, HD_P: tl.constexpr, NOPE: tl.constexpr,
              RD: tl.constexpr, NSC: tl.constexpr, QB: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr,
              DT: tl.constexpr, HAS_OWN: tl.constexpr):
    """A key block located by _key_rows: the whole-width key tile and this program's value columns."""
    kt = _key_cols(ok, own, own_p, nope_p, sc_p, rope_p, 0, HD, NOPE, RD, NSC, HD_P, QB, FP8, DT, HAS_OWN)
    if BLOCK_D == HD_P:
        vt = kt
    else:  # this program's value columns, again (an L1 hit), as the single-row kernel does
        vt = _key_cols(ok, own, own_p, nope_p, sc_p, rope_p, D0, HD, NOPE, RD, NSC, BLOCK_D, QB, FP8, DT, HAS_OWN)
    return kt, vt


@triton.jit
def _online_block3(q3, k3, v3, ok3, m_i, l_i, acc, qk_scale, DT: tl.constexpr, PREC: tl.constexpr):
    """:func:`_online_block` for ROWS independent rows at once (CSA picks, ``csa_batched``): q3 [R, BH, HD_P],
    k3 [R, BN, HD_P] (row r's own keys), v3 [R, BN, BLOCK_D], ok3 [R, 1, BN]; the same arithmetic."""
    s = tl.dot(q3, tl.permute(k3, (0, 2, 1)), input_precision=PREC) * qk_scale
    s = tl.where(ok3, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=2))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, :, None])
    l_i = l_i * alpha + tl.sum(p, axis=2)
    acc = acc * alpha[:, :, None] + tl.dot(p.to(DT), v3, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["PICK_STRIDE", "PICK_W", "T", "HEADS_FIRST", "MIN_ROWS"])
def _mq_kernel(
    q_ptr, kv_ptr, ring_ptr, ring_sc_ptr, ring_rope_ptr, comp_ptr, comp_sc_ptr, comp_rope_ptr, pt_ptr, picks_ptr,
    slot_ptr, p0_ptr, pos_ptr, sink_ptr, cos_ptr, sin_ptr, out_ptr,
    T, H, W, RING, PS, PT_STRIDE, PICK_STRIDE, PICK_W, RATIO, qk_scale, HEADS_FIRST, MIN_ROWS,
    HD: tl.constexpr, HD_P: tl.constexpr, ROPE_HALF: tl.constexpr, NOPE: tl.constexpr, NSC: tl.constexpr,
    QB: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_COMP: tl.constexpr, IS_CSA: tl.constexpr, FP8: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    CSA_BATCHED: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    hd_blk, g = tl.program_id(0), tl.program_id(1)
    if HEADS_FIRST == 0:
        hd_blk, g = tl.program_id(1), tl.program_id(0)
    hb = hd_blk // (HD_P // BLOCK_D)
    D0 = (hd_blk % (HD_P // BLOCK_D)) * BLOCK_D
    M: tl.constexpr = ROWS * BLOCK_H
    RD: tl.constexpr = 2 * ROPE_HALF
    ri = tl.arange(0, M) // BLOCK_H  # tile row -> row of the run
    heads = hb * BLOCK_H + tl.arange(0, M) % BLOCK_H
    hmask = heads < H
    d = tl.arange(0, HD_P)
    dv = D0 + tl.arange(0, BLOCK_D)
    ar = tl.arange(0, BLOCK_N)
    g_lo = g.to(tl.int64) * ROWS
    grows = g_lo + tl.arange(0, ROWS)
    gslot = tl.load(slot_ptr + grows, mask=grows < T, other=-1)
    sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0) * 1.4426950408889634
    for it in range(0, ROWS):
        r0 = g_lo + it
        live = r0 < T
        s = tl.load(slot_ptr + r0, mask=live, other=-1)
        prev = tl.load(slot_ptr + r0 - 1, mask=live & (r0 > 0), other=-1)
        p0 = tl.load(p0_ptr + r0, mask=live, other=0).to(tl.int64)
        pf = tl.load(pos_ptr + r0, mask=live, other=0).to(tl.int64)  # run row i: position pf + i, batch row r0 + i
        # a run starts here (first row of the group or of a request) and its request has MIN_ROWS rows or more
        if live & ((it == 0) | (prev != s)) & _request_has_rows(r0, s, pf, p0, slot_ptr, T, MIN_ROWS):
            n = tl.sum(((grows >= r0) & (gslot == s)).to(tl.int32), axis=0)  # the run's rows (consecutive)
            slot = s.to(tl.int64)
            pl = pf + n - 1
            rv = ri < n
            trow = r0 + ri  # [M] its batch row
            q = tl.load(q_ptr + (trow[:, None] * H + heads[:, None]) * HD + d[None, :],
                        mask=(rv & hmask)[:, None] & (d < HD)[None, :], other=0.0).to(DT)
            m = tl.full([M], float("-inf"), tl.float32)
            l = tl.zeros([M], tl.float32)
            acc = tl.zeros([M, BLOCK_D], tl.float32)
            # window: positions pf - W + 1 .. pl in blocks aligned to multiples of BLOCK_N, in two loops: the
            # stored keys (ring rows, positions < p0), then this batch's own (kv rows, >= p0), so neither loop
            # holds the other's tiles (FP8: the dequantised ring tile and the activation-dtype own tile; one
            # loop spills on sm_90). A block across p0 is visited by both, each masked to its part. _key_rows
            # sees a window of W + n - 1 ending at pl (virtual index j = k - (pf - W + 1)).
            k_first = pf - W + 1
            for part in tl.static_range(2):
                lo = tl.maximum(k_first, 0) if part == 0 else tl.maximum(k_first, p0)
                hi = tl.minimum(pl + 1, p0) if part == 0 else pl + 1
                for k0 in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
                    k = k0 + ar
                    j = k - k_first
                    ok, own, own_p, nope_p, sc_p, rope_p = _key_rows(
                        j, j, j < 0, r0 + n - 1, pl, p0, slot, kv_ptr, ring_ptr, ring_sc_ptr, ring_rope_ptr,
                        comp_ptr, comp_sc_ptr, comp_rope_ptr, pt_ptr, W + n - 1, RING, PS, PT_STRIDE, HD, NOPE, RD,
                        NSC, False, FP8)
                    ok = ok & (k >= lo) & (k < hi)
                    # row i (position pf + i) sees k - pf in (i - W, i]: int32 offsets for the [M, BN] compares
                    kr = (k - pf).to(tl.int32)
                    vis = ok[None, :] & (kr[None, :] > ri[:, None] - W) & (kr[None, :] <= ri[:, None])
                    if part == 0:
                        kt, vt = _kv_tiles(ok, own & ok, own_p, nope_p, sc_p, rope_p, D0, HD, HD_P, NOPE, RD, NSC, QB,
                                           BLOCK_D, FP8, DT, False)
                    else:  # plain activation-dtype rows whatever the store
                        kt, vt = _kv_tiles(ok, ok, own_p, own_p, own_p, own_p, D0, HD, HD_P, NOPE, RD, NSC, QB,
                                           BLOCK_D, False, DT, False)
                    m, l, acc = _online_block(q, kt, vt, vis, m, l, acc, qk_scale, DT, PREC)
            # compressed keys: the next block's pick -> page -> row chain resolves while this block's keys load
            # and multiply (one step ahead; the single-row kernel's picks two steps ahead spill here: sm_90,
            # 46 LDL / 22 STL in the CSA loop at the default)
            if HAS_COMP:
                if IS_CSA and CSA_BATCHED:  # every row's picks c0 .. c0 + BLOCK_N - 1 at once, a batched product
                    RB: tl.constexpr = ROWS * BLOCK_N
                    rb = tl.arange(0, RB) // BLOCK_N  # key -> its row in the run
                    cb = tl.arange(0, RB) % BLOCK_N
                    nc = tl.where(rb < n, tl.minimum((pf + rb + 1) // RATIO, PICK_W), 0)
                    q3 = tl.reshape(q, [ROWS, BLOCK_H, HD_P])
                    m3 = tl.reshape(m, [ROWS, BLOCK_H])
                    l3 = tl.reshape(l, [ROWS, BLOCK_H])
                    acc3 = tl.reshape(acc, [ROWS, BLOCK_H, BLOCK_D])
                    for c0 in range(0, tl.minimum((pl + 1) // RATIO, PICK_W), BLOCK_N):
                        c = c0 + cb
                        cok = c < nc
                        e = tl.load(picks_ptr + (r0 + rb) * PICK_STRIDE + c, mask=cok, other=-1).to(tl.int64)
                        cok = cok & (e >= 0)
                        ok, own, own_p, nope_p, sc_p, rope_p = _comp_keys(
                            tl.maximum(e, 0), cok, slot, comp_ptr, comp_sc_ptr, comp_rope_ptr, pt_ptr, PS, PT_STRIDE,
                            HD, NOPE, RD, NSC, FP8)
                        kt, vt = _kv_tiles(ok, own, own_p, nope_p, sc_p, rope_p, D0, HD, HD_P, NOPE, RD, NSC, QB,
                                           BLOCK_D, FP8, DT, False)
                        m3, l3, acc3 = _online_block3(q3, tl.reshape(kt, [ROWS, BLOCK_N, HD_P]),
                                                      tl.reshape(vt, [ROWS, BLOCK_N, BLOCK_D]),
                                                      tl.reshape(ok, [ROWS, 1, BLOCK_N]), m3, l3, acc3, qk_scale, DT,
                                                      PREC)
                    m = tl.reshape(m3, [M])
                    l = tl.reshape(l3, [M])
                    acc = tl.reshape(acc3, [M, BLOCK_D])
                elif IS_CSA:  # each row's own picks, the other rows masked
                    for i in range(0, n):
                        t = r0 + i
                        n_comp = tl.minimum((pf + i + 1) // RATIO, PICK_W)
                        e, cok = _key_entries(W + ar, t, n_comp, picks_ptr, W, PICK_STRIDE, True, True)
                        ok, own, own_p, nope_p, sc_p, rope_p = _comp_keys(
                            e, cok, slot, comp_ptr, comp_sc_ptr, comp_rope_ptr, pt_ptr, PS, PT_STRIDE, HD, NOPE, RD,
                            NSC, FP8)
                        for c0 in range(0, n_comp, BLOCK_N):
                            kt, vt = _kv_tiles(ok, own, own_p, nope_p, sc_p, rope_p, D0, HD, HD_P, NOPE, RD, NSC, QB,
                                               BLOCK_D, FP8, DT, False)
                            vis = (ri == i)[:, None] & ok[None, :]  # an entry's ok is its pick's
                            e, cok = _key_entries(W + c0 + BLOCK_N + ar, t, n_comp, picks_ptr, W, PICK_STRIDE, True,
                                                  True)
                            ok, own, own_p, nope_p, sc_p, rope_p = _comp_keys(
                                e, cok, slot, comp_ptr, comp_sc_ptr, comp_rope_ptr, pt_ptr, PS, PT_STRIDE, HD, NOPE,
                                RD, NSC, FP8)
                            m, l, acc = _online_block(q, kt, vt, vis, m, l, acc, qk_scale, DT, PREC)
                else:  # HCA: every entry closed by the run's last row, each row masked to its own
                    n_comp = (pl + 1) // RATIO
                    n_vis = ((pf + ri + 1) // RATIO).to(tl.int32)  # [M] each tile row's visible entries
                    c = ar.to(tl.int64)
                    ok, own, own_p, nope_p, sc_p, rope_p = _comp_keys(
                        c, c < n_comp, slot, comp_ptr, comp_sc_ptr, comp_rope_ptr, pt_ptr, PS, PT_STRIDE, HD, NOPE,
                        RD, NSC, FP8)
                    for c0 in range(0, n_comp, BLOCK_N):
                        kt, vt = _kv_tiles(ok, own, own_p, nope_p, sc_p, rope_p, D0, HD, HD_P, NOPE, RD, NSC, QB,
                                           BLOCK_D, FP8, DT, False)
                        vis = ok[None, :] & (c.to(tl.int32)[None, :] < n_vis[:, None])
                        c = c0 + BLOCK_N + ar.to(tl.int64)
                        ok, own, own_p, nope_p, sc_p, rope_p = _comp_keys(
                            c, c < n_comp, slot, comp_ptr, comp_sc_ptr, comp_rope_ptr, pt_ptr, PS, PT_STRIDE, HD,
                            NOPE, RD, NSC, FP8)
                        m, l, acc = _online_block(q, kt, vt, vis, m, l, acc, qk_scale, DT, PREC)
            _store_rows(out_ptr, (trow[:, None] * H + heads[:, None]) * HD + dv[None, :],
                        (rv & hmask)[:, None] & (dv < HD)[None, :], _finalize(m, l, acc, sink), cos_ptr, sin_ptr,
                        tl.where(rv, trow, r0)[:, None], D0, HD, M, BLOCK_D, ROPE_HALF, DT)


def multi_query_attention(
    q: torch.Tensor, kv: torch.Tensor, ring: torch.Tensor | Fp8KV, comp: torch.Tensor | Fp8KV | None,
    page_table: torch.Tensor | None, picks: torch.Tensor | None, slot: torch.Tensor, p0: torch.Tensor,
    pos: torch.Tensor, sink: torch.Tensor, scale: float, window: int, ratio: int, cos: torch.Tensor,
    sin: torch.Tensor, out: torch.Tensor | None = None, config: dict | None = None, min_rows: int = 2,
) -> torch.Tensor:
    """The multi-query kernel over the rows of the batch's requests with at least ``min_rows`` rows (>= 2),
    written into ``out`` (new when None; the other requests' rows are left as they are). Same arguments as the reference; a request's
    rows are consecutive, at positions p0, p0 + 1, ... (the reference's contract too). ``config``: a
    :data:`CANDIDATES` entry's keys, overriding :data:`DEFAULT`."""
    t, h, hd = q.shape
    out = torch.empty_like(q) if out is None else out
    if t == 0:
        return out
    cfg = DEFAULT | (config or {})
    fp8 = isinstance(ring, Fp8KV)
    num_stages = 1 if q.dtype == torch.float32 else cfg["num_stages"]  # fp32 tiles: shared memory (see single)
    (q, kv, cos, sin, sink, ring_p, comp_p, pt, pk, has_comp, is_csa, rope_half, nope,
     hd_p) = single.operands(q, kv, ring, comp, page_table, picks, slot, sink, cos, sin)
    block_d = min(max(cfg["block_d"], KV_QUANT_BLOCK if fp8 else 1), hd_p)
    rows, block_h = cfg["rows"], cfg["block_h"]
    grid, heads_first = single._grid(triton.cdiv(t, rows), triton.cdiv(h, block_h) * (hd_p // block_d))
    _mq_kernel[grid](
        q, kv, *ring_p, *comp_p, pt, pk, slot, p0, pos, sink, cos, sin, out,
        t, h, window, ring.shape[1], comp.shape[1] if has_comp else 1, pt.stride(0) if has_comp else 0,
        pk.stride(0) if is_csa else 0, pk.shape[1] if is_csa else 0, ratio, scale * LOG2E, heads_first, min_rows,
        HD=hd, HD_P=hd_p, ROPE_HALF=rope_half, NOPE=nope, NSC=triton.cdiv(nope, KV_QUANT_BLOCK), QB=KV_QUANT_BLOCK,
        ROWS=rows, BLOCK_H=block_h, BLOCK_N=cfg["block_n"], BLOCK_D=block_d, HAS_COMP=has_comp, IS_CSA=is_csa,
        FP8=fp8, DT=_TL[q.dtype], PREC="ieee" if q.dtype == torch.float32 else "tf32",
        CSA_BATCHED=bool(cfg.get("csa_batched", False)), num_warps=cfg["num_warps"], num_stages=num_stages,
        **pdl.launch(q.device),
    )
    return out


def paged_sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, ring: torch.Tensor | Fp8KV, comp: torch.Tensor | Fp8KV | None,
    page_table: torch.Tensor | None, picks: torch.Tensor | None, slot: torch.Tensor, p0: torch.Tensor,
    pos: torch.Tensor, sink: torch.Tensor, scale: float, window: int, ratio: int, cos: torch.Tensor,
    sin: torch.Tensor, rows_per_request: tuple[int, int] | None = None, config: dict | None = None,
    mq_config: dict | None = None,
) -> torch.Tensor:
    """Kernel entry for :func:`dsv4.ops.attention.paged_sparse_attention`: rows of requests with fewer than
    :data:`MIN_ROWS` rows in the batch (decode) go to the single-row kernel, the others (extend, verify) to the
    multi-query kernel. ``rows_per_request``: the fewest and the most rows any request has in the batch (host
    knowledge, so no sync): None (unknown) or a most below MIN_ROWS runs the single-row kernel alone, a fewest
    of MIN_ROWS or more the multi-query kernel alone, else both (each skipping the other's rows); a row's form
    depends on its own request's row count only. ``config`` / ``mq_config`` override the two kernels' defaults
    (benchmarks and tests)."""
    lo, hi = rows_per_request or (1, 1)
    if (not ENABLED or hi < MIN_ROWS or (picks is not None and not MQ_CSA)
            or (isinstance(ring, Fp8KV) and not MQ_FP8)):
        return single.paged_sparse_attention(q, kv, ring, comp, page_table, picks, slot, p0, pos, sink, scale,
                                             window, ratio, cos, sin, config=config)
    args = (q, kv, ring, comp, page_table, picks, slot, p0, pos, sink, scale, window, ratio, cos, sin)
    out = single.paged_sparse_attention(*args, config=config, skip_rows=MIN_ROWS) if lo < MIN_ROWS else None
    return multi_query_attention(*args, out=out, config=mq_config, min_rows=MIN_ROWS)
