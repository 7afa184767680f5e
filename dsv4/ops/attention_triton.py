"""Triton sparse attention over the window ring and the paged compressed entries (reference:
:func:`dsv4.ops.attention.paged_sparse_attention`).

One program takes ``BLOCK_H`` heads of one query row (one token: decode, extend and verify rows alike) and
walks that row's candidate keys in blocks of ``BLOCK_N``: first its window (positions ``pos - W + 1 .. pos``;
those of this batch are read from the batch's own ``kv`` rows, older ones from the ring), then its
compressed entries (CSA: the indexer's picks; HCA: entries ``0 .. (pos + 1) // ratio - 1``), whose pool rows
:func:`comp_rows` resolves through the page table before the launch (one dependent load less per key block).
The single K=V head is loaded once per block and used for both products (K = V). Online softmax in base 2
with fp32 statistics and accumulator; the (unnormalised) probabilities are rounded to the activation dtype
before the PV product, as the official kernel does (the reference rounds the normalised ones: in bf16 the two
differ by ~3e-3 norm-wise, one or two bf16 steps at worst; in fp32 by ~1e-6); the per-head sink (a raw logit)
joins the denominator at the end.

Two forms: no-split (the epilogue normalises, rounds, applies the conjugate rope to the trailing dims at the
query position and stores) and split-K for few rows (each split writes its partial ``(acc, max, sum)`` in
fp32; a combine kernel merges the splits with the sink and runs the same epilogue).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
LOG2E = 1.4426950408889634
# Chosen from benchmarks/kernels.py on an H100 (docs/benchmarks.md, 2026-11-24, CUDA-graph timings): split-K
# wins at 1 and 8 rows (CSA 64k: 38 vs 77 us, 46 vs 77 us) and loses at 64 (111 vs 103 us); the switch sits
# between, at 32 (not measured there). 32 heads per program win from 256 rows (CSA 64k: 246 vs 347 us;
# 1024-row extend: 718 vs 997 us) and lose at 64 (117 vs 103 us); the switch is put at 128 (not measured).
SPLIT_MAX_ROWS = 32
WIDE_HEADS_MIN_ROWS = 128


@triton.jit
def _online_block(q, kt, ok, m_i, l_i, acc, qk_scale, DT: tl.constexpr, PREC: tl.constexpr,
                  TRANS: tl.constexpr):
    """One block of keys kt [BN, HD_P] (0 where not ok) into the running softmax.

    TRANS=False: q [BH, HD_P], acc [BH, HD_P], scores [BH, BN]. TRANS=True: q is q^T [HD_P, BH], acc is
    acc^T [HD_P, BH] and scores are [BN, BH], so the keys are the M side of both products (wgmma-sized
    tiles for BN >= 64) and the head block is the small N side.
    """
    kt = kt.to(DT)
    if TRANS:
        s = tl.dot(kt, q, input_precision=PREC) * qk_scale
        s = tl.where(ok[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha[None, :] + tl.dot(tl.trans(kt), p.to(DT), input_precision=PREC)
    else:
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
    r = tl.reshape(tl.join(e * c + od * s, od * c - e * s), [ROWS, HD_P])
    tl.store(out_ptr + offs, r.to(DT), mask=mask)


@triton.jit
def _attn_kernel(
    q_ptr, kv_ptr, ring_ptr, comp_ptr, crow_ptr, slot_ptr, p0_ptr, pos_ptr, sink_ptr, cos_ptr, sin_ptr,
    out_ptr, acc_ptr, ml_ptr,
    H, W, R, CROW_STRIDE, MAX_ENTRIES, RATIO, KEYS_PER_SPLIT, NUM_SPLITS, qk_scale,
    HD: tl.constexpr, HD_P: tl.constexpr, ROPE_HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_COMP: tl.constexpr, SPLIT: tl.constexpr, TRANS: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    t, hb, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t64 = t.to(tl.int64)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    d = tl.arange(0, HD_P)
    dmask = d < HD
    if TRANS:
        q = tl.load(q_ptr + (t64 * H + heads[None, :]) * HD + d[:, None], mask=dmask[:, None] & hmask[None, :],
                    other=0.0).to(DT)
        acc = tl.zeros([HD_P, BLOCK_H], tl.float32)
    else:
        q = tl.load(q_ptr + (t64 * H + heads[:, None]) * HD + d[None, :], mask=hmask[:, None] & dmask[None, :],
                    other=0.0).to(DT)
        acc = tl.zeros([BLOCK_H, HD_P], tl.float32)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    p0 = tl.load(p0_ptr + t).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    n_keys = W + 0 * pos
    if HAS_COMP:
        n_keys += tl.minimum((pos + 1) // RATIO, MAX_ENTRIES)
    lo = 0 * pos
    hi = n_keys
    if SPLIT:
        lo = sp.to(tl.int64) * KEYS_PER_SPLIT
        hi = tl.minimum(lo + KEYS_PER_SPLIT, n_keys)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)

    # window keys: virtual index j -> position pos - W + 1 + j; positions < 0 are skipped entirely
    w_hi = tl.minimum(hi, W)
    for j0 in range(tl.maximum(lo, W - 1 - pos), w_hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        ok = j < w_hi
        k = tl.maximum(pos - W + 1 + j, 0)
        ptrs = tl.where(k >= p0, kv_ptr + (t64 - pos + k) * HD, ring_ptr + (slot * R + k % R) * HD)
        kt = tl.load(ptrs[:, None] + d[None, :], mask=ok[:, None] & dmask[None, :], other=0.0)
        m_i, l_i, acc = _online_block(q, kt, ok, m_i, l_i, acc, qk_scale, DT, PREC, TRANS)

    if HAS_COMP:
        # compressed keys: crow[t, c] is the pool row of the row's c-th visible entry (-1: none)
        for c0 in range(tl.maximum(lo, W) - W, hi - W, BLOCK_N):
            c = c0 + tl.arange(0, BLOCK_N)
            rows = tl.load(crow_ptr + t64 * CROW_STRIDE + c, mask=c < hi - W, other=-1)
            ok = rows >= 0
            kt = tl.load(comp_ptr + rows[:, None] * HD + d[None, :], mask=ok[:, None] & dmask[None, :], other=0.0)
            m_i, l_i, acc = _online_block(q, kt, ok, m_i, l_i, acc, qk_scale, DT, PREC, TRANS)

    if TRANS:
        acc = tl.trans(acc)
    if SPLIT:
        part = (t64 * NUM_SPLITS + sp) * H + heads
        tl.store(acc_ptr + part[:, None] * HD + d[None, :], acc, mask=hmask[:, None] & dmask[None, :])
        tl.store(ml_ptr + part * 2, m_i, mask=hmask)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=hmask)
    else:
        sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0) * 1.4426950408889634
        m_fin = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_fin)
        inv_l = alpha / (l_i * alpha + tl.exp2(sink - m_fin))
        _store_rows(out_ptr, (t64 * H + heads[:, None]) * HD + d[None, :], hmask[:, None] & dmask[None, :],
                    acc * inv_l[:, None], cos_ptr, sin_ptr, t, HD, BLOCK_H, HD_P, ROPE_HALF, DT)


@triton.jit
def _combine_kernel(acc_ptr, ml_ptr, sink_ptr, cos_ptr, sin_ptr, out_ptr, H, NUM_SPLITS,
                    HD: tl.constexpr, HD_P: tl.constexpr, S_P: tl.constexpr, ROPE_HALF: tl.constexpr,
                    DT: tl.constexpr):
    t, h = tl.program_id(0), tl.program_id(1)
    t64 = t.to(tl.int64)
    sidx = tl.arange(0, S_P)
    smask = sidx < NUM_SPLITS
    part = (t64 * NUM_SPLITS + sidx) * H + h
    m = tl.load(ml_ptr + part * 2, mask=smask, other=float("-inf"))
    l = tl.load(ml_ptr + part * 2 + 1, mask=smask, other=0.0)
    sink = tl.load(sink_ptr + h) * 1.4426950408889634
    m_fin = tl.maximum(tl.max(m, axis=0), sink)
    w = tl.exp2(m - m_fin)
    inv_l = 1.0 / (tl.sum(w * l, axis=0) + tl.exp2(sink - m_fin))
    d = tl.arange(0, HD_P)
    acc = tl.load(acc_ptr + part[:, None] * HD + d[None, :], mask=smask[:, None] & (d < HD)[None, :], other=0.0)
    o = tl.sum(w[:, None] * acc, axis=0) * inv_l
    _store_rows(out_ptr, (t64 * H + h) * HD + d[None, :], (d < HD)[None, :], o[None, :], cos_ptr, sin_ptr, t, HD,
                1, HD_P, ROPE_HALF, DT)


def comp_rows(page_table: torch.Tensor, picks: torch.Tensor | None, slot: torch.Tensor, pos: torch.Tensor,
              ratio: int, max_entries: int, page_size: int) -> torch.Tensor:
    """[T, max_entries] int64 pool rows (``page * page_size + e % page_size``) of each row's visible compressed
    entries in order: CSA ``picks[t, c]``, HCA ``c``; -1 past ``(pos + 1) // ratio`` or for a -1 pick."""
    c = torch.arange(max_entries, device=pos.device)
    e = picks[:, :max_entries] if picks is not None else c.expand(pos.shape[0], -1)
    ok = (c[None, :] < ((pos + 1) // ratio)[:, None]) & (e >= 0)
    ec = e.clamp_min(0)
    page = page_table[slot[:, None], (ec // page_size).clamp_max(page_table.shape[1] - 1)]
    return torch.where(ok, page * page_size + ec % page_size, -1)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits so tests cover the combine


# The configurations benchmarks/kernels.py times and tests/gpu checks (besides split / no-split).
CANDIDATES = tuple(
    dict(block_h=bh, block_n=bn, num_warps=w, num_stages=st, trans=tr)
    for bh, bn, w, st, tr in ((16, 32, 4, 2, False), (32, 32, 4, 2, False), (32, 32, 8, 2, False),
                              (16, 32, 4, 3, False), (16, 64, 4, 2, True), (32, 64, 4, 2, True),
                              (32, 64, 8, 2, True), (64, 64, 8, 2, True), (16, 32, 4, 2, True))
)


def config_name(cfg: dict) -> str:
    return f"h{cfg['block_h']}n{cfg['block_n']}w{cfg['num_warps']}s{cfg['num_stages']}{'T' if cfg['trans'] else ''}"


def default_config(t: int, h: int, hd: int, device: torch.device) -> dict:
    """Block sizes and the split decision for ``t`` query rows (see SPLIT_MAX_ROWS / WIDE_HEADS_MIN_ROWS).

    block_h: heads per program (>= 16: the smallest dot tile); block_n: keys per step; trans: keys as the M
    side of both products (see :func:`_online_block`; measured no faster, kept for the sweep); split: split-K
    plus a combine kernel.
    """
    block_h = 32 if t >= WIDE_HEADS_MIN_ROWS and h >= 32 else 16
    return dict(block_h=block_h, block_n=32, num_warps=4, num_stages=2, split=t <= SPLIT_MAX_ROWS, trans=False)


def paged_sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, ring: torch.Tensor, comp: torch.Tensor | None,
    page_table: torch.Tensor | None, picks: torch.Tensor | None, slot: torch.Tensor, p0: torch.Tensor,
    pos: torch.Tensor, sink: torch.Tensor, scale: float, window: int, ratio: int, max_entries: int,
    cos: torch.Tensor, sin: torch.Tensor, config: dict | None = None,
) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.attention.paged_sparse_attention` (same arguments; ``config`` overrides
    :func:`default_config`, for benchmarks)."""
    t, h, hd = q.shape
    out = torch.empty_like(q)
    if t == 0:
        return out
    cfg = default_config(t, h, hd, q.device) | (config or {})
    block_h, block_n = cfg["block_h"], cfg["block_n"]
    q, kv = q.contiguous(), kv.to(ring.dtype).contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    sink = sink.float().contiguous()
    has_comp = comp is not None and max_entries > 0
    crow = comp_rows(page_table, picks, slot, pos, ratio, max_entries, comp.shape[1]) if has_comp else slot
    comp_t = comp if has_comp else ring
    n_virtual = window + (max_entries if has_comp else 0)
    hb = triton.cdiv(h, block_h)
    splits, per_split = 1, n_virtual
    if cfg["split"]:
        want = cfg.get("splits") or triton.cdiv(2 * _num_sms(q.device), t * hb)
        per_split = max(block_n, triton.cdiv(triton.cdiv(n_virtual, max(1, want)), block_n) * block_n)
        splits = triton.cdiv(n_virtual, per_split)
    split = splits > 1
    acc = torch.empty((t, splits, h, hd) if split else (1,), dtype=torch.float32, device=q.device)
    ml = torch.empty((t, splits, h, 2) if split else (1,), dtype=torch.float32, device=q.device)
    dt = _TL[q.dtype]
    hd_p = triton.next_power_of_2(hd)
    _attn_kernel[(t, hb, splits)](
        q, kv, ring, comp_t, crow, slot, p0, pos, sink, cos, sin, out, acc, ml,
        h, window, ring.shape[1], crow.stride(0) if has_comp else 0, max_entries, ratio, per_split, splits,
        scale * LOG2E, HD=hd, HD_P=hd_p, ROPE_HALF=cos.shape[-1], BLOCK_H=block_h, BLOCK_N=block_n,
        HAS_COMP=has_comp, SPLIT=split, TRANS=cfg["trans"], DT=dt,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split:
        _combine_kernel[(t, h)](acc, ml, sink, cos, sin, out, h, splits, HD=hd, HD_P=hd_p,
                                S_P=triton.next_power_of_2(splits), ROPE_HALF=cos.shape[-1], DT=dt)
    return out
