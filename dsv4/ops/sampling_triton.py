"""Triton kernels for token sampling (references: :mod:`dsv4.ops.sampling`).

``greedy``: argmax with ties to the lowest index, written into a preallocated integer buffer, no host sync.
Each program scans a contiguous chunk of one row in tiles of ``BLOCK`` lanes, keeping per lane the largest
value seen and its index (a later tile replaces a lane only when strictly larger, so each lane keeps its
earliest maximum); the chunk's answer is the smallest index among the lanes holding the chunk's maximum. A row
holding any NaN answers V-1, as the reference does (its max is NaN, equal to nothing, clamped to V-1). Small
batches split each row over several programs (a second tiny kernel reduces the per-chunk answers in chunk
order); batches that fill the GPU on their own take one program per row and write the answer directly.

``sample`` (reference :func:`dsv4.ops.sampling.sample_seeded`): no sort, no host sync, graph-capturable.

- The kept set of top-k, then top-p, then min-p is a prefix of the rank order (value descending, id ascending),
  so it is one threshold: the tokens whose int32 order key (the fp32 bits made monotone) is above a cut key, plus
  the lowest ids among those equal to it. ``_filter_kernel`` (one program per row) finds it by searches over the
  key range: each pass over the row counts (top-k) or weighs (top-p, w = exp(x - max)) the tokens at NP pivot
  keys and keeps the part of the range where the answer lies, so ~32 / log2(NP + 1) passes find a cut exactly.
  The top-p search is guided by fp32 weights; one fp64 pass then checks the cut against the fp64 masses (the
  reference's), computes the top-k mass and the min-p cut, and a rare miss reruns the search in fp64. The tie
  rule: tokens at the top-p cut value are kept while the mass before them stays below top_p (a ceil), and the
  j-th lowest id among the tokens at the final cut is found with one cumsum pass.
- ``_draw_kernel`` runs the race over each row's chunk: ``x + G`` over kept tokens, G the Gumbel noise of
  Philox-4x32-10 at (seed, step, token id) with the logs in fp64 (see ``sampling.counter_gumbel``); greedy rows
  take the plain argmax. The per-chunk answers are reduced as in ``greedy``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from dsv4.ops import sampling as ref

_BLOCK = 2048
_TARGET_PROGRAMS = 264  # about two programs per SM of an H100: enough chunks in flight to stream the logits


@triton.jit
def _chunk_argmax(ptr, start, end, BLOCK: tl.constexpr):
    """(max, first index of it, any NaN) over ``ptr[start:end]`` (end > start), fp32 / int32 / int1."""
    lanes = tl.arange(0, BLOCK)
    offs = start + lanes
    ok = offs < end
    x = tl.load(ptr + offs, mask=ok, other=float("-inf")).to(tl.float32)
    nan = x != x
    best = tl.where(nan, float("-inf"), x)
    # a lane outside the chunk must never win, even on a row of -inf: its index is past every real one
    idx = tl.where(ok, offs, 2147483647)
    for s in range(start + BLOCK, end, BLOCK):
        offs = s + lanes
        ok = offs < end
        x = tl.load(ptr + offs, mask=ok, other=float("-inf")).to(tl.float32)
        is_nan = x != x
        nan = nan | is_nan
        better = (x > best) & ~is_nan
        best = tl.where(better, x, best)
        idx = tl.where(better, offs, idx)
    m = tl.max(best, axis=0)
    first = tl.min(tl.where(best == m, idx, 2147483647), axis=0)
    return m, first, tl.max(nan.to(tl.int32), axis=0) > 0


@triton.jit
def _greedy_kernel(logits_ptr, out_ptr, part_v_ptr, part_i_ptr, V, stride, chunk, SPLIT: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Program (row, c) scans logits[row, c*chunk : (c+1)*chunk]; SPLIT writes the partial answer (NaN for a
    chunk holding a NaN), else the final id."""
    row = tl.program_id(0)
    c = tl.program_id(1)
    start = c * chunk
    end = tl.minimum(start + chunk, V)
    m, first, nan = _chunk_argmax(logits_ptr + row.to(tl.int64) * stride, start, end, BLOCK)
    if SPLIT:
        tl.store(part_v_ptr + row * tl.num_programs(1) + c, tl.where(nan, float("nan"), m))
        tl.store(part_i_ptr + row * tl.num_programs(1) + c, first)
    else:
        tl.store(out_ptr + row, tl.where(nan, V - 1, first).to(out_ptr.dtype.element_ty))


@triton.jit
def _greedy_reduce_kernel(part_v_ptr, part_i_ptr, out_ptr, V, NSPLIT, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    ok = s < NSPLIT
    v = tl.load(part_v_ptr + row * NSPLIT + s, mask=ok, other=float("-inf"))
    i = tl.load(part_i_ptr + row * NSPLIT + s, mask=ok, other=2147483647)
    nan = tl.max((v != v).to(tl.int32), axis=0) > 0
    v = tl.where(v != v, float("-inf"), v)
    m = tl.max(v, axis=0)
    first = tl.min(tl.where(ok & (v == m), i, 2147483647), axis=0)
    tl.store(out_ptr + row, tl.where(nan, V - 1, first).to(out_ptr.dtype.element_ty))


def _split(r: int, v: int) -> tuple[int, int]:
    """(chunk length, number of chunks) for r rows of v: whole rows once r alone fills the GPU."""
    tiles = triton.cdiv(v, _BLOCK)
    per = triton.cdiv(tiles, max(1, min(tiles, triton.cdiv(_TARGET_PROGRAMS, max(r, 1)))))
    return per * _BLOCK, triton.cdiv(tiles, per)


def greedy(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.sampling.greedy`: logits [R, V] (fp32/bf16/fp16, rows contiguous) -> ids [R]
    written into ``out`` (int32 or int64) when given, else a new int64 tensor."""
    r, v = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if out is None:
        out = torch.empty(r, dtype=torch.int64, device=logits.device)
    if r == 0:
        return out
    chunk, nsplit = _split(r, v)
    if nsplit == 1:
        _greedy_kernel[(r, 1)](logits, out, out, out, v, logits.stride(0), chunk, SPLIT=False, BLOCK=_BLOCK,
                               num_warps=8)
        return out
    part_v = torch.empty((r, nsplit), dtype=torch.float32, device=logits.device)
    part_i = torch.empty((r, nsplit), dtype=torch.int32, device=logits.device)
    _greedy_kernel[(r, nsplit)](logits, out, part_v, part_i, v, logits.stride(0), chunk, SPLIT=True,
                                BLOCK=_BLOCK, num_warps=8)
    _greedy_reduce_kernel[(r,)](part_v, part_i, out, v, nsplit, BLOCK_S=triton.next_power_of_2(nsplit),
                                num_warps=1)
    return out


# ---- sampling: thresholds found by search, then one pass for the draw -------------------------------------------
_FILTER_BLOCK = 1024  # tokens per tile of the filter passes
_NP = 16  # pivots per search pass: each pass narrows the key range about NP + 1 times
# the top-p search: 0 guided by fp32 weights then checked in fp64 (default); 1 guided in fp64; 2 no guide, so the
# fp64 search after the check always runs (tests use 1 and 2 to cover both searches)
_GUIDE = 0
_INT_MIN, _INT_MAX = -2147483648, 2147483647


@triton.jit
def _scaled_keys(ptr, offs, ok, t):
    """(x, key): the logits ``ptr[offs] / t`` in fp32 (0 where not ``ok``) and their int32 order keys (int order =
    value order; -0 as +0, since the sort sees them equal; INT_MIN where not ``ok``, below every real key)."""
    x = tl.math.div_rn(tl.load(ptr + offs, mask=ok, other=0.0).to(tl.float32), t)
    b = tl.where(x == 0, 0.0, x).to(tl.int32, bitcast=True)
    return x, tl.where(ok, tl.where(b < 0, b ^ 0x7FFFFFFF, b), -2147483648)


@triton.jit
def _value(key):
    """The fp32 value of an order key (inverse of :func:`order_key`)."""
    return tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)


@triton.jit
def _exp64(x, GPU_MATH: tl.constexpr):
    if GPU_MATH:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _search(ptr, V, t, m, lo, hi, target, WEIGHTED: tl.constexpr, F64: tl.constexpr, NP: tl.constexpr,
            BLOCK: tl.constexpr, GPU_MATH: tl.constexpr):
    """The smallest key q in (lo, hi] with F(q) < target, and F(q); F(q) = sum over the row's tokens with key >= q
    of 1 (count) or of w = exp(x - m) (WEIGHTED: fp32 exp summed in fp64, or F64: all fp64). Needs F(lo) >= target
    and F(hi) = 0 < target; F is non-increasing, so a pass of NP pivots cuts (lo, hi] into NP + 1 parts."""
    lanes = tl.arange(0, BLOCK)
    j = tl.arange(0, NP).to(tl.int64) + 1
    lo = lo.to(tl.int64)
    hi = hi.to(tl.int64)
    m64 = m.to(tl.float64)
    f_hi = target * 0  # F(hi), typed as the target (int32 or fp64)
    while hi - lo > 1:
        piv = lo + tl.maximum((hi - lo) // (NP + 1), 1) * j
        valid = piv < hi
        piv32 = tl.where(valid, piv, hi).to(tl.int32)
        if WEIGHTED:
            acc = tl.zeros([NP], tl.float64)
        else:
            acc = tl.zeros([NP], tl.int32)
        for s in range(0, V, BLOCK):
            offs = s + lanes
            ok = offs < V
            x, key = _scaled_keys(ptr, offs, ok, t)
            hit = key[:, None] >= piv32[None, :]
            if WEIGHTED:
                if F64:
                    if GPU_MATH:
                        w = libdevice.exp(x.to(tl.float64) - m64)
                    else:
                        w = tl.exp(x.to(tl.float64) - m64)
                    acc += tl.sum(tl.where(hit, w[:, None], 0.0), axis=0)
                else:
                    w = tl.exp(x - m)
                    acc += tl.sum(tl.where(hit, w[:, None], 0.0), axis=0).to(tl.float64)
            else:
                acc += tl.sum(hit.to(tl.int32), axis=0)
        yes = valid & (acc < target)
        new_hi = tl.min(tl.where(yes, piv, hi), axis=0)
        f_hi = tl.where(new_hi < hi, tl.sum(tl.where(yes & (piv == new_hi), acc, 0), axis=0), f_hi)
        new_lo = tl.max(tl.where(valid & ~yes, piv, lo), axis=0)
        lo = tl.minimum(new_lo, new_hi - 1)  # F is monotone, so this only guards against rounding
        hi = new_hi
    return hi.to(tl.int32), f_hi


@triton.jit
def _filter_kernel(logits_ptr, stride, V, temp_ptr, topk_ptr, topp_ptr, minp_ptr, key_out, id_out, bad_out,
                   BLOCK: tl.constexpr, NP: tl.constexpr, GUIDE: tl.constexpr, GPU_MATH: tl.constexpr):
    """One program per row: the kept set as a threshold, tokens with key > key_out or key == key_out and
    id <= id_out (the reference's rank order: value descending, then id ascending); bad_out flags rows holding a
    NaN or whose max is +-inf. Greedy rows (T = 0) only get bad_out."""
    row = tl.program_id(0)
    ptr = logits_ptr + row.to(tl.int64) * stride
    lanes = tl.arange(0, BLOCK)
    t_raw = tl.load(temp_ptr + row).to(tl.float32)
    t = tl.where(t_raw == 0, 1.0, t_raw)
    k = tl.load(topk_ptr + row).to(tl.int64)
    k = tl.where((k <= 0) | (k > V), V, k).to(tl.int32)
    p = tl.load(topp_ptr + row).to(tl.float32)
    mp = tl.load(minp_ptr + row).to(tl.float32)

    # pass 1: max, extreme keys, NaN
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    kmax = tl.full([BLOCK], -2147483648, tl.int32)
    kmin = tl.full([BLOCK], 2147483647, tl.int32)
    nan = tl.zeros([BLOCK], tl.int32)
    for s in range(0, V, BLOCK):
        offs = s + lanes
        ok = offs < V
        x, key = _scaled_keys(ptr, offs, ok, t)
        is_nan = x != x
        nan = tl.maximum(nan, is_nan.to(tl.int32))
        mx = tl.maximum(mx, tl.where(ok & ~is_nan, x, float("-inf")))
        kmax = tl.maximum(kmax, tl.where(is_nan, -2147483648, key))
        kmin = tl.minimum(kmin, tl.where(ok & ~is_nan, key, 2147483647))
    m = tl.max(mx, axis=0)
    key_max = tl.max(kmax, axis=0)
    key_min = tl.min(kmin, axis=0)
    bad = (tl.max(nan, axis=0) > 0) | (m == float("inf")) | (m == float("-inf"))
    thr = key_min
    thr_id = 2147483647
    if (t_raw != 0) & ~bad:
        m64 = m.to(tl.float64)
        # top-k: the k-th largest key T_k, and how many of the tokens equal to it are kept (the lowest ids)
        t_k = key_min
        j_k = V
        if k < V:
            q, c_gt = _search(ptr, V, t, m, key_min, key_max + 1, k, False, False, NP, BLOCK, GPU_MATH)
            t_k = q - 1
            j_k = k - c_gt
        w_k = _exp64(_value(t_k).to(tl.float64) - m64, GPU_MATH)
        q = key_max + 1
        if GUIDE < 2:
            if p < 1:
                # guided top-p search on fp32 weights against an fp32-exp estimate of the top-k mass
                z_gt = tl.zeros([BLOCK], tl.float32)
                n_eq = tl.zeros([BLOCK], tl.int32)
                for s in range(0, V, BLOCK):
                    offs = s + lanes
                    ok = offs < V
                    x, key = _scaled_keys(ptr, offs, ok, t)
                    z_gt += tl.where(key > t_k, tl.exp(x - m), 0.0)
                    n_eq += (key == t_k).to(tl.int32)
                z = tl.sum(z_gt.to(tl.float64), axis=0) + tl.minimum(j_k, tl.sum(n_eq, axis=0)).to(tl.float64) * w_k
                q, f_q = _search(ptr, V, t, m, t_k, key_max + 1, p.to(tl.float64) * z, True, GUIDE == 1, NP, BLOCK,
                                 GPU_MATH)
        # the exact pass (fp64 weights): the top-k mass, the masses at the guided answer, the min-p cut
        z_gt = tl.zeros([BLOCK], tl.float64)
        n_eq = tl.zeros([BLOCK], tl.int32)
        f_at = tl.zeros([BLOCK], tl.float64)
        f_below = tl.zeros([BLOCK], tl.float64)
        kmp = tl.full([BLOCK], 2147483647, tl.int32)
        for s in range(0, V, BLOCK):
            offs = s + lanes
            ok = offs < V
            x, key = _scaled_keys(ptr, offs, ok, t)
            if GPU_MATH:
                w = libdevice.exp(x.to(tl.float64) - m64)
            else:
                w = tl.exp(x.to(tl.float64) - m64)
            z_gt += tl.where(key > t_k, w, 0.0)
            n_eq += (key == t_k).to(tl.int32)
            f_at += tl.where(key >= q, w, 0.0)
            f_below += tl.where(key >= q - 1, w, 0.0)
            kmp = tl.minimum(kmp, tl.where(ok & (w >= mp.to(tl.float64)), key, 2147483647))
        z = tl.sum(z_gt, axis=0) + tl.minimum(j_k, tl.sum(n_eq, axis=0)).to(tl.float64) * w_k
        thr = t_k
        j = j_k
        if p < 1:
            pz = p.to(tl.float64) * z
            f_q = tl.sum(f_at, axis=0)
            f_lo = tl.where(q - 1 == t_k, z, tl.sum(f_below, axis=0))
            if (f_q >= pz) | (f_lo < pz):  # the fp32 guide was off by a rounding: search again in fp64
                q, f_q = _search(ptr, V, t, m, t_k, key_max + 1, pz, True, True, NP, BLOCK, GPU_MATH)
            t_p = q - 1
            w_p = _exp64(_value(t_p).to(tl.float64) - m64, GPU_MATH)
            # tokens equal to T_p are kept while the mass before them is < top_p * z: ceil((pz - F) / w_p) of them
            j_p = tl.minimum(tl.maximum(tl.math.ceil((pz - f_q) / w_p), 1.0), V * 1.0).to(tl.int32)
            j_p = tl.where(t_p == t_k, tl.minimum(j_p, j_k), j_p)
            if (t_p > thr) | ((t_p == thr) & (j_p < j)):
                thr = t_p
                j = j_p
        if mp > 0:
            t_mp = tl.min(kmp, axis=0)  # every token of the cut value is kept: same weight
            if t_mp > thr:
                thr = t_mp
                j = V
            if thr > key_max:  # min_p > 1: the top token only
                thr = key_max
                j = 1
        if j < V:
            # the j-th lowest id among the tokens at the cut value
            cnt = 0
            for s in range(0, V, BLOCK):
                offs = s + lanes
                ok = offs < V
                x, key = _scaled_keys(ptr, offs, ok, t)
                eq = (key == thr).to(tl.int32)
                hit = (eq > 0) & (cnt + tl.cumsum(eq, axis=0) == j)
                thr_id = tl.minimum(thr_id, tl.min(tl.where(hit, offs, 2147483647), axis=0))
                cnt += tl.sum(eq, axis=0)
    tl.store(key_out + row, thr)
    tl.store(id_out + row, thr_id)
    tl.store(bad_out + row, bad.to(tl.int32))


@triton.jit
def _race_part(ptr, offs, end, t, thr, thr_id, bits, best, idx, GPU_MATH: tl.constexpr):
    """One sub-tile of the race: x + Gumbel(bits) on kept tokens, -inf elsewhere; keeps each lane's first max."""
    ok = offs < end
    x, key = _scaled_keys(ptr, offs, ok, t)
    kept = ok & ((key > thr) | ((key == thr) & (offs <= thr_id)))
    u = ((bits >> 8).to(tl.float64) + 0.5) * 5.9604644775390625e-08  # (0, 1): 2^-24, exact
    if GPU_MATH:
        g = -libdevice.log(-libdevice.log(u))
    else:
        g = -tl.log(-tl.log(u))
    val = tl.where(kept, x + g.to(tl.float32), float("-inf"))
    better = ok & ((val > best) | (idx == 2147483647))
    return tl.where(better, val, best), tl.where(better, offs, idx)


@triton.jit
def _draw_kernel(logits_ptr, stride, V, temp_ptr, seed_ptr, step_ptr, key_ptr, id_ptr, bad_ptr, out_ptr, part_v_ptr,
                 part_i_ptr, chunk, SPLIT: tl.constexpr, LANES: tl.constexpr, GPU_MATH: tl.constexpr):
    """Program (row, c) runs the race over logits[row, c*chunk : (c+1)*chunk] (chunk a multiple of 4 LANES), or the
    plain argmax for greedy rows; SPLIT writes the partial (max, first id; NaN for a row answering V-1)."""
    row = tl.program_id(0)
    c = tl.program_id(1)
    ptr = logits_ptr + row.to(tl.int64) * stride
    t_raw = tl.load(temp_ptr + row).to(tl.float32)
    greedy = t_raw == 0
    t = tl.where(greedy, 1.0, t_raw)
    seed = tl.load(seed_ptr + row).to(tl.int64)
    step = tl.load(step_ptr + row).to(tl.int64)
    thr = tl.load(key_ptr + row)
    thr_id = tl.load(id_ptr + row)
    start = c * chunk
    end = tl.minimum(start + chunk, V)
    lanes = tl.arange(0, LANES)
    best = tl.full([LANES], float("-inf"), tl.float32)
    idx = tl.full([LANES], 2147483647, tl.int32)
    nan = tl.zeros([LANES], tl.int32)
    zero = tl.zeros([LANES], tl.uint32)
    s_lo = zero + (step & 0xFFFFFFFF).to(tl.uint32)
    s_hi = zero + ((step >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for s in range(start, end, 4 * LANES):
        if greedy:
            for q in tl.static_range(4):
                offs = s + q * LANES + lanes
                ok = offs < end
                x = tl.load(ptr + offs, mask=ok, other=float("-inf")).to(tl.float32)
                is_nan = x != x
                nan = tl.maximum(nan, is_nan.to(tl.int32))
                x = tl.where(is_nan, float("-inf"), x)
                better = ok & ((x > best) | (idx == 2147483647))
                best = tl.where(better, x, best)
                idx = tl.where(better, offs, idx)
        else:
            # token s + q LANES + lane takes word q of Philox at counter s / 4 + lane (see sampling.counter_gumbel)
            r0, r1, r2, r3 = tl.philox(seed, (s // 4 + lanes).to(tl.uint32), s_lo, s_hi, zero)
            best, idx = _race_part(ptr, s + lanes, end, t, thr, thr_id, r0, best, idx, GPU_MATH)
            best, idx = _race_part(ptr, s + LANES + lanes, end, t, thr, thr_id, r1, best, idx, GPU_MATH)
            best, idx = _race_part(ptr, s + 2 * LANES + lanes, end, t, thr, thr_id, r2, best, idx, GPU_MATH)
            best, idx = _race_part(ptr, s + 3 * LANES + lanes, end, t, thr, thr_id, r3, best, idx, GPU_MATH)
    m = tl.max(best, axis=0)
    first = tl.min(tl.where(best == m, idx, 2147483647), axis=0)
    to_last = tl.where(greedy, tl.max(nan, axis=0) > 0, tl.load(bad_ptr + row) > 0)
    if SPLIT:
        tl.store(part_v_ptr + row * tl.num_programs(1) + c, tl.where(to_last, float("nan"), m))
        tl.store(part_i_ptr + row * tl.num_programs(1) + c, first)
    else:
        tl.store(out_ptr + row, tl.where(to_last, V - 1, first).to(out_ptr.dtype.element_ty))


def thresholds(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept set of each row as (key [R] int32, id [R] int32, bad [R] int32): token i of row r is kept when
    ``key(x) > key[r]`` or ``key(x) == key[r] and i <= id[r]``, x = logits / T (:func:`order_key`); bad rows
    (a NaN, or max +-inf) have no kept set. Greedy rows (T = 0) get bad only."""
    r, v = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    key = torch.empty(r, dtype=torch.int32, device=logits.device)
    tid = torch.empty_like(key)
    bad = torch.empty_like(key)
    if r:
        _filter_kernel[(r,)](logits, logits.stride(0), v, temperature, top_k, top_p, min_p, key, tid, bad,
                             BLOCK=_FILTER_BLOCK, NP=_NP, GUIDE=_GUIDE, GPU_MATH=logits.is_cuda, num_warps=8)
    return key, tid, bad


def order_key(x: torch.Tensor) -> torch.Tensor:
    """The int32 order key of fp32 values (the kernels' map: -0 as +0, then the sign-magnitude bits flipped so that
    integer order is float order)."""
    b = torch.where(x == 0, 0.0, x.float()).view(torch.int32)
    return torch.where(b < 0, b ^ 0x7FFFFFFF, b)


def kept_mask(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
              min_p: torch.Tensor) -> torch.Tensor:
    """[R, V] bool kept set from :func:`thresholds` (for tests: equals ``filter_mask(logits / T, ...)``)."""
    key, tid, _ = thresholds(logits, temperature, top_k, top_p, min_p)
    t = torch.where(temperature == 0, 1.0, temperature.float()).view(-1, 1)
    k = order_key(logits.float() / t)
    ids = torch.arange(logits.shape[1], device=logits.device)
    return (k > key.view(-1, 1)) | ((k == key.view(-1, 1)) & (ids <= tid.view(-1, 1)))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.sampling.sample_seeded` (same arguments, same tokens): two launches (three when
    rows split), no sort, no host sync, capturable in a CUDA graph.

    Args:
        logits: [R, V] fp32/bf16 (rows contiguous); temperature, top_p, min_p: [R] fp32; top_k: [R] int;
        seeds, steps: [R] int64 (a request's seed and how many tokens it has sampled).
        out: optional preallocated [R] int32/int64 buffer.
    Returns:
        [R] token ids (``out`` when given, else int64).
    """
    r, v = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if out is None:
        out = torch.empty(r, dtype=torch.int64, device=logits.device)
    if r == 0:
        return out
    key, tid, bad = thresholds(logits, temperature, top_k, top_p, min_p)
    lanes = ref.PHILOX_LANES
    tiles = triton.cdiv(v, 4 * lanes)
    per = triton.cdiv(tiles, max(1, min(tiles, triton.cdiv(_TARGET_PROGRAMS, r))))
    chunk, nsplit = per * 4 * lanes, triton.cdiv(tiles, per)
    args = (logits, logits.stride(0), v, temperature, seeds, steps, key, tid, bad, out)
    if nsplit == 1:
        _draw_kernel[(r, 1)](*args, out, out, chunk, SPLIT=False, LANES=lanes, GPU_MATH=logits.is_cuda, num_warps=4)
        return out
    part_v = torch.empty((r, nsplit), dtype=torch.float32, device=logits.device)
    part_i = torch.empty((r, nsplit), dtype=torch.int32, device=logits.device)
    _draw_kernel[(r, nsplit)](*args, part_v, part_i, chunk, SPLIT=True, LANES=lanes, GPU_MATH=logits.is_cuda,
                              num_warps=4)
    _greedy_reduce_kernel[(r,)](part_v, part_i, out, v, nsplit, BLOCK_S=triton.next_power_of_2(nsplit), num_warps=1)
    return out
