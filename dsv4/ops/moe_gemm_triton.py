"""One expert's GEMM K loop for the Triton routed experts (:mod:`dsv4.ops.moe_triton`), reading the weights in
their stored form: :func:`_gemm` (A @ Wa^T, and A @ Wb^T for gate/up, over a K range of a row block of gathered
activations) and the Triton helpers it inlines: the FP4 word decode, the per-group e4m3 products, the scale loads
one step ahead and the activation quantization on load.

Weight forms (:class:`dsv4.ops.moe.ExpertWeights`), a constexpr each for the routed and the shared stack:
dense (the model dtype); FP8 (e4m3, one fp32 scale per 128x128 block: a BN x BK tile lies inside one block, so
the scale is one scalar per K step, applied to the partial product: a power of two, exact); FP4 (packed e2m1
pairs, read as int32 words of eight codes, a scale per 32 inputs: fp32, or e8m0 bytes read as they are, a
quarter of the scale traffic): each word is decoded by a few integer ops on all its codes at once
(:func:`_fp4_f16`, :func:`_fp4_e4m3`), with contiguous loads the pipeliner stages in shared memory.

``act_quant`` quantizes each 128-column slice of a gathered activation row on load, exactly as
:func:`dsv4.ops.quant.act_quant` (amax floored at 1e-4, power-of-two scale, e4m3 round to nearest even).
The products are then an e4m3 x e4m3 MMA scaled per row and block (``fp8_dot``, FP8 weights), four e4m3 MMAs
per step, one per 32-column scale group with the group's scale on its partial (``fp4_dot``, FP4 weights), or
the exactly dequantized values in the model dtype (e4m3 or e2m1 times a power of two fits bf16): all equal the
native block-scaled product up to accumulation order. Scales, which feed no MMA operand and so are not staged by
the pipeliner, are loaded one K step ahead. With ``A_Q`` the activations arrive already quantized (e4m3 codes,
e8m0 scales per 128 columns: ``prequant`` in :mod:`dsv4.ops.moe_triton`) and are used as they are.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dsv4.ops.quant_triton import pow2_scale


@triton.jit
def _f16_pairs(e):
    """int32 words, each two fp16 bit patterns -> fp16 [..., 2] (low half first)."""
    return tl.join((e & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True),
                   (e >> 16).to(tl.int16).to(tl.float16, bitcast=True))


@triton.jit
def _bytes4(v):
    """int32 words -> their bytes, uint8 [..., 4] (lowest first)."""
    return tl.join(tl.join((v & 0xFF).to(tl.uint8), ((v >> 16) & 0xFF).to(tl.uint8)),
                   tl.join(((v >> 8) & 0xFF).to(tl.uint8), ((v >> 24) & 0xFF).to(tl.uint8)))


# FP4 decode works on int32 words of eight packed e2m1 codes (columns 8w..8w+7, even column in the low nibble),
# four or eight values per integer op instead of one: the code's exponent and mantissa bits (s e1 e0 m) placed at
# the low exponent bits of a wider float are the e2m1 value with that float's bias instead of e2m1's (1), its
# subnormal 0.5 included: in fp16 (bits 9-11, sign 15) the value times 2^-14, in e4m3 (bits 2-4, sign 7) times
# 2^-6. The callers fold the power of two into the scale. Decode is the critical path of the memory-bound FP4
# GEMMs (the SASS of a per-byte decode spent ~18 instructions per weight; this one ~5 with the MMA included).
@triton.jit
def _fp4_f16(x, BN: tl.constexpr, W: tl.constexpr):
    """Words x int32 [BN, W] -> fp16 [BN, 8W] in column order, each the e2m1 value times 2^-14."""
    e0 = ((x & 0x00070007) << 9) | ((x & 0x00080008) << 12)  # nibbles 0 and 4: columns 0 and 4
    e1 = ((x & 0x00700070) << 5) | ((x & 0x00800080) << 8)
    e2 = ((x & 0x07000700) << 1) | ((x & 0x08000800) << 4)
    e3 = ((x >> 3) & 0x0E000E00) | (x & -0x7FFF8000)  # 0x80008000
    w = tl.join(tl.join(_f16_pairs(e0), _f16_pairs(e2)), tl.join(_f16_pairs(e1), _f16_pairs(e3)))
    return tl.reshape(w, (BN, 8 * W))  # index 8w + 4 half + 2 (k >> 1) + (k & 1) = column of nibble k + 4 half


@triton.jit
def _fp4_e4m3(x, BN: tl.constexpr, W: tl.constexpr):
    """Words x int32 [BN, W] -> e4m3 [BN, 8W] in column order, each the e2m1 value times 2^-6."""
    lo = ((x & 0x07070707) << 2) | ((x & 0x08080808) << 4)  # the even columns, one per byte
    hi = ((x >> 2) & 0x1C1C1C1C) | (x & -0x7F7F7F80)  # the odd ones (0x80808080: the sign bits in place)
    return tl.reshape(tl.join(_bytes4(lo), _bytes4(hi)), (BN, 8 * W)).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _e8m0(b):
    """e8m0 bytes -> fp32 2^(b - 127), exact (byte 0: 0.0 instead of 2^-127, the masked value)."""
    return (b.to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _group_scales(s_ptr, mask):
    """FP4 group scales at ``s_ptr`` as fp32 (0 where masked): fp32 as stored, or e8m0 bytes (uint8, a quarter of
    the bytes) decoded exactly."""
    if s_ptr.dtype.element_ty == tl.uint8:
        return _e8m0(tl.load(s_ptr, mask=mask, other=0))
    return tl.load(s_ptr, mask=mask, other=0.0)


@triton.jit
def _fp4_tile(w_ptr, s_ptr, rows, n_ok, K, k0, BN: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr):
    """Rows ``rows`` [BN] (int64) of a packed FP4 matrix (int32 words [*, K/8]) with scales [*, K/32] (fp32 or
    e8m0 bytes), columns k0..k0+BK-1, dequantized exactly into DT [BN, BK]."""
    c = tl.arange(0, BK // 8)
    w = tl.load(w_ptr + rows[:, None] * (K // 8) + (k0 // 8 + c)[None, :],
                mask=n_ok[:, None] & ((k0 + 32 * (c // 4)) < K)[None, :], other=0)  # whole 32-column groups
    g = k0 // 32 + tl.arange(0, BK // 32)
    s = _group_scales(s_ptr + rows[:, None] * (K // 32) + g[None, :], n_ok[:, None] & (g < K // 32)[None, :]) * 16384.0
    w = tl.reshape(_fp4_f16(w, BN, BK // 8), (BN, BK // 32, 32)).to(tl.float32) * s[:, :, None]
    return tl.reshape(w, (BN, BK)).to(DT)


@triton.jit
def _fp4_group_dot(q, w_ptr, rows, n_ok, K, k, BN: tl.constexpr):
    """q [BM, 32] e4m3 @ the FP4 columns k..k+31 of rows ``rows`` as e4m3 (times 2^-6, unscaled): fp32 [BM, BN]."""
    w = tl.load(w_ptr + rows[:, None] * (K // 8) + (k // 8 + tl.arange(0, 4))[None, :],
                mask=n_ok[:, None] & (k < K), other=0)
    return tl.dot(q, tl.trans(_fp4_e4m3(w, BN, 4)))


@triton.jit
def _fp4_scales(s_ptr, rows, n_ok, K, k0):
    """The scales of rows ``rows`` for the four 32-column groups from k0: fp32 [BN, 4] (zero past K)."""
    g = k0 // 32 + tl.arange(0, 4)
    return _group_scales(s_ptr + rows[:, None] * (K // 32) + g[None, :], n_ok[:, None] & (g < K // 32)[None, :])


@triton.jit
def _fp4_dot_fp8(q0, q1, q2, q3, w_ptr, s, rows, n_ok, K, k0, BN: tl.constexpr):
    """The e4m3 codes q0..q3 [BM, 32] of activation columns k0 + 32g .. (one 128-column step) @ the FP4 weight
    rows ``rows`` [BN] with their group scales ``s`` [BN, 4]: one e4m3 MMA per 32-column group, each partial
    times its group's scale per row (exact: e4m3 x e4m3 products are exact in fp32). fp32 [BM, BN], still to be
    multiplied by the activation scale and 2^6."""
    s_a, s_b = tl.split(tl.reshape(s, (BN, 2, 2)))  # columns (0, 2), (1, 3)
    s0, s2 = tl.split(s_a)
    s1, s3 = tl.split(s_b)
    acc = _fp4_group_dot(q0, w_ptr, rows, n_ok, K, k0, BN) * s0[None, :]
    acc += _fp4_group_dot(q1, w_ptr, rows, n_ok, K, k0 + 32, BN) * s1[None, :]
    acc += _fp4_group_dot(q2, w_ptr, rows, n_ok, K, k0 + 64, BN) * s2[None, :]
    acc += _fp4_group_dot(q3, w_ptr, rows, n_ok, K, k0 + 96, BN) * s3[None, :]
    return acc


@triton.jit
def _act_scale(as_ptr, a_row, a_ok, K, k):
    """The scale [BM] of the pre-quantized activation rows ``a_row`` (e8m0 bytes [*, K/128]) for columns k..k+127
    (1 past K)."""
    return _e8m0(tl.load(as_ptr + a_row * (K // 128) + k // 128, mask=a_ok & (k < K), other=127))


@triton.jit
def _act_codes(a_ptr, a_off, a_ok, K, k):
    """Pre-quantized activation columns k..k+31 of rows ``a_off``: e4m3 [BM, 32], zero past K."""
    return tl.load(a_ptr + a_off[:, None] + (k + tl.arange(0, 32))[None, :], mask=a_ok[:, None] & (k < K),
                   other=0.0)


@triton.jit
def _act_group(a_ptr, a_off, a_ok, K, k):
    """Activation columns k..k+31 of rows ``a_off`` (fp32 [BM, 32], zero past K)."""
    return tl.load(a_ptr + a_off[:, None] + (k + tl.arange(0, 32))[None, :], mask=a_ok[:, None] & (k < K),
                   other=0.0).to(tl.float32)


@triton.jit
def _quant(a, amax):
    """act_quant of rows ``a`` [BM, X] fp32 with their group amax [BM] -> (e4m3 codes, scale [BM] fp32)."""
    scale, inv, _ = pow2_scale(tl.maximum(amax, 1e-4))
    q = tl.minimum(tl.maximum(a * inv[:, None], -448.0), 448.0).to(tl.float8e4nv)
    return q, scale


@triton.jit
def _gemm(a_ptr, a_off, a_ok, as_ptr, a_row, K, k_lo, k_hi, wa_ptr, sa_ptr, wb_ptr, sb_ptr, n0, NOUT,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FORM: tl.constexpr, TWO: tl.constexpr,
          ACT_QUANT: tl.constexpr, A_Q: tl.constexpr, FP8_DOT: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """acc_a = A @ Wa^T (and acc_b = A @ Wb^T when TWO), fp32 [BM, BN], for output columns n0..n0+BN-1 over the
    inputs k_lo..k_hi-1 (k_lo a multiple of BK; a split-K slice of the K columns).

    A: rows ``a_off`` [BM] (int64 element offsets, ``a_ok`` masks) of a row-major [*, K] activation; with A_Q
    (under act_quant) already quantized: e4m3 codes, and e8m0 scales [*, K/128] at ``as_ptr`` for the rows
    ``a_row`` (int64 [BM]). Wa/Wb:
    one expert's [NOUT, K] weight in form FORM (pointers already at the expert) with its scales (FP8: one per
    128x128 block, [ceil(NOUT/128), ceil(K/128)]; FP4: [NOUT, K/32])."""
    rn = n0 + tl.arange(0, BN)
    n_ok = rn < NOUT
    rows = rn.to(tl.int64)
    acc_a = tl.zeros([BM, BN], tl.float32)
    acc_b = tl.zeros([BM, BN], tl.float32)
    if A_Q:  # the activation scales one step ahead (see the FP4 weight scales)
        sq_next = _act_scale(as_ptr, a_row, a_ok, K, k_lo)
    if FORM == 2:
        if FP8_DOT:  # (act_quant, so BK = 128): e4m3 MMAs per 32-column group
            tl.static_assert(BK == 128)
            # the scales feed no MMA operand, so the pipeliner leaves their loads synchronous: each step's are
            # loaded one step ahead instead
            sa_next = _fp4_scales(sa_ptr, rows, n_ok, K, k_lo)
            sb_next = _fp4_scales(sb_ptr, rows, n_ok, K, k_lo) if TWO else sa_next
            for k0 in range(k_lo, k_hi, BK):
                s_a, s_b = sa_next, sb_next
                sa_next = _fp4_scales(sa_ptr, rows, n_ok, K, k0 + BK)
                sb_next = _fp4_scales(sb_ptr, rows, n_ok, K, k0 + BK) if TWO else sa_next
                if A_Q:
                    sc = sq_next
                    sq_next = _act_scale(as_ptr, a_row, a_ok, K, k0 + BK)
                    q0 = _act_codes(a_ptr, a_off, a_ok, K, k0)
                    q1 = _act_codes(a_ptr, a_off, a_ok, K, k0 + 32)
                    q2 = _act_codes(a_ptr, a_off, a_ok, K, k0 + 64)
                    q3 = _act_codes(a_ptr, a_off, a_ok, K, k0 + 96)
                else:
                    a0 = _act_group(a_ptr, a_off, a_ok, K, k0)
                    a1 = _act_group(a_ptr, a_off, a_ok, K, k0 + 32)
                    a2 = _act_group(a_ptr, a_off, a_ok, K, k0 + 64)
                    a3 = _act_group(a_ptr, a_off, a_ok, K, k0 + 96)
                    amax = tl.maximum(tl.maximum(tl.max(tl.abs(a0), axis=1), tl.max(tl.abs(a1), axis=1)),
                                      tl.maximum(tl.max(tl.abs(a2), axis=1), tl.max(tl.abs(a3), axis=1)))
                    q0, sc = _quant(a0, amax)
                    q1, sc = _quant(a1, amax)
                    q2, sc = _quant(a2, amax)
                    q3, sc = _quant(a3, amax)
                f = (sc * 64.0)[:, None]
                acc_a += _fp4_dot_fp8(q0, q1, q2, q3, wa_ptr, s_a, rows, n_ok, K, k0, BN) * f
                if TWO:
                    acc_b += _fp4_dot_fp8(q0, q1, q2, q3, wb_ptr, s_b, rows, n_ok, K, k0, BN) * f
        else:  # the weights dequantized exactly into the model dtype, one MMA per step
            for k0 in range(k_lo, k_hi, BK):
                kk = k0 + tl.arange(0, BK)
                a = tl.load(a_ptr + a_off[:, None] + kk[None, :], mask=a_ok[:, None] & (kk < K)[None, :], other=0.0)
                if A_Q:
                    sc = sq_next
                    sq_next = _act_scale(as_ptr, a_row, a_ok, K, k0 + BK)
                    a = a.to(tl.float32) * sc[:, None]
                elif ACT_QUANT:
                    a = a.to(tl.float32)
                    q, sc = _quant(a, tl.max(tl.abs(a), axis=1))
                    a = q.to(tl.float32) * sc[:, None]
                a = a.to(DT)
                acc_a += tl.dot(a, tl.trans(_fp4_tile(wa_ptr, sa_ptr, rows, n_ok, K, k0, BN, BK, DT)),
                                input_precision=PREC)
                if TWO:
                    acc_b += tl.dot(a, tl.trans(_fp4_tile(wb_ptr, sb_ptr, rows, n_ok, K, k0, BN, BK, DT)),
                                    input_precision=PREC)
    else:
        KB = tl.cdiv(K, 128)
        s_row = (n0 // 128) * KB
        if FORM == 1:  # the block scales one step ahead, as the FP4 ones
            sa_next = tl.load(sa_ptr + s_row + k_lo // 128)
            sb_next = tl.load(sb_ptr + s_row + k_lo // 128) if TWO else sa_next
        for k0 in range(k_lo, k_hi, BK):
            kk = k0 + tl.arange(0, BK)
            k_ok = kk < K
            a = tl.load(a_ptr + a_off[:, None] + kk[None, :], mask=a_ok[:, None] & k_ok[None, :], other=0.0)
            w_off = rows[:, None] * K + kk[None, :]
            w_ok = n_ok[:, None] & k_ok[None, :]
            wa = tl.load(wa_ptr + w_off, mask=w_ok, other=0.0)
            if TWO:
                wb = tl.load(wb_ptr + w_off, mask=w_ok, other=0.0)
            if ACT_QUANT:
                if A_Q:
                    q, sc = a, sq_next
                    sq_next = _act_scale(as_ptr, a_row, a_ok, K, k0 + BK)
                else:
                    a = a.to(tl.float32)
                    q, sc = _quant(a, tl.max(tl.abs(a), axis=1))
                if not FP8_DOT:
                    a = q.to(tl.float32) * sc[:, None]
            if FORM == 1:
                s_a, s_b = sa_next, sb_next
                nxt = (k0 + BK) // 128
                sa_next = tl.load(sa_ptr + s_row + nxt, mask=nxt < KB, other=1.0)
                sb_next = tl.load(sb_ptr + s_row + nxt, mask=nxt < KB, other=1.0) if TWO else sa_next
                if FP8_DOT:
                    acc_a += tl.dot(q, tl.trans(wa)) * (sc[:, None] * s_a)
                    if TWO:
                        acc_b += tl.dot(q, tl.trans(wb)) * (sc[:, None] * s_b)
                else:
                    a = a.to(DT)
                    acc_a += tl.dot(a, tl.trans(wa.to(DT)), input_precision=PREC) * s_a
                    if TWO:
                        acc_b += tl.dot(a, tl.trans(wb.to(DT)), input_precision=PREC) * s_b
            else:
                a = a.to(DT)
                acc_a += tl.dot(a, tl.trans(wa.to(DT)), input_precision=PREC)
                if TWO:
                    acc_b += tl.dot(a, tl.trans(wb.to(DT)), input_precision=PREC)
    return acc_a, acc_b
