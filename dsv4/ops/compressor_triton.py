"""Triton kernels for the KV compressors' update (reference: :func:`dsv4.ops.compressor.compress_update`).

Two launches, both over device tensors only (no host sync, so a decode step can be captured in a graph):

* ``_emit_kernel``, one program per token of the flat batch: a token that closes a window (``(p + 1) % m ==
  0``) pools that window's rows (online softmax over row blocks, fp32), reading each row from this batch or,
  for positions before the request's prefix, from the slot's ring of tail rows (row ``q % S``, the layout of
  :mod:`dsv4.ops.compressor`); then casts to the pool dtype, RMSNorms, ropes at the window's first position,
  runs the quantisation simulation and stores the entry through the page table (:func:`_store_entry`, the one
  place that knows the pool's format). Other tokens exit at once.
* ``_tail_kernel``, one program per (request, channel block): stores the request's last ``min(S, n)`` rows at
  their ring rows. It runs after the emit launch, because a stored row may replace a position that an emitter
  of the same request still reads (the read-before-write hazard).

A pure decode batch (T == R, a static shape fact) needs one launch: each program owns its request and stores
its token's row before emitting, since that row replaces position ``p - S``, older than any the emit reads.

Rounding points follow the reference: pooled fp32 -> pool dtype; the norm in fp32 rounded once; rope in
fp32 from the rounded values, rounded again; FP8 / Hadamard + FP4 from those values, bit-exact with
:mod:`dsv4.ops.quant` given the same inputs. The softmax is an online one (a per-channel running max), so
pooled values differ from the reference's by fp32 rounding only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops import pdl
from dsv4.ops.compressor import INDEX_QUANT_BLOCK, KV_QUANT_BLOCK, QUANT_MODES
from dsv4.ops.kv_fp8 import Fp8KV
from dsv4.ops.pdl import enter as pdl_enter
from dsv4.ops.quant_triton import pow2_scale

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_QUANT = {None: 0, "fp8": 1, "fp4": 2}
_POOL_ELEMS = 4096  # rows x channels of one pooling block: the emit program's register budget
_TAIL_BLOCK_C = 128
_TAIL_ELEMS = 2048  # rows x channels per tail block


@triton.jit
def _request_of(starts_ptr, t, R, LOG_R: tl.constexpr):
    """Index of the request that owns flat row ``t``: the last r with starts[r] <= t (starts ascending)."""
    lo = t * 0
    hi = lo + R
    for _ in tl.static_range(LOG_R):
        mid = (lo + hi) // 2
        go = tl.load(starts_ptr + mid) <= t
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _pool_segment(kv_ptr, sc_ptr, ape_ptr, kvs_ptr, scs_ptr, q0, ch_off, p0, s, slot, mx, l, acc,
                  M: tl.constexpr, C: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, STATE_ROWS: tl.constexpr,
                  ROWS: tl.constexpr):
    """Fold the M rows at positions q0.. (channels ch_off..ch_off+D) into the running softmax (mx, l, acc);
    positions before the prefix p0 come from the slot's ring, row q % STATE_ROWS."""
    ch = tl.arange(0, D_P)
    chm = ch < D
    for b in range(0, M, ROWS):
        j = b + tl.arange(0, ROWS)
        q = q0 + j
        in_batch = (j < M) & (q >= p0)
        in_state = (j < M) & (q < p0)
        # q >= -M and Triton's % of a negative int is C's (negative): shift first
        qm = (q + M) % M
        srow = (q + STATE_ROWS) % STATE_ROWS
        boff = (s + q - p0).to(tl.int64)[:, None] * C + ch_off + ch[None, :]
        soff = (slot.to(tl.int64) * STATE_ROWS + srow)[:, None] * C + ch_off + ch[None, :]
        mb = in_batch[:, None] & chm[None, :]
        ms = in_state[:, None] & chm[None, :]
        kv = tl.where(mb, tl.load(kv_ptr + boff, mask=mb, other=0.0).to(tl.float32),
                      tl.load(kvs_ptr + soff, mask=ms, other=0.0))
        z = tl.load(sc_ptr + boff, mask=mb, other=0.0).to(tl.float32)
        z += tl.load(ape_ptr + qm[:, None] * C + ch_off + ch[None, :], mask=mb, other=0.0)
        sc = tl.where(mb, z, tl.load(scs_ptr + soff, mask=ms, other=float("-inf")))
        new = tl.maximum(mx, tl.max(sc, axis=0))
        base = tl.where(new == float("-inf"), 0.0, new)  # all -inf so far: keep exp() away from -inf - -inf
        alpha = tl.exp(mx - base)
        p = tl.exp(sc - base[None, :])
        l = l * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p * kv, axis=0)
        mx = new
    return mx, l, acc


@triton.jit
def _hadamard(y, D: tl.constexpr, LOG_D: tl.constexpr):
    """Normalised Sylvester Walsh-Hadamard transform of y [D] fp32, the reference's butterfly order."""
    for i in tl.static_range(LOG_D):
        # pair element k with k + h inside each chunk of 2h, h = 2^i
        pairs = tl.permute(tl.reshape(y, [D >> (i + 1), 2, 1 << i]), [0, 2, 1])
        a, b = tl.split(pairs)
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), [0, 2, 1]), [D])
    return y * (D**-0.5)


@triton.jit
def _fp4_sim(y, D: tl.constexpr, QB: tl.constexpr):
    """e2m1 with power-of-two scales per QB elements: (e2m1(y / s) * s) fp32, as quant.fp4_act_quant_sim."""
    g = tl.reshape(y, [D // QB, QB])
    amax = tl.maximum(tl.max(tl.abs(g), axis=1), 6.0 * 2.0**-126)
    bits = (amax * (1.0 / 6.0)).to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    scale = ((e + 127) << 23).to(tl.float32, bitcast=True)[:, None]
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)[:, None]
    v = tl.minimum(tl.maximum(g * inv, -6.0), 6.0)
    mag = tl.abs(v)
    # nearest e2m1 magnitude; at a midpoint the one with the even code wins (0.75 -> 1, 1.25 -> 1, ...)
    val = tl.where(mag > 5.0, 6.0, tl.where(mag >= 3.5, 4.0, tl.where(mag > 2.5, 3.0, tl.where(
        mag >= 1.75, 2.0, tl.where(mag > 1.25, 1.5, tl.where(mag >= 0.75, 1.0, tl.where(mag > 0.25, 0.5, 0.0)))))))
    # the sign bit, applied by a product: -0.0 as in the reference (Triton's unary minus is 0 - x)
    sign = tl.where(v.to(tl.int32, bitcast=True) < 0, -1.0, 1.0)
    return tl.reshape(val * sign * scale, [D])


@triton.jit
def _fp8_nope_sim(y, ch, NOPE: tl.constexpr, D_P: tl.constexpr, QB: tl.constexpr, DT: tl.constexpr):
    """Round y[:NOPE] through e4m3 in blocks of QB (a short last block as if zero-padded); rest unchanged."""
    is_nope = ch < NOPE
    a = tl.reshape(tl.where(is_nope, tl.abs(y), 0.0), [D_P // QB, QB])
    scale, inv, _ = pow2_scale(tl.maximum(tl.max(a, axis=1), 1e-4))
    scale = tl.reshape(tl.broadcast_to(scale[:, None], [D_P // QB, QB]), [D_P])
    inv = tl.reshape(tl.broadcast_to(inv[:, None], [D_P // QB, QB]), [D_P])
    q = tl.minimum(tl.maximum(y * inv, -448.0), 448.0).to(tl.float8e4nv).to(tl.float32) * scale
    return tl.where(is_nope, q.to(DT).to(tl.float32), y)


@triton.jit
def _store_entry(pool_ptr, psc_ptr, prope_ptr, table_ptr, slot, index, max_pages, y, ch, D: tl.constexpr,
                 PAGE: tl.constexpr, POOL_FP8: tl.constexpr, NOPE: tl.constexpr, NSC: tl.constexpr,
                 DT: tl.constexpr):
    """The compressed-entry store: entry ``index`` of ``slot`` at pool[table[slot, index // PAGE], index % PAGE].
    POOL_FP8: an FP8 store (dsv4.ops.kv_fp8: e4m3 nope dims at pool_ptr, e8m0 bytes per 64 at psc_ptr, rope dims
    at prope_ptr), quantised here from the entry rounded to DT (the rule of the FP8 simulation)."""
    page = tl.load(table_ptr + slot * max_pages + index // PAGE).to(tl.int64)
    row = page * PAGE + index % PAGE
    if POOL_FP8:
        y = y.to(DT).to(tl.float32)
        is_nope = ch < NOPE
        q8 = tl.zeros_like(y)
        for g in tl.static_range(NSC):
            sel = is_nope & (ch // 64 == g)
            scale, inv, byte = pow2_scale(tl.maximum(tl.max(tl.where(sel, tl.abs(y), 0.0)), 1e-4))
            tl.store(psc_ptr + row * NSC + g, byte)
            q8 = tl.where(sel, tl.minimum(tl.maximum(y * inv, -448.0), 448.0), q8)
        tl.store(pool_ptr + row * NOPE + ch, q8.to(tl.float8e4nv), mask=is_nope)
        tl.store(prope_ptr + row * (D - NOPE) + ch - NOPE, y.to(DT), mask=(ch >= NOPE) & (ch < D))
    else:
        tl.store(pool_ptr + row * D + ch, y.to(pool_ptr.dtype.element_ty), mask=ch < D)


@triton.jit
def _emit(kv_ptr, sc_ptr, ape_ptr, w_ptr, freq_ptr, kvs_ptr, scs_ptr, pool_ptr, psc_ptr, prope_ptr, table_ptr, eps,
          max_pages, pos, p0, s, slot, M: tl.constexpr, C: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
          OVERLAP: tl.constexpr, ROWS: tl.constexpr, ROPE_HALF: tl.constexpr, QUANT: tl.constexpr,
          QB8: tl.constexpr, QB4: tl.constexpr, LOG_D: tl.constexpr, PAGE: tl.constexpr, DT: tl.constexpr,
          POOL_FP8: tl.constexpr, NSC: tl.constexpr, STATE_ROWS: tl.constexpr, pooled_ptr, t,
          PRE_POOLED: tl.constexpr):
    """Pool, finish and store the entry of the window that token ``pos`` closes (PRE_POOLED: the pooled row
    was written by :func:`_pool_kernel` at pooled_ptr[t])."""
    start = pos + 1 - M
    ch = tl.arange(0, D_P)
    chm = ch < D
    mx = tl.full([D_P], float("-inf"), tl.float32)
    l = tl.zeros([D_P], tl.float32)
    acc = tl.zeros([D_P], tl.float32)
    if PRE_POOLED:
        e = tl.load(pooled_ptr + t.to(tl.int64) * D + ch, mask=chm, other=0.0).to(DT).to(tl.float32)
    elif OVERLAP:
        # first halves of the previous window's rows, second halves of this window's
        mx, l, acc = _pool_segment(kv_ptr, sc_ptr, ape_ptr, kvs_ptr, scs_ptr, start - M, 0, p0, s, slot, mx, l, acc,
                                   M, C, D, D_P, STATE_ROWS, ROWS)
        mx, l, acc = _pool_segment(kv_ptr, sc_ptr, ape_ptr, kvs_ptr, scs_ptr, start, D, p0, s, slot, mx, l, acc,
                                   M, C, D, D_P, STATE_ROWS, ROWS)
    else:
        mx, l, acc = _pool_segment(kv_ptr, sc_ptr, ape_ptr, kvs_ptr, scs_ptr, start, 0, p0, s, slot, mx, l, acc,
                                   M, C, D, D_P, STATE_ROWS, ROWS)
    if not PRE_POOLED:
        e = tl.where(chm, acc / tl.where(chm, l, 1.0), 0.0).to(DT).to(tl.float32)

    r = tl.rsqrt(tl.sum(e * e, axis=0) / D + eps)
    w = tl.load(w_ptr + ch, mask=chm, other=0.0)
    y = (w * (e * r)).to(DT).to(tl.float32)

    # rope on the trailing 2 * ROPE_HALF channels, interleaved pairs, at the window's first position
    ev, od = tl.split(tl.reshape(y, [D_P // 2, 2]))
    i = tl.arange(0, D_P // 2)
    k = i - (D // 2 - ROPE_HALF)
    is_rope = (k >= 0) & (i < D // 2)
    angle = start.to(tl.float32) * tl.load(freq_ptr + k, mask=is_rope, other=0.0)
    c = tl.cos(angle)
    sn = tl.sin(angle)
    ev2 = (ev * c - od * sn).to(DT).to(tl.float32)
    od2 = (ev * sn + od * c).to(DT).to(tl.float32)
    y = tl.reshape(tl.join(tl.where(is_rope, ev2, ev), tl.where(is_rope, od2, od)), [D_P])

    if QUANT == 1:
        y = _fp8_nope_sim(y, ch, D - 2 * ROPE_HALF, D_P, QB8, DT)
    elif QUANT == 2:
        y = _hadamard(y, D, LOG_D).to(DT).to(tl.float32)
        y = _fp4_sim(y, D, QB4)
    _store_entry(pool_ptr, psc_ptr, prope_ptr, table_ptr, slot, pos // M, max_pages, y, ch, D, PAGE, POOL_FP8,
                 D - 2 * ROPE_HALF, NSC, DT)


@triton.jit
def _token_row(kv_ptr, sc_ptr, ape_ptr, t, pos, M: tl.constexpr, C: tl.constexpr, C_P: tl.constexpr):
    """Token t's kv and biased score rows [C_P] fp32 (padding 0)."""
    cc = tl.arange(0, C_P)
    cm = cc < C
    kv = tl.load(kv_ptr + t.to(tl.int64) * C + cc, mask=cm, other=0.0).to(tl.float32)
    z = tl.load(sc_ptr + t.to(tl.int64) * C + cc, mask=cm, other=0.0).to(tl.float32)
    return kv, z + tl.load(ape_ptr + (pos % M) * C + cc, mask=cm, other=0.0)


@triton.jit
def _store_token_row(kvs_ptr, scs_ptr, kv, z, pos, slot, C: tl.constexpr, C_P: tl.constexpr,
                     STATE_ROWS: tl.constexpr):
    """Store one token's rows (kv, z) at its ring row pos % STATE_ROWS."""
    cc = tl.arange(0, C_P)
    off = (slot.to(tl.int64) * STATE_ROWS + pos % STATE_ROWS) * C + cc
    tl.store(kvs_ptr + off, kv, mask=cc < C)
    tl.store(scs_ptr + off, z, mask=cc < C)


@triton.jit
def _emit_kernel(kv_ptr, sc_ptr, ape_ptr, w_ptr, freq_ptr, pos_ptr, slots_ptr, p0_ptr, starts_ptr, kvs_ptr,
                 scs_ptr, pool_ptr, psc_ptr, prope_ptr, table_ptr, eps, R, max_pages, M: tl.constexpr, C: tl.constexpr,
                 C_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, OVERLAP: tl.constexpr,
                 ROWS: tl.constexpr, ROPE_HALF: tl.constexpr, QUANT: tl.constexpr, QB8: tl.constexpr,
                 QB4: tl.constexpr, LOG_D: tl.constexpr, PAGE: tl.constexpr, DT: tl.constexpr,
                 LOG_R: tl.constexpr, DECODE: tl.constexpr, POOL_FP8: tl.constexpr, NSC: tl.constexpr,
                 STATE_ROWS: tl.constexpr, pooled_ptr, PRE_POOLED: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    t = tl.program_id(0)
    if DECODE:
        r = t
    else:
        r = _request_of(starts_ptr, t, R, LOG_R)
    pos = tl.load(pos_ptr + t)
    p0 = tl.load(p0_ptr + r)
    s = tl.load(starts_ptr + r)
    slot = tl.load(slots_ptr + r)
    if DECODE:
        # the token's ring row held position pos - STATE_ROWS, older than any row the emit reads: store it first,
        # so the common decode path (no window closes) is one load and one store
        kv_t, z_t = _token_row(kv_ptr, sc_ptr, ape_ptr, t, pos, M, C, C_P)
        _store_token_row(kvs_ptr, scs_ptr, kv_t, z_t, pos, slot, C, C_P, STATE_ROWS)
    if (pos + 1) % M == 0:
        _emit(kv_ptr, sc_ptr, ape_ptr, w_ptr, freq_ptr, kvs_ptr, scs_ptr, pool_ptr, psc_ptr,
              prope_ptr, table_ptr, eps, max_pages, pos, p0, s, slot, M, C, D, D_P, OVERLAP, ROWS, ROPE_HALF, QUANT,
              QB8, QB4, LOG_D, PAGE, DT, POOL_FP8, NSC, STATE_ROWS, pooled_ptr, t, PRE_POOLED)


@triton.jit
def _pool_kernel(kv_ptr, sc_ptr, ape_ptr, pos_ptr, slots_ptr, p0_ptr, starts_ptr, kvs_ptr, scs_ptr, out_ptr, R,
                 M: tl.constexpr, C: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
                 LOG_R: tl.constexpr, DECODE: tl.constexpr, STATE_ROWS: tl.constexpr, PDL: tl.constexpr):
    """One program per (token, channel block) of a non-overlapping compressor: a token that closes a window
    pools channels cb*BLOCK_C.. of it (the same online softmax as the emit's) into out[t] fp32, so a long
    window (HCA) is pooled by D / BLOCK_C programs instead of one."""
    pdl_enter(PDL)
    t, cb = tl.program_id(0), tl.program_id(1)
    if DECODE:
        r = t
    else:
        r = _request_of(starts_ptr, t, R, LOG_R)
    pos = tl.load(pos_ptr + t)
    if (pos + 1) % M == 0:
        p0 = tl.load(p0_ptr + r)
        s = tl.load(starts_ptr + r)
        slot = tl.load(slots_ptr + r)
        mx = tl.full([BLOCK_C], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_C], tl.float32)
        acc = tl.zeros([BLOCK_C], tl.float32)
        mx, l, acc = _pool_segment(kv_ptr, sc_ptr, ape_ptr, kvs_ptr, scs_ptr, pos + 1 - M, cb * BLOCK_C, p0, s,
                                   slot, mx, l, acc, M, C, BLOCK_C, BLOCK_C, STATE_ROWS, ROWS)
        ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        tl.store(out_ptr + t.to(tl.int64) * D + ch, acc / l)


@triton.jit
def _tail_kernel(kv_ptr, sc_ptr, ape_ptr, slots_ptr, p0_ptr, n_ptr, starts_ptr, kvs_ptr, scs_ptr,
                 M: tl.constexpr, C: tl.constexpr, STATE_ROWS: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """One program per (request, channel block): the request's last min(STATE_ROWS, n) positions' rows at ring
    rows q % STATE_ROWS. Runs after the emit launch, whose ring reads these stores may replace."""
    pdl_enter(PDL)
    r, cb = tl.program_id(0), tl.program_id(1)
    p0 = tl.load(p0_ptr + r)
    s = tl.load(starts_ptr + r)
    slot = tl.load(slots_ptr + r)
    end = p0 + tl.load(n_ptr + r)
    cc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = (cc < C)[None, :]
    for b in range(0, STATE_ROWS, ROWS):
        j = b + tl.arange(0, ROWS)
        q = end - STATE_ROWS + j
        ok = (j < STATE_ROWS) & (q >= p0)
        q = tl.where(ok, q, p0)  # keeps masked lanes' addresses in range
        mask = ok[:, None] & cm
        boff = (s + q - p0).to(tl.int64)[:, None] * C + cc[None, :]
        kv = tl.load(kv_ptr + boff, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(sc_ptr + boff, mask=mask, other=0.0).to(tl.float32)
        z += tl.load(ape_ptr + (q % M)[:, None] * C + cc[None, :], mask=mask, other=0.0)
        dst = (slot.to(tl.int64) * STATE_ROWS + q % STATE_ROWS)[:, None] * C + cc[None, :]
        tl.store(kvs_ptr + dst, kv, mask=mask)
        tl.store(scs_ptr + dst, z, mask=mask)


# Launch shapes by window kind (rows per window m, entry dims d, overlapping Ca/Cb windows or not); the
# alternatives bench_compressor.py sweeps are in CANDIDATES, and its winners are what belongs here.
# pool_split: non-overlapping windows of at least SPLIT_MIN_M rows (HCA) are pooled by d / pool_block_c
# programs per closing token (_pool_kernel, pool_elems rows x channels per step, pool_warps warps) before the
# emit finishes the entry; otherwise the emit program pools the whole window itself (num_warps warps).
SPLIT_MIN_M = 64
DEFAULTS = {
    "short": dict(pool_split=False, pool_block_c=64, pool_elems=2048, pool_warps=4, num_warps=4),
    "long": dict(pool_split=True, pool_block_c=64, pool_elems=2048, pool_warps=4, num_warps=8),
}
CANDIDATES = {"long": [dict(pool_split=False), dict(pool_block_c=32), dict(pool_block_c=128),
                       dict(pool_elems=4096, pool_warps=8), dict(pool_block_c=32, pool_elems=1024)]}


def default_config(m: int, d: int, overlap: bool) -> dict:
    """The DEFAULTS row of a compressor with windows of m rows (static sizes only)."""
    return dict(DEFAULTS["long" if m >= SPLIT_MIN_M and not overlap else "short"])


def compress_update(
    kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    inv_freq: torch.Tensor, quant: str | None, positions: torch.Tensor, slots: torch.Tensor,
    prefix_lens: torch.Tensor, extend_lens: torch.Tensor, starts: torch.Tensor, kv_state: torch.Tensor,
    score_state: torch.Tensor, pool: torch.Tensor | Fp8KV, table: torch.Tensor, config: dict | None = None,
) -> None:
    """Kernel for :func:`dsv4.ops.compressor.compress_update` (same arguments, same in-place effects; ``config``
    overrides :func:`default_config`, for benchmarks and tests)."""
    fp8 = isinstance(pool, Fp8KV)
    parts = tuple(pool) if fp8 else (pool, pool, pool)
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
    t, r = positions.shape[0], slots.shape[0]
    m, d, ch = ape.shape[0], norm_weight.shape[0], kv.shape[1]
    overlap = ch == 2 * d
    d_p = triton.next_power_of_2(d)
    if quant == "fp4" and (d != d_p or d % INDEX_QUANT_BLOCK):
        raise ValueError(f"the FP4 simulation needs a power-of-two head dim >= {INDEX_QUANT_BLOCK}, got {d}")
    if t == 0:
        return
    m_p = triton.next_power_of_2(m)
    ring = kv_state.shape[1]
    if ring < (1 + overlap) * m:
        raise ValueError(f"the compressor tails need at least {(1 + overlap) * m} rows per slot, got {ring}")
    kv, score, ape = kv.contiguous(), score.contiguous(), ape.contiguous()
    state = (kv_state, score_state)
    if not all(x.is_contiguous() for x in (*state, *parts, table)):
        raise ValueError("compress_update writes kv_state, score_state, pool and table in place: pass them contiguous")
    decode = t == r  # every request has >= 1 token, so this is a decode-shaped batch: one program per request
    cfg = default_config(m, d, overlap) | (config or {})
    pre = bool(cfg["pool_split"]) and not overlap and d % cfg["pool_block_c"] == 0
    warps = cfg["num_warps"]
    pooled = kv  # unused unless pre-pooled
    if pre:
        bc = cfg["pool_block_c"]
        pooled = torch.empty((t, d), dtype=torch.float32, device=kv.device)
        _pool_kernel[(t, d // bc)](
            kv, score, ape, positions, slots, prefix_lens, starts, kv_state, score_state, pooled, r, M=m, C=ch, D=d,
            BLOCK_C=bc, ROWS=max(1, min(m_p, cfg["pool_elems"] // bc)), LOG_R=max(1, (r - 1).bit_length()),
            DECODE=decode, STATE_ROWS=ring, num_warps=cfg["pool_warps"], **pdl.launch(kv.device))
    _emit_kernel[(t,)](
        kv, score, ape, norm_weight.float().contiguous(), inv_freq.float().contiguous(), positions,
        slots, prefix_lens, starts, kv_state, score_state, *parts, table, eps, r, table.shape[1], M=m, C=ch,
        C_P=triton.next_power_of_2(ch), D=d, D_P=d_p, OVERLAP=overlap,
        ROWS=max(1, min(m_p, _POOL_ELEMS * warps // 4 // d_p)), ROPE_HALF=inv_freq.shape[0], QUANT=_QUANT[quant],
        QB8=min(KV_QUANT_BLOCK, d_p), QB4=INDEX_QUANT_BLOCK, LOG_D=max(0, d_p.bit_length() - 1),
        PAGE=pool.shape[1], DT=_TL[pool.dtype], LOG_R=max(1, (r - 1).bit_length()), DECODE=decode, POOL_FP8=fp8,
        NSC=parts[1].shape[-1] if fp8 else 1, STATE_ROWS=ring, pooled_ptr=pooled, PRE_POOLED=pre, num_warps=warps,
        **pdl.launch(kv.device))
    if not decode:
        _tail_kernel[(r, triton.cdiv(ch, _TAIL_BLOCK_C))](
            kv, score, ape, slots, prefix_lens, extend_lens, starts, kv_state, score_state, M=m, C=ch,
            STATE_ROWS=ring, ROWS=min(triton.next_power_of_2(ring), _TAIL_ELEMS // _TAIL_BLOCK_C),
            BLOCK_C=_TAIL_BLOCK_C, **pdl.launch(kv.device))
