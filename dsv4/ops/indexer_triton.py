"""Triton Lightning Indexer: paged scores, then an exact per-row top-k (reference:
:func:`dsv4.ops.indexer.indexer_topk`, same arguments).

Scores. A program owns ``G`` consecutive rows of one request (decode G = 1; verify G = next_n, up to 4;
extend G = 4) and walks that request's visible entries in blocks of ``BLOCK_N``, every ``NPROG``-th block: the
key block is read once through the page table and serves all G rows (so the ``next_n`` draft rows of a
verify share their keys natively), as one ``[G*HP, dI] x [dI, BLOCK_N]`` product with the heads of the G rows
stacked on the M side. Each program finds its request and row group from ``extend_lens`` itself, so the grid
depends only on static sizes. Rounding as the reference: per-head dots rounded to the activation dtype,
ReLU, times the (rounded) head weight, rounded, summed over heads in fp32, rounded. Scores land in an fp32
scratch ``[rows, max_entries]``; entries a row does not see are never written nor read.

Top-k. One program per row finds the k-th largest score exactly by a radix select on an order-preserving
integer key of the fp32 score (8 bits per pass, a 256-bin histogram of the rows still in the running; two
passes when the scores are bf16-rounded, whose fp32 bits carry 16 significant bits, four otherwise; the
scoring kernel already counts the first pass, spread over all its programs), then
one compaction pass in entry order writes everything above the threshold plus the lowest-index entries equal
to it, so ties go to the lowest index exactly as the reference's stable sort does. Picks come out in
ascending entry order; the rest of the row is -1.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
SCRATCH_BYTES = 512 << 20  # the fp32 score scratch of one launch; longer batches go in row chunks


@triton.jit
def _score_kernel(
    q_ptr, w_ptr, key_ptr, pt_ptr, slots_ptr, lens_ptr, pos_ptr, score_ptr, hist_ptr,
    R, NI, DI, PS, PT_STRIDE, RATIO, MAX_ENTRIES, ROW_LO, ROW_HI, SCORE_STRIDE, NPROG,
    R_P: tl.constexpr, G: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, HIST: tl.constexpr,
):
    grp, sp = tl.program_id(0), tl.program_id(1)
    # requests' row groups are numbered back to back: find this program's request and its first row
    ri = tl.arange(0, R_P)
    n_r = tl.load(lens_ptr + ri, mask=ri < R, other=0)
    groups = (n_r + G - 1) // G
    ends = tl.cumsum(groups, 0)
    req = tl.sum((ends <= grp).to(tl.int32), 0)
    before = tl.sum(tl.where(ri < req, groups, 0), 0)
    start = tl.sum(tl.where(ri < req, n_r, 0), 0)
    req_c = tl.minimum(req, R - 1)
    n = tl.where(req < R, tl.load(lens_ptr + req_c), 0)
    slot = tl.load(slots_ptr + req_c).to(tl.int64)
    r0 = (grp - before) * G

    # the G rows, one per stacked head block: f = g * HP + h
    gi = tl.arange(0, G)
    t_g = start + r0 + gi
    ok_g = (r0 + gi < n) & (t_g >= ROW_LO) & (t_g < ROW_HI)
    pos_g = tl.load(pos_ptr + t_g, mask=ok_g, other=-1)
    vis_g = tl.minimum((pos_g + 1) // RATIO, MAX_ENTRIES).to(tl.int32)
    n_hi = tl.max(vis_g, 0)
    f = tl.arange(0, G * HP)
    h = f % HP
    t_f = start + r0 + f // HP
    ok_f = (r0 + f // HP < n) & (t_f >= ROW_LO) & (t_f < ROW_HI) & (h < NI)
    d = tl.arange(0, DP)
    dmask = d < DI
    qh = (t_f.to(tl.int64) * NI + h)
    q = tl.load(q_ptr + qh[:, None] * DI + d[None, :], mask=ok_f[:, None] & dmask[None, :], other=0.0).to(DT)
    w = tl.load(w_ptr + qh, mask=ok_f, other=0.0).to(DT).to(tl.float32)
    out_rows = (t_g - ROW_LO).to(tl.int64) * SCORE_STRIDE

    for blk in range(sp, tl.cdiv(n_hi, BLOCK_N), NPROG):
        c = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        cok = c < n_hi
        page = tl.load(pt_ptr + slot * PT_STRIDE + c // PS, mask=cok, other=0).to(tl.int64)
        kt = tl.load(key_ptr + (page * PS + c % PS)[:, None] * DI + d[None, :], mask=cok[:, None] & dmask[None, :],
                     other=0.0).to(DT)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC)  # [G*HP, BLOCK_N] fp32
        s = tl.maximum(s.to(DT).to(tl.float32), 0.0)
        s = (s * w[:, None]).to(DT).to(tl.float32)
        if G == 1:
            sc = tl.sum(s, axis=0)[None, :]
        else:
            sc = tl.sum(tl.reshape(s, [G, HP, BLOCK_N]), axis=1)
        sc = sc.to(DT).to(tl.float32)
        sc = tl.where(sc == 0.0, 0.0, sc)  # -0.0 (all heads zero, negative weights) ties with +0.0
        seen = ok_g[:, None] & (c[None, :] < vis_g[:, None])
        tl.store(score_ptr + out_rows[:, None] + c[None, :], sc, mask=seen)
        if HIST:
            # the top-k's first radix pass, done here in parallel: per row, a histogram of the top key byte
            # (bin 0 = largest), added into hist[row, 256]
            cell = gi[:, None] * 256 + 127 - (_order_key(sc) >> 24)
            counts = tl.histogram(tl.reshape(cell, [G * BLOCK_N]), G * 256, mask=tl.reshape(seen, [G * BLOCK_N]))
            hb = tl.arange(0, G * 256)
            hrow = (t_g - ROW_LO).to(tl.int64)
            if G == 1:
                dst = hist_ptr + hrow * 256 + hb
            else:
                dst = hist_ptr + tl.sum(tl.where(gi[None, :] == hb[:, None] // 256, hrow[None, :], 0), 1) * 256 + hb % 256
            tl.atomic_add(dst, counts, mask=counts > 0, sem="relaxed")


@triton.jit
def _order_key(s):
    """int32 key with the order of the fp32 values s (non-negative floats keep their bits; negative ones
    flip all but the sign bit, so larger magnitudes sort lower); -0.0 is read as +0.0, its equal."""
    b = tl.where(s == 0.0, 0.0, s).to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _select_kernel(
    score_ptr, hist_ptr, pos_ptr, out_ptr, ROW_LO, SCORE_STRIDE, RATIO, MAX_ENTRIES, K,
    KEY_BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRE_HIST: tl.constexpr,
):
    i = tl.program_id(0)
    t = (ROW_LO + i).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    n = tl.minimum((pos + 1) // RATIO, MAX_ENTRIES).to(tl.int32)
    row = score_ptr + i.to(tl.int64) * SCORE_STRIDE
    bins = tl.arange(0, 256)
    # radix select of the K-th largest key, most significant byte first; `hi` is the threshold key shifted
    # right by the bits not yet decided, `k_rem` how many entries equal to that prefix still go in
    n_scan = tl.where(n > K, n, 0)  # a row with at most K visible entries takes them all
    hi = tl.zeros([], tl.int32)
    k_rem = tl.zeros([], tl.int32) + K
    for p in tl.static_range(KEY_BITS // 8):
        if PRE_HIST and p == 0:
            hist = tl.load(hist_ptr + i.to(tl.int64) * 256 + bins)  # counted by the scoring kernel
        else:
            hist = tl.zeros([256], tl.int32)
            for c0 in range(0, n_scan, BLOCK):
                c = c0 + tl.arange(0, BLOCK)
                ok = c < n_scan
                key = _order_key(tl.load(row + c, mask=ok, other=0.0))
                if p == 0:
                    digit = (key >> 24) + 128
                    match = ok
                else:
                    digit = (key >> (24 - 8 * p)) & 255
                    match = ok & ((key >> (32 - 8 * p)) == hi)
                hist += tl.histogram(255 - digit, 256, mask=match)  # bin 0 holds the largest digit
        above = tl.cumsum(hist, 0)
        b = tl.min(tl.where(above >= k_rem, bins, 255), 0)
        k_rem -= tl.sum(tl.where(bins < b, hist, 0), 0)
        if p == 0:
            hi = 127 - b
        else:
            hi = hi * 256 + (255 - b)

    # compaction in entry order: every key above the threshold, and the first k_rem equal to it
    take_all = n <= K
    n_sel = tl.zeros([], tl.int32)
    n_eq = tl.zeros([], tl.int32)
    out_row = out_ptr + t * K
    for c0 in range(0, n, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        ok = c < n
        key = _order_key(tl.load(row + c, mask=ok, other=0.0)) >> (32 - KEY_BITS)
        eq = (ok & (key == hi)).to(tl.int32)
        eq_before = n_eq + tl.cumsum(eq, 0) - eq
        sel = (ok & (take_all | (key > hi) | ((eq != 0) & (eq_before < k_rem)))).to(tl.int32)
        dst = n_sel + tl.cumsum(sel, 0) - sel
        tl.store(out_row + dst, c.to(tl.int64), mask=(sel != 0) & (dst < K))  # bound: never past the row
        n_sel += tl.sum(sel, 0)
        n_eq += tl.sum(eq, 0)
    for j0 in range(0, K, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        tl.store(out_row + j, tl.full([BLOCK_K], -1, tl.int64), mask=(j >= n_sel) & (j < K))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: few programs, each walking many blocks


def default_config(t: int, r: int, n_heads: int, max_entries: int, device: torch.device) -> dict:
    """Launch shapes from static sizes only (t rows, r requests).

    group: rows per scoring program, from the rows per request (decode 1, verify next_n, extend 4);
    block_n: entries per step (the [G*HP, BLOCK_N] fp32 scores stay near 64 registers a thread); nprog:
    programs per row group along the entries, enough for a few waves of the GPU; block: scores per step of
    the top-k passes; fused_hist: the scoring kernel also does the top-k's first radix pass (in parallel
    over the entries, where the top-k kernel has one program per row).
    """
    per_req = max(1, t // max(1, r))
    group = 1 if per_req < 2 else 2 if per_req < 4 else 4
    hp = max(16, triton.next_power_of_2(n_heads))
    block_n = 128 if group * hp <= 64 else 64
    groups = (t + r * (group - 1)) // group
    blocks = max(1, triton.cdiv(max_entries, block_n))
    nprog = max(1, min(blocks, triton.cdiv(4 * _num_sms(device), max(1, groups))))
    cuda = device.type == "cuda"
    return dict(group=group, block_n=block_n, nprog=nprog, num_warps=8 if group * hp >= 128 else 4,
                num_stages=3 if cuda else 1, block=4096 if cuda else 64, select_warps=8, fused_hist=True)


def paged_scores(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, page_table: torch.Tensor, slots: torch.Tensor,
    extend_lens: torch.Tensor, positions: torch.Tensor, ratio: int, max_entries: int, config: dict | None = None,
    row_lo: int = 0, row_hi: int | None = None, out: torch.Tensor | None = None, hist: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.indexer.paged_scores` over rows ``row_lo .. row_hi - 1``: returns
    [row_hi - row_lo, max_entries] fp32 where only each row's visible entries are written (the rest is
    whatever ``out`` held; the reference has -inf there). ``hist`` [row_hi - row_lo, 256] int32, zeroed:
    also count each row's scores by the top byte of their order key (the top-k's first radix pass)."""
    t, nh, dh = q.shape
    row_hi = t if row_hi is None else row_hi
    r = slots.shape[0]
    cfg = default_config(t, r, nh, max_entries, q.device) | (config or {})
    if out is None:
        out = torch.empty((row_hi - row_lo, max_entries), dtype=torch.float32, device=q.device)
    if row_hi <= row_lo or max_entries == 0:
        return out
    g = cfg["group"]
    hp = max(16, triton.next_power_of_2(nh))
    groups = (t + r * (g - 1)) // g
    _score_kernel[(groups, cfg["nprog"])](
        q.contiguous(), weights.contiguous(), keys, page_table, slots, extend_lens, positions, out,
        out if hist is None else hist,
        r, nh, dh, keys.shape[1], page_table.stride(0), ratio, max_entries, row_lo, row_hi, out.stride(0),
        cfg["nprog"], R_P=max(2, triton.next_power_of_2(r)), G=g, HP=hp, DP=max(16, triton.next_power_of_2(dh)),
        BLOCK_N=cfg["block_n"], DT=_TL[q.dtype], PREC="ieee" if q.dtype == torch.float32 else "tf32",
        HIST=hist is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def select_topk(scores: torch.Tensor, positions: torch.Tensor, ratio: int, topk: int, config: dict | None = None,
                row_lo: int = 0, bf16_scores: bool = False, out: torch.Tensor | None = None,
                hist: torch.Tensor | None = None) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.indexer.select_topk`: scores [n, C] fp32 are rows ``row_lo ..`` of the
    batch (``positions`` covers the whole batch). ``bf16_scores``: every score is a bf16 value (two radix
    passes suffice). ``hist``: the first pass's histograms from :func:`paged_scores`. Writes rows
    ``row_lo .. row_lo + n - 1`` of ``out`` [T, min(topk, C)] int64."""
    n, c = scores.shape
    k = min(topk, c)
    cfg = dict(block=4096 if scores.is_cuda else 64, select_warps=8) | (config or {})
    if out is None:
        out = torch.empty((positions.shape[0], k), dtype=torch.int64, device=scores.device)
    if n == 0 or k == 0:
        return out
    _select_kernel[(n,)](
        scores, scores if hist is None else hist, positions, out, row_lo, scores.stride(0), ratio, c, k,
        KEY_BITS=16 if bf16_scores else 32, BLOCK=cfg["block"], BLOCK_K=min(1024, triton.next_power_of_2(k)),
        PRE_HIST=hist is not None, num_warps=cfg["select_warps"],
    )
    return out


def indexer_topk(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, page_table: torch.Tensor, slots: torch.Tensor,
    extend_lens: torch.Tensor, positions: torch.Tensor, ratio: int, topk: int, max_entries: int,
    config: dict | None = None,
) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.indexer.indexer_topk` (same arguments; ``config`` overrides
    :func:`default_config`, for benchmarks and tests)."""
    t = q.shape[0]
    k = min(topk, max_entries)
    out = torch.empty((t, k), dtype=torch.int64, device=q.device)
    if t == 0 or k == 0:
        return out
    cfg = default_config(t, slots.shape[0], q.shape[1], max_entries, q.device) | (config or {})
    chunk = max(1, min(t, SCRATCH_BYTES // (4 * max_entries)))
    scratch = torch.empty((chunk, max_entries), dtype=torch.float32, device=q.device)
    hist = torch.empty((chunk, 256), dtype=torch.int32, device=q.device) if cfg["fused_hist"] else None
    for lo in range(0, t, chunk):
        hi = min(t, lo + chunk)
        h = None if hist is None else hist[: hi - lo].zero_()
        s = paged_scores(q, weights, keys, page_table, slots, extend_lens, positions, ratio, max_entries, cfg,
                         lo, hi, scratch[: hi - lo], h)
        select_topk(s, positions, ratio, topk, cfg, lo, q.dtype == torch.bfloat16, out, h)
    return out

