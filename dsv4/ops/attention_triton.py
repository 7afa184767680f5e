"""Triton sparse attention over the window ring and the paged compressed entries (reference:
:func:`dsv4.ops.attention.paged_sparse_attention`).

One program takes ``BLOCK_H`` heads of one query row (one token: decode, extend and verify rows alike). A row's
candidate keys form one virtual sequence: its window (index ``j < W``: position ``pos - W + 1 + j``; those of this
batch are read from the batch's own ``kv`` rows, older ones from the ring), then its compressed entries (index
``W + c``: CSA the indexer's pick ``picks[t, c]``, HCA entry ``c``, for ``c < (pos + 1) // ratio``), whose pool
rows are looked up in the page table inside the kernel. Nothing is prepared on the host: no syncs, no shapes
that depend on the data, so a decode step can be captured in a CUDA graph.

Batch invariance: a row's result is bitwise the same whatever else is in the batch. The virtual sequence is cut
into groups of keys whose size depends only on the row's own key count (at most ``groups`` groups of at least
``min_group_blocks`` blocks). Each group is reduced from a fresh state by an online softmax over blocks of
``BLOCK_N`` keys, and the row's result is the left fold of its group states in order (:func:`_merge`), then the
sink and the normalisation (:func:`_finalize`). Two forms compute exactly that: no-split (one program folds all
groups; for many rows) and split (one program per group writes the group's state; :func:`_combine_kernel` folds
them; for few rows). Both run the same compiled kernel (``SPLIT`` is a runtime argument, not specialised), and
the fold and epilogue arithmetic is written with explicit ``fma`` so the compiler cannot contract it differently
in the two kernels. Block sizes, warps and group sizes are fixed per head count, never per batch.

Numerics: online softmax in base 2 with fp32 statistics and accumulators; the (unnormalised) probabilities are
rounded to the activation dtype before the PV product, as the official kernel does (the reference rounds the
normalised ones: in bf16 the two differ by ~3e-3 norm-wise, in fp32 by ~1e-6); the per-head sink (a raw logit)
joins the denominator at the end. The single K=V head is loaded once per block and used for both products.
FP8 stores (:class:`~dsv4.ops.kv_fp8.Fp8KV`) are dequantised on load: e4m3 x 2^k is exact in bf16/fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.kv_fp8 import KV_QUANT_BLOCK, Fp8KV

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
LOG2E = 1.4426950408889634
# Split-K for up to 32 rows, no-split above (docs/benchmarks.md, 2026-11-24, H100: split wins at 1 and 8 rows,
# loses at 64). Either form gives bitwise the same rows, so this choice only moves time.
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
def _load_keys(j, t64, pos, p0, slot, n_comp, kv_ptr, ring_ptr, ring_sc_ptr, ring_rope_ptr, comp_ptr, comp_sc_ptr,
               comp_rope_ptr, pt_ptr, picks_ptr, W, R, PS, PT_STRIDE, PICK_STRIDE, d,
               HD: tl.constexpr, NOPE: tl.constexpr, RD: tl.constexpr, NSC: tl.constexpr, HAS_COMP: tl.constexpr,
               IS_CSA: tl.constexpr, FP8: tl.constexpr):
    """Keys of virtual indices j [BN] -> (kt [BN, HD_P], 0 where not visible; visible [BN])."""
    is_win = j < W
    k = pos - W + 1 + j
    kc = tl.maximum(k, 0)
    own = is_win & (k >= p0)  # this batch's key: row t - pos + k of kv
    ok = is_win & (k >= 0)
    row = slot * R + kc % R  # flat ring row
    if HAS_COMP:
        c = j - W
        cok = (~is_win) & (c < n_comp)
        if IS_CSA:
            e = tl.load(picks_ptr + t64 * PICK_STRIDE + c, mask=cok, other=-1)
            cok = cok & (e >= 0)
            e = tl.maximum(e, 0)
        else:
            e = tl.maximum(c, 0)
        e = e.to(tl.int64)
        # int64 whatever the page table's and picks' dtypes: pool row x row width passes 2^31 in a large pool
        page = tl.load(pt_ptr + slot * PT_STRIDE + e // PS, mask=cok, other=0).to(tl.int64)
        crow = page * PS + e % PS  # flat pool row
        ok = ok | cok
    own_row = (t64 - pos + kc) * HD
    dm = (d < HD)[None, :]
    if FP8:
        if HAS_COMP:
            nope_p = tl.where(is_win, ring_ptr + row * NOPE, comp_ptr + crow * NOPE)
            sc_p = tl.where(is_win, ring_sc_ptr + row * NSC, comp_sc_ptr + crow * NSC)
            rope_p = tl.where(is_win, ring_rope_ptr + row * RD, comp_rope_ptr + crow * RD)
        else:
            nope_p = ring_ptr + row * NOPE
            sc_p = ring_sc_ptr + row * NSC
            rope_p = ring_rope_ptr + row * RD
        stored = (ok & ~own)[:, None] & (d < NOPE)[None, :]
        # activation-dtype values: a whole row of this batch's kv, or the rope dims of a stored row
        act_p = tl.where(own[:, None], kv_ptr + own_row[:, None] + d[None, :], rope_p[:, None] + (d - NOPE)[None, :])
        act = tl.load(act_p, mask=ok[:, None] & dm & (own[:, None] | (d >= NOPE)[None, :]), other=0.0)
        f8 = tl.load(nope_p[:, None] + d[None, :], mask=stored, other=0.0)
        sc = tl.load(sc_p[:, None] + (d // 64)[None, :], mask=stored, other=127)
        scf = (sc.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # e8m0 byte -> 2^(byte - 127), exact
        kt = tl.where(stored, f8.to(tl.float32) * scf, act.to(tl.float32))
    else:
        if HAS_COMP:
            cache_p = tl.where(is_win, ring_ptr + row * HD, comp_ptr + crow * HD)
        else:
            cache_p = ring_ptr + row * HD
        ptrs = tl.where(own, kv_ptr + own_row, cache_p)
        kt = tl.load(ptrs[:, None] + d[None, :], mask=ok[:, None] & dm, other=0.0)
    return kt, ok


@triton.jit
def _online_block(q, kt, ok, m_i, l_i, acc, qk_scale, DT: tl.constexpr, PREC: tl.constexpr):
    """One block of keys kt [BN, HD_P] (0 where not ok) into the running softmax of q [BH, HD_P]."""
    kt = kt.to(DT)
    s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # a row with nothing visible yet keeps max -inf: shift by 0 so exp2 gives 0, not NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DT), kt, input_precision=PREC)
    return m_new, l_i, acc


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
def _store_rows(out_ptr, offs, mask, o, cos_ptr, sin_ptr, t, HD: tl.constexpr, ROWS: tl.constexpr,
                HD_P: tl.constexpr, ROPE_HALF: tl.constexpr, DT: tl.constexpr):
    """Round o [ROWS, HD_P] fp32 to DT, rotate its trailing pairs by the conjugate rope at row t, round
    again, store at out_ptr + offs (offs, mask [ROWS, HD_P]: contiguous along the last dim)."""
    o = o.to(DT).to(tl.float32)
    e, od = tl.split(tl.reshape(o, [ROWS, HD_P // 2, 2]))
    i = tl.arange(0, HD_P // 2)
    j = i - (HD // 2 - ROPE_HALF)
    is_rope = (j >= 0) & (i < HD // 2)
    c = tl.load(cos_ptr + t * ROPE_HALF + j, mask=is_rope, other=1.0)[None, :]
    s = tl.load(sin_ptr + t * ROPE_HALF + j, mask=is_rope, other=0.0)[None, :]
    r = tl.reshape(tl.join(tl.fma(e, c, od * s), tl.fma(od, c, -(e * s))), [ROWS, HD_P])
    tl.store(out_ptr + offs, r.to(DT), mask=mask)


@triton.jit(do_not_specialize=["PICK_STRIDE", "PICK_W", "SPLIT", "G_STRIDE", "HEADS_FIRST"])
def _attn_kernel(
    q_ptr, kv_ptr, ring_ptr, ring_sc_ptr, ring_rope_ptr, comp_ptr, comp_sc_ptr, comp_rope_ptr, pt_ptr, picks_ptr,
    slot_ptr, p0_ptr, pos_ptr, sink_ptr, cos_ptr, sin_ptr, out_ptr, acc_ptr, ml_ptr,
    H, W, R, PS, PT_STRIDE, PICK_STRIDE, PICK_W, RATIO, SPLIT, G_STRIDE, qk_scale, HEADS_FIRST,
    HD: tl.constexpr, HD_P: tl.constexpr, ROPE_HALF: tl.constexpr, NOPE: tl.constexpr, NSC: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, MAX_GROUPS: tl.constexpr, MIN_GROUP_BLOCKS: tl.constexpr,
    HAS_COMP: tl.constexpr, IS_CSA: tl.constexpr, FP8: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    t, hb, gp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if HEADS_FIRST:  # see _grid: the head blocks of one row are neighbouring programs
        t, hb = tl.program_id(1), tl.program_id(0)
    t64 = t.to(tl.int64)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    d = tl.arange(0, HD_P)
    dmask = d < HD
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
    if g_lo < g_hi:
        q = tl.load(q_ptr + (t64 * H + heads[:, None]) * HD + d[None, :], mask=hmask[:, None] & dmask[None, :],
                    other=0.0).to(DT)
        m_s = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_s = tl.zeros([BLOCK_H], tl.float32)
        acc_s = tl.zeros([BLOCK_H, HD_P], tl.float32)
        m_g = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_g = tl.zeros([BLOCK_H], tl.float32)
        acc_g = tl.zeros([BLOCK_H, HD_P], tl.float32)
        for g in range(g_lo, g_hi):
            m_g = tl.full([BLOCK_H], float("-inf"), tl.float32)
            l_g = tl.zeros([BLOCK_H], tl.float32)
            acc_g = tl.zeros([BLOCK_H, HD_P], tl.float32)
            for j0 in range(g * gb * BLOCK_N, tl.minimum((g + 1) * gb * BLOCK_N, n_virt), BLOCK_N):
                kt, ok = _load_keys(j0 + tl.arange(0, BLOCK_N), t64, pos, p0, slot, n_comp, kv_ptr, ring_ptr,
                                    ring_sc_ptr, ring_rope_ptr, comp_ptr, comp_sc_ptr, comp_rope_ptr, pt_ptr,
                                    picks_ptr, W, R, PS, PT_STRIDE, PICK_STRIDE, d, HD, NOPE, 2 * ROPE_HALF, NSC,
                                    HAS_COMP, IS_CSA, FP8)
                m_g, l_g, acc_g = _online_block(q, kt, ok, m_g, l_g, acc_g, qk_scale, DT, PREC)
            m_s, l_s, acc_s = _merge(m_s, l_s, acc_s, m_g, l_g, acc_g)
        if SPLIT:
            part = (t64 * G_STRIDE + g_lo) * H + heads
            tl.store(acc_ptr + part[:, None] * HD + d[None, :], acc_g, mask=hmask[:, None] & dmask[None, :])
            tl.store(ml_ptr + part * 2, m_g, mask=hmask)
            tl.store(ml_ptr + part * 2 + 1, l_g, mask=hmask)
        else:
            sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0) * 1.4426950408889634
            _store_rows(out_ptr, (t64 * H + heads[:, None]) * HD + d[None, :], hmask[:, None] & dmask[None, :],
                        _finalize(m_s, l_s, acc_s, sink), cos_ptr, sin_ptr, t, HD, BLOCK_H, HD_P, ROPE_HALF, DT)


@triton.jit(do_not_specialize=["PICK_W", "G_STRIDE", "HEADS_FIRST"])
def _combine_kernel(acc_ptr, ml_ptr, pos_ptr, sink_ptr, cos_ptr, sin_ptr, out_ptr, H, W, RATIO, PICK_W, G_STRIDE,
                    HEADS_FIRST,
                    HD: tl.constexpr, HD_P: tl.constexpr, ROPE_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_N: tl.constexpr, MAX_GROUPS: tl.constexpr, MIN_GROUP_BLOCKS: tl.constexpr,
                    HAS_COMP: tl.constexpr, IS_CSA: tl.constexpr, DT: tl.constexpr):
    """Fold the split programs' group states of one row, in group order, then the same epilogue."""
    t, hb = tl.program_id(0), tl.program_id(1)
    if HEADS_FIRST:
        t, hb = tl.program_id(1), tl.program_id(0)
    t64 = t.to(tl.int64)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    d = tl.arange(0, HD_P)
    mask = hmask[:, None] & (d < HD)[None, :]
    pos = tl.load(pos_ptr + t).to(tl.int64)
    _, _, _, n_groups = _row_span(pos, W, RATIO, PICK_W, HAS_COMP, IS_CSA, BLOCK_N, MAX_GROUPS, MIN_GROUP_BLOCKS)
    m_s = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_s = tl.zeros([BLOCK_H], tl.float32)
    acc_s = tl.zeros([BLOCK_H, HD_P], tl.float32)
    for g in range(0, n_groups):
        part = (t64 * G_STRIDE + g) * H + heads
        m_g = tl.load(ml_ptr + part * 2, mask=hmask, other=float("-inf"))
        l_g = tl.load(ml_ptr + part * 2 + 1, mask=hmask, other=0.0)
        acc_g = tl.load(acc_ptr + part[:, None] * HD + d[None, :], mask=mask, other=0.0)
        m_s, l_s, acc_s = _merge(m_s, l_s, acc_s, m_g, l_g, acc_g)
    sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0) * 1.4426950408889634
    _store_rows(out_ptr, (t64 * H + heads[:, None]) * HD + d[None, :], mask, _finalize(m_s, l_s, acc_s, sink),
                cos_ptr, sin_ptr, t, HD, BLOCK_H, HD_P, ROPE_HALF, DT)


# The configurations benchmarks/kernels.py times and tests/gpu checks (each with split and no-split). Two
# accumulators of [block_h, 512] fp32 live in registers (the running fold and the current group): 16 heads per
# 4 warps or 32 per 8 warps keep them at 64 registers per thread each. (The former h64n64w8s2T asked for 64 x 512
# fp32 accumulators and two 64 x 512 bf16 key stages per program: beyond the registers and shared memory of an
# SM, it failed on the H100.)
CANDIDATES = tuple(
    dict(block_h=bh, block_n=bn, num_warps=w, num_stages=st, groups=g, min_group_blocks=mg)
    for bh, bn, w, st, g, mg in ((16, 32, 4, 2, 16, 2), (16, 32, 4, 3, 16, 2), (16, 64, 4, 2, 16, 1),
                                 (32, 32, 8, 2, 16, 2), (32, 64, 8, 2, 16, 1), (16, 32, 4, 2, 32, 1))
)


def config_name(cfg: dict) -> str:
    return (f"h{cfg['block_h']}n{cfg['block_n']}w{cfg['num_warps']}s{cfg['num_stages']}"
            f"g{cfg['groups']}m{cfg['min_group_blocks']}")


def default_config(t: int, h: int, hd: int, device: torch.device) -> dict:
    """Block sizes, group shape and the split decision for ``t`` query rows.

    Everything but ``split`` is fixed whatever ``t`` (batch invariance: the rows' reduction order must not depend
    on the batch). block_h: heads per program (>= 16: the smallest dot tile); block_n: keys per step; groups /
    min_group_blocks: a row's keys are cut into at most ``groups`` groups of at least ``min_group_blocks`` blocks;
    split: one program per group plus the combine kernel.
    """
    return dict(CANDIDATES[0], split=t <= SPLIT_MAX_ROWS)


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


def paged_sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, ring: torch.Tensor | Fp8KV, comp: torch.Tensor | Fp8KV | None,
    page_table: torch.Tensor | None, picks: torch.Tensor | None, slot: torch.Tensor, p0: torch.Tensor,
    pos: torch.Tensor, sink: torch.Tensor, scale: float, window: int, ratio: int, cos: torch.Tensor,
    sin: torch.Tensor, config: dict | None = None,
) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.attention.paged_sparse_attention` (same arguments; ``config`` overrides
    :func:`default_config`, for benchmarks and tests). No host syncs; launch shapes depend only on tensor shapes."""
    t, h, hd = q.shape
    out = torch.empty_like(q)
    if t == 0:
        return out
    cfg = default_config(t, h, hd, q.device) | (config or {})
    block_h, block_n, groups = cfg["block_h"], cfg["block_n"], cfg["groups"]
    fp8 = isinstance(ring, Fp8KV)
    has_comp, is_csa = comp is not None, picks is not None
    if has_comp and isinstance(comp, Fp8KV) != fp8:
        raise ValueError("ring and comp must both be FP8 stores or both plain tensors")
    q = q.contiguous()
    kv = kv.to(ring.dtype).contiguous()  # this batch's keys as the store will hold them
    cos, sin, sink = cos.float().contiguous(), sin.float().contiguous(), sink.float().contiguous()
    rope_half = cos.shape[-1]
    nope = hd - 2 * rope_half
    ring_p = _parts(ring)
    comp_p = _parts(comp) if has_comp else ring_p
    pt = page_table if has_comp else slot
    pk = picks.contiguous() if is_csa else slot
    hb = triton.cdiv(h, block_h)
    split = bool(cfg["split"])
    ps = comp.shape[1] if has_comp else 1
    # the most groups any row can have, from shapes alone: its keys are at most the window plus the pick width
    # (CSA) or every entry the page table can address (HCA)
    max_keys = window + (pk.shape[1] if is_csa else page_table.shape[1] * ps if has_comp else 0)
    n_prog = min(groups, triton.cdiv(triton.cdiv(max_keys, block_n), cfg["min_group_blocks"])) if split else 1
    acc = torch.empty((t, n_prog, h, hd) if split else (1,), dtype=torch.float32, device=q.device)
    ml = torch.empty((t, n_prog, h, 2) if split else (1,), dtype=torch.float32, device=q.device)
    dt = _TL[q.dtype]
    hd_p = triton.next_power_of_2(hd)
    meta = dict(HD=hd, HD_P=hd_p, ROPE_HALF=rope_half, BLOCK_N=block_n, MAX_GROUPS=groups,
                MIN_GROUP_BLOCKS=cfg["min_group_blocks"], HAS_COMP=has_comp, IS_CSA=is_csa, DT=dt)
    grid, heads_first = _grid(t, hb, n_prog)
    _attn_kernel[grid](
        q, kv, *ring_p, *comp_p, pt, pk, slot, p0, pos, sink, cos, sin, out, acc, ml,
        h, window, ring.shape[1], ps, pt.stride(0) if has_comp else 0, pk.stride(0) if is_csa else 0,
        pk.shape[1] if is_csa else 0, ratio, int(split), n_prog, scale * LOG2E, heads_first,
        NOPE=nope, NSC=triton.cdiv(nope, KV_QUANT_BLOCK), BLOCK_H=block_h, FP8=fp8,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **meta,
    )
    if split:
        grid, heads_first = _grid(t, triton.cdiv(h, 16))
        _combine_kernel[grid](acc, ml, pos, sink, cos, sin, out, h, window, ratio, pk.shape[1] if is_csa else 0,
                              n_prog, heads_first, BLOCK_H=16, **meta)
    return out
