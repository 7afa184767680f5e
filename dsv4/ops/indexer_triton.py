"""Triton Lightning Indexer: paged scores, then an exact per-row top-k (reference:
:func:`dsv4.ops.indexer.indexer_topk`, same arguments).

Scores. A program owns ``G`` consecutive rows of one request (decode G = 1; verify G = next_n; extend G = 4
or more) and walks that request's visible entries in blocks of ``BLOCK_N``, every ``NPROG``-th block: each key
tile is read once through the page table and serves all G rows (rows of one request share their keys, so the
``next_n`` draft rows of a verify share them natively), while the G rows' q tiles stay resident for the whole
walk. Tile forms (``FORMS``, chosen per shape class by measurement): "stack" puts the heads of the G rows on
the M side of one ``[G*HP, dI] x [dI, BLOCK_N]`` product; "rows" does one ``[HP, dI] x [dI, BLOCK_N]`` product
per row over the same key tile; "rows_t" the transposed ``[BLOCK_N, dI] x [dI, HP]`` (heads on N, so a row's
head sum stays inside a thread quad). Each program finds its request and row group from ``extend_lens``
itself, so the grid depends only on static sizes. Rounding as the reference: per-head dots rounded to the
activation dtype, ReLU, times the (rounded) head weight, rounded, summed over heads in fp32, rounded. Scores
land in a scratch ``[rows, max_entries]`` (bf16 when the activations are: the scores are bf16 values, so it is
exact at half the bytes; fp32 otherwise); entries a row does not see are never written nor read. The top-k's
first radix pass is counted here (per row, a 256-bin histogram of the top byte of the scores' order keys),
accumulated over the program's whole walk and added to the row's global histogram once.

Top-k. One program per row finds the k-th largest score exactly by a radix select on an order-preserving
integer key of the fp32 score (8 bits per pass, a 256-bin histogram of the rows still in the running; two
passes when the scores are bf16-rounded, whose fp32 bits carry 16 significant bits, four otherwise; the
scoring kernel already counts the first pass), then
one compaction pass in entry order writes everything above the threshold plus the lowest-index entries equal
to it, so ties go to the lowest index exactly as the reference's stable sort does. Picks come out in
ascending entry order; the rest of the row is -1.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dsv4.ops import pdl
from dsv4.ops.compressor_triton import _fp4_sim
from dsv4.ops.indexer import INDEX_Q_QUANT_BLOCK
from dsv4.ops.pdl import enter as pdl_enter
from dsv4.ops.qkv_triton import _pairs, _rope_pairs, _unpairs

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
SCRATCH_BYTES = 512 << 20  # the fp32 score scratch of one launch; longer batches go in row chunks
# Histogram rows kept zeroed between calls (the select kernel clears each row it reads) for batches up to this many
# rows: decode, verify and draft steps, also inside CUDA graphs, then launch no clearing kernel. Never freed: a
# captured graph keeps writing to it.
HIST_POOL_ROWS = 512
_HIST_POOL: dict[torch.device, torch.Tensor] = {}


def _histograms(rows: int, device: torch.device) -> torch.Tensor:
    """A zeroed [rows, 256] int32 histogram scratch, which the select kernel leaves zeroed."""
    if rows > HIST_POOL_ROWS:
        return torch.zeros((rows, 256), dtype=torch.int32, device=device)
    buf = _HIST_POOL.get(device)
    if buf is None:
        buf = _HIST_POOL[device] = torch.zeros((HIST_POOL_ROWS, 256), dtype=torch.int32, device=device)
    return buf[:rows]


@triton.jit
def _score_kernel(
    q_ptr, w_ptr, key_ptr, pt_ptr, slots_ptr, lens_ptr, pos_ptr, score_ptr, hist_ptr,
    R, NI, DI, PS, PT_STRIDE, RATIO, MAX_ENTRIES, ROW_LO, ROW_HI, SCORE_STRIDE, NPROG,
    R_P: tl.constexpr, G: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, HIST: tl.constexpr, FORM: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
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

    gi = tl.arange(0, G)
    t_g = start + r0 + gi
    ok_g = (r0 + gi < n) & (t_g >= ROW_LO) & (t_g < ROW_HI)
    pos_g = tl.load(pos_ptr + t_g, mask=ok_g, other=-1)
    vis_g = tl.minimum((pos_g + 1) // RATIO, MAX_ENTRIES).to(tl.int32)
    n_hi = tl.max(vis_g, 0)
    d = tl.arange(0, DP)
    dmask = d < DI
    out_rows = (t_g - ROW_LO).to(tl.int64) * SCORE_STRIDE
    bins = tl.arange(0, 256)
    hacc = tl.zeros([G, 256], tl.int32)  # per row: its scores by the top byte of their order key (bin 0 largest)

    if FORM == 0:
        # "stack": the heads of the G rows stacked on the M side of one [G*HP, dI] x [dI, BLOCK_N] product
        f = tl.arange(0, G * HP)
        h = f % HP
        t_f = start + r0 + f // HP
        ok_f = (r0 + f // HP < n) & (t_f >= ROW_LO) & (t_f < ROW_HI) & (h < NI)
        qh = (t_f.to(tl.int64) * NI + h)
        q = tl.load(q_ptr + qh[:, None] * DI + d[None, :], mask=ok_f[:, None] & dmask[None, :], other=0.0).to(DT)
        w = tl.load(w_ptr + qh, mask=ok_f, other=0.0).to(DT)
        for blk in range(sp, tl.cdiv(n_hi, BLOCK_N), NPROG):
            c = blk * BLOCK_N + tl.arange(0, BLOCK_N)
            kt = _key_tile(key_ptr, pt_ptr, slot, PT_STRIDE, PS, DI, c, c < n_hi, d, dmask, DT)
            s = tl.dot(q, tl.trans(kt), input_precision=PREC)  # [G*HP, BLOCK_N] fp32
            s = _head_terms(s, w[:, None], DT)
            if G == 1:
                sc = tl.sum(s, axis=0)[None, :]
            else:
                sc = tl.sum(tl.reshape(s, [G, HP, BLOCK_N]), axis=1)
            sc = sc.to(DT).to(tl.float32)
            sc = tl.where(sc == 0.0, 0.0, sc)  # -0.0 (all heads zero, negative weights) ties with +0.0
            seen = ok_g[:, None] & (c[None, :] < vis_g[:, None])
            tl.store(score_ptr + out_rows[:, None] + c[None, :], sc, mask=seen)
            if HIST:
                cell = gi[:, None] * 256 + 127 - (_order_key(sc) >> 24)
                counts = tl.histogram(tl.reshape(cell, [G * BLOCK_N]), G * 256,
                                      mask=tl.reshape(seen, [G * BLOCK_N]))
                hacc += tl.reshape(counts, [G, 256])
    else:
        # "rows" (FORM 1: [HP, dI] x [dI, BLOCK_N], heads on M) and "rows_t" (FORM 2: [BLOCK_N, dI] x [dI, HP],
        # heads on N, so the head sum stays inside a thread's quad): one product per row over the one key tile
        # of the block, each row's head sum a plain reduction (no reshape of the product's layout)
        h = tl.arange(0, HP)
        qs = ()  # per row: its q tile, head weights, whether it is a row of this launch, its visible count
        ws = ()
        oks = ()
        viss = ()
        for g in tl.static_range(G):
            ok = (r0 + g < n) & (start + r0 + g >= ROW_LO) & (start + r0 + g < ROW_HI)
            qh = (start + r0 + g).to(tl.int64) * NI + h
            hm = ok & (h < NI)
            qg = tl.load(q_ptr + qh[:, None] * DI + d[None, :], mask=hm[:, None] & dmask[None, :], other=0.0)
            qs = qs + (tl.trans(qg.to(DT)) if FORM == 2 else qg.to(DT),)
            ws = ws + (tl.load(w_ptr + qh, mask=hm, other=0.0).to(DT),)
            oks = oks + (ok,)
            viss = viss + (tl.sum(tl.where(gi == g, vis_g, 0), 0),)
        for blk in range(sp, tl.cdiv(n_hi, BLOCK_N), NPROG):
            c = blk * BLOCK_N + tl.arange(0, BLOCK_N)
            kt = _key_tile(key_ptr, pt_ptr, slot, PT_STRIDE, PS, DI, c, c < n_hi, d, dmask, DT)
            for g in tl.static_range(G):
                if FORM == 2:
                    s = tl.dot(kt, qs[g], input_precision=PREC)  # [BLOCK_N, HP] fp32
                    sc = tl.sum(_head_terms(s, ws[g][None, :], DT), axis=1)
                else:
                    s = tl.dot(qs[g], tl.trans(kt), input_precision=PREC)  # [HP, BLOCK_N] fp32
                    sc = tl.sum(_head_terms(s, ws[g][:, None], DT), axis=0)
                sc = sc.to(DT).to(tl.float32)
                sc = tl.where(sc == 0.0, 0.0, sc)
                seen = oks[g] & (c < viss[g])
                tl.store(score_ptr + (start + r0 + g - ROW_LO).to(tl.int64) * SCORE_STRIDE + c, sc, mask=seen)
                if HIST:
                    counts = tl.histogram(127 - (_order_key(sc) >> 24), 256, mask=seen)
                    hacc += tl.where(gi[:, None] == g, counts[None, :], 0)
    if HIST:
        # the top-k's first radix pass, counted here in parallel over the entries: one add per row and bin for
        # the program's whole walk (not per block)
        hrow = (t_g - ROW_LO).to(tl.int64)
        tl.atomic_add(hist_ptr + hrow[:, None] * 256 + bins[None, :], hacc, mask=ok_g[:, None] & (hacc > 0),
                      sem="relaxed")


@triton.jit
def _head_terms(s, w, DT: tl.constexpr):
    """Per-head score terms ``DT(relu(DT(s)) * w)`` as fp32 (s: fp32 dots; w: DT head weights, broadcastable).
    The ReLU and the product run in DT: an IEEE product of two DT values rounded once to DT is the
    reference's fp32 product rounded to DT (exact in fp32), so this is the same value in fewer (packed)
    instructions."""
    return (tl.maximum(s.to(DT), 0.0) * w).to(tl.float32)


@triton.jit
def _key_tile(key_ptr, pt_ptr, slot, PT_STRIDE, PS, DI, c, cok, d, dmask, DT: tl.constexpr):
    """Entries c [BLOCK_N] of the slot's keys through the page table: [BLOCK_N, DP] in DT (0 where masked)."""
    page = tl.load(pt_ptr + slot * PT_STRIDE + c // PS, mask=cok, other=0).to(tl.int64)
    return tl.load(key_ptr + (page * PS + c % PS)[:, None] * DI + d[None, :], mask=cok[:, None] & dmask[None, :],
                   other=0.0).to(DT)


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
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
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
            # left zeroed for the next call (this program is the row's only reader): no clearing launch per step
            tl.store(hist_ptr + i.to(tl.int64) * 256 + bins, tl.zeros([256], tl.int32))
        else:
            hist = tl.zeros([256], tl.int32)
            for c0 in range(0, n_scan, BLOCK):
                c = c0 + tl.arange(0, BLOCK)
                ok = c < n_scan
                key = _order_key(tl.load(row + c, mask=ok, other=0.0).to(tl.float32))
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
        key = _order_key(tl.load(row + c, mask=ok, other=0.0).to(tl.float32)) >> (32 - KEY_BITS)
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


FORMS = {"stack": 0, "rows": 1, "rows_t": 2}  # the scoring kernel's tile forms (see the module docstring)

# Scoring launch shapes per shape class, from the rows per request: "decode" 1, "verify2" 2-3, "verify4" 4-7,
# "extend" 8 or more. form: FORMS; group: rows per program (rows of one request share each key tile);
# block_n: entries per step; waves: programs per row group along the entries are enough for this many
# programs per SM; fused_hist: the scoring kernel also counts the top-k's first radix pass. Decided by the
# sweep in benchmarks/bench_indexer.py, which prints the winner of every class in this form.
DEFAULTS = {
    "decode": dict(form="stack", group=1, block_n=128, num_warps=4, waves=4, fused_hist=True),
    "verify2": dict(form="rows", group=2, block_n=64, num_warps=4, waves=4, fused_hist=True),
    "verify4": dict(form="rows", group=4, block_n=64, num_warps=4, waves=4, fused_hist=True),
    "extend": dict(form="rows", group=4, block_n=64, num_warps=4, waves=4, fused_hist=True),
}
# what the sweep tries per class (merged over the class's default); small enough for one quick GPU run
CANDIDATES = {
    "decode": [dict(form="stack", block_n=64), dict(form="rows_t", block_n=64), dict(form="rows_t", block_n=128),
               dict(num_warps=8), dict(fused_hist=False)],
    "verify2": [dict(form="stack", block_n=64, num_warps=8), dict(form="rows_t"), dict(block_n=128),
                dict(form="rows_t", block_n=128), dict(fused_hist=False)],
    "verify4": [dict(form="stack", block_n=64, num_warps=8), dict(form="rows_t"), dict(block_n=128),
                dict(form="rows_t", block_n=128), dict(num_warps=8), dict(fused_hist=False)],
    "extend": [dict(form="stack", block_n=64, num_warps=8), dict(form="rows_t"), dict(block_n=128),
               dict(form="rows_t", block_n=128), dict(num_warps=8), dict(fused_hist=False), dict(waves=2),
               dict(group=8), dict(group=8, form="rows_t")],
}


def shape_class(t: int, r: int) -> str:
    """The DEFAULTS key of a batch of t rows over r requests (static sizes only)."""
    per_req = max(1, t // max(1, r))
    return "decode" if per_req < 2 else "verify2" if per_req < 4 else "verify4" if per_req < 8 else "extend"


def config_name(cfg: dict) -> str:
    return (f"{cfg['form']} g{cfg['group']} n{cfg['block_n']} w{cfg['num_warps']} v{cfg['waves']}"
            + ("" if cfg["fused_hist"] else " nohist"))


def default_config(t: int, r: int, n_heads: int, max_entries: int, device: torch.device,
                   config: dict | None = None) -> dict:
    """Launch shapes from static sizes only (t rows, r requests): the class's DEFAULTS row, then ``config``'s
    overrides; nprog (programs per row group along the entries) follows from ``waves``, the row groups and
    the GPU's SM count; block / select_warps: scores per step and warps of the top-k passes."""
    cfg = dict(DEFAULTS[shape_class(t, r)]) | (config or {})
    g = cfg["group"]
    groups = max(1, (t + r * (g - 1)) // g)
    blocks = max(1, triton.cdiv(max_entries, cfg["block_n"]))
    cuda = device.type == "cuda"
    nprog = max(1, min(blocks, triton.cdiv(cfg["waves"] * _num_sms(device), groups)))
    return dict(nprog=nprog, num_stages=3 if cuda else 1, block=4096 if cuda else 64, select_warps=8) | cfg


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
    cfg = default_config(t, r, nh, max_entries, q.device, config)
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
        HIST=hist is not None, FORM=FORMS[cfg["form"]], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **pdl.launch(q.device),
    )
    return out


def select_topk(scores: torch.Tensor, positions: torch.Tensor, ratio: int, topk: int, config: dict | None = None,
                row_lo: int = 0, bf16_scores: bool = False, out: torch.Tensor | None = None,
                hist: torch.Tensor | None = None) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.indexer.select_topk`: scores [n, C] fp32 are rows ``row_lo ..`` of the
    batch (``positions`` covers the whole batch). ``bf16_scores``: every score is a bf16 value (two radix
    passes suffice). ``hist``: the first pass's histograms from :func:`paged_scores`, left zeroed. Writes rows
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
        PRE_HIST=hist is not None, num_warps=cfg["select_warps"], **pdl.launch(scores.device),
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
    cfg = default_config(t, slots.shape[0], q.shape[1], max_entries, q.device, config)
    # bf16 scores are bf16 values (the reference rounds them so): a bf16 scratch holds them exactly, half the bytes
    sdt = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    chunk = max(1, min(t, SCRATCH_BYTES // (sdt.itemsize * max_entries)))
    scratch = torch.empty((chunk, max_entries), dtype=sdt, device=q.device)
    hist = _histograms(chunk, q.device) if cfg["fused_hist"] else None
    for lo in range(0, t, chunk):
        hi = min(t, lo + chunk)
        h = None if hist is None else hist[: hi - lo]  # zeroed: by _histograms, then by each select
        s = paged_scores(q, weights, keys, page_table, slots, extend_lens, positions, ratio, max_entries, cfg,
                         lo, hi, scratch[: hi - lo], h)
        select_topk(s, positions, ratio, topk, cfg, lo, q.dtype == torch.bfloat16, out, h)
    return out


# ---- the query side: rope, Hadamard, FP4, scaled weights ----------------------------------------------------
@triton.jit
def _hadamard_rows(y, ROWS: tl.constexpr, D: tl.constexpr, LOG_D: tl.constexpr):
    """compressor_triton._hadamard on each row of y [ROWS, D] fp32 (the same butterfly order and scale)."""
    for i in tl.static_range(LOG_D):
        pairs = tl.permute(tl.reshape(y, [ROWS * (D >> (i + 1)), 2, 1 << i]), [0, 2, 1])
        a, b = tl.split(pairs)
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), [0, 2, 1]), [ROWS, D])
    return y * (D**-0.5)


@triton.jit
def _indexer_q_kernel(q_ptr, out_ptr, cos_ptr, sin_ptr, w_ptr, wout_ptr, w_scale, H, W_STRIDE, D: tl.constexpr,
                      ROPE_HALF: tl.constexpr, LOG_D: tl.constexpr, QUANT: tl.constexpr, QB: tl.constexpr,
                      BLOCK_H: tl.constexpr, DT: tl.constexpr, WDT: tl.constexpr, PDL: tl.constexpr):
    """One program per (token, block of heads): q rows roped (fp32 from q's values, rounded), rotated (rounded)
    and FP4-simulated (rounded), as :func:`dsv4.ops.indexer.indexer_q`; the block's head weights (rows W_STRIDE
    apart; in another dtype than WDT, an fp32 GEMM accumulation, rounded to WDT as they are loaded) scaled."""
    pdl_enter(PDL)
    t, hb = tl.program_id(0), tl.program_id(1)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    d = tl.arange(0, D)
    offs = (t.to(tl.int64) * H + heads[:, None]) * D + d[None, :]
    x = tl.load(q_ptr + offs, mask=hmask[:, None], other=0.0).to(tl.float32)
    e, o = _pairs(x, BLOCK_H, D // 2)
    j = tl.arange(0, D // 2) - (D // 2 - ROPE_HALF)
    is_rope = (j >= 0)[None, :]
    c = tl.load(cos_ptr + t * ROPE_HALF + j, mask=j >= 0, other=1.0)[None, :]
    s = tl.load(sin_ptr + t * ROPE_HALF + j, mask=j >= 0, other=0.0)[None, :]
    e2, o2 = _rope_pairs(e, o, c, s)
    e = tl.where(is_rope, e2.to(DT).to(tl.float32), e)
    o = tl.where(is_rope, o2.to(DT).to(tl.float32), o)
    y = _unpairs(e, o, BLOCK_H, D // 2)
    if QUANT:
        y = _hadamard_rows(y, BLOCK_H, D, LOG_D).to(DT).to(tl.float32)
        y = tl.reshape(_fp4_sim(tl.reshape(y, [BLOCK_H * D]), BLOCK_H * D, QB), [BLOCK_H, D])
    tl.store(out_ptr + offs, y.to(DT), mask=hmask[:, None])
    w = tl.load(w_ptr + t.to(tl.int64) * W_STRIDE + heads, mask=hmask, other=0.0).to(WDT).to(tl.float32)
    tl.store(wout_ptr + t.to(tl.int64) * H + heads, (w * w_scale).to(WDT), mask=hmask)


def indexer_q(q: torch.Tensor, weights: torch.Tensor, weight_scale: float, cos: torch.Tensor, sin: torch.Tensor,
              quant: bool, w_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel for :func:`dsv4.ops.indexer.indexer_q` (one launch). The weights' rows may be strided (a column view
    of a fused GEMM's output, read in place)."""
    t, h, d = q.shape
    if d & (d - 1) or 2 * cos.shape[-1] > d:
        raise ValueError(f"indexer head dim {d} must be a power of two holding the {2 * cos.shape[-1]} rope dims")
    q = q.contiguous()
    weights = weights if weights.stride(-1) == 1 else weights.contiguous()
    out = torch.empty_like(q)
    wout = torch.empty((t, h), dtype=w_dtype or weights.dtype, device=weights.device)
    block_h = max(1, min(triton.next_power_of_2(h), 4096 // d))
    if t:
        _indexer_q_kernel[(t, triton.cdiv(h, block_h))](
            q, out, cos.float().contiguous(), sin.float().contiguous(), weights, wout, weight_scale, h,
            weights.stride(0), D=d, ROPE_HALF=cos.shape[-1], LOG_D=d.bit_length() - 1, QUANT=quant,
            QB=INDEX_Q_QUANT_BLOCK, BLOCK_H=block_h, DT=_TL[q.dtype], WDT=_TL[wout.dtype], **pdl.launch(q.device))
    return out, wout
