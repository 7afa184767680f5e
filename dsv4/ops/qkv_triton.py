"""Triton kernels for the attention's q and kv preparation (references: :mod:`dsv4.ops.qkv`).

Both kernels load head vectors contiguously and split them into their interleaved rope pairs in registers
(``even[i] = x[2i]``, ``odd[i] = x[2i+1]``: a reshape to [..., d/2, 2] and a split), rotate the trailing
pairs, and join them back for a contiguous store.
Rounding points follow the references: the q head-norm in q's dtype step by step (square, mean, +eps,
rsqrt, product each rounded, as torch does on bf16 tensors), the kv norm in fp32 rounded once, rope in fp32
from the rounded values and rounded again, the FP8 simulation from those values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops import pdl
from dsv4.ops.kv_fp8 import KV_QUANT_BLOCK, Fp8KV
from dsv4.ops.pdl import enter as pdl_enter
from dsv4.ops.quant_triton import pow2_scale

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _rope_pairs(e, o, c, s):
    """Rotate pairs (e, o) by (c, s): fp32 in and out."""
    return e * c - o * s, e * s + o * c


@triton.jit
def _pairs(x, ROWS: tl.constexpr, HALF_P: tl.constexpr):
    """x [ROWS, 2 * HALF_P] (a contiguous load) -> its (even, odd) elements, each [ROWS, HALF_P]."""
    return tl.split(tl.reshape(x, [ROWS, HALF_P, 2]))


@triton.jit
def _unpairs(e, o, ROWS: tl.constexpr, HALF_P: tl.constexpr):
    return tl.reshape(tl.join(e, o), [ROWS, 2 * HALF_P])


@triton.jit
def _q_norm_rope_kernel(q_ptr, out_ptr, cos_ptr, sin_ptr, H, eps, HD: tl.constexpr, HALF_P: tl.constexpr,
                        ROPE_HALF: tl.constexpr, BLOCK_H: tl.constexpr, DT: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    t, hb = tl.program_id(0), tl.program_id(1)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, 2 * HALF_P)
    mask = (heads < H)[:, None] & (d < HD)[None, :]
    offs = (t.to(tl.int64) * H + heads[:, None]) * HD + d[None, :]
    x = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # torch on a DT tensor: square (rounded), mean (fp32 sum, rounded), + eps (rounded), rsqrt (rounded)
    ms = (tl.sum((x * x).to(DT).to(tl.float32), axis=1) / HD).to(DT).to(tl.float32)
    r = tl.rsqrt((ms + eps).to(DT).to(tl.float32)).to(DT).to(tl.float32)
    e, o = _pairs((x * r[:, None]).to(DT).to(tl.float32), BLOCK_H, HALF_P)
    i = tl.arange(0, HALF_P)
    j = i - (HD // 2 - ROPE_HALF)
    is_rope = (j >= 0) & (i < HD // 2)
    c = tl.load(cos_ptr + t * ROPE_HALF + j, mask=is_rope, other=1.0)[None, :]
    s = tl.load(sin_ptr + t * ROPE_HALF + j, mask=is_rope, other=0.0)[None, :]
    e2, o2 = _rope_pairs(e, o, c, s)
    tl.store(out_ptr + offs, _unpairs(e2, o2, BLOCK_H, HALF_P).to(DT), mask=mask)


@triton.jit
def _kv_norm_rope_store_kernel(kv_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, ring_ptr, ring_sc_ptr, ring_rope_ptr,
                               dest_ptr, eps, KV_STRIDE, HD: tl.constexpr, HALF_P: tl.constexpr, ROPE_HALF: tl.constexpr,
                               QUANT: tl.constexpr, QBLOCK: tl.constexpr, DT: tl.constexpr, RING_DT: tl.constexpr,
                               RING_FP8: tl.constexpr, NSC: tl.constexpr, PDL: tl.constexpr):
    """RING_FP8: the ring is an FP8 store (nope e4m3 at ring_ptr, e8m0 bytes at ring_sc_ptr, rope dims at
    ring_rope_ptr); QUANT is then on and the stored FP8 values and scales are the ones the rounding used. kv's
    rows are KV_STRIDE apart; kv in another dtype than DT (an fp32 GEMM accumulation) is rounded to DT as it is
    loaded."""
    pdl_enter(PDL)
    t = tl.program_id(0)
    d = tl.arange(0, 2 * HALF_P)
    dmask = d < HD
    dest = tl.load(dest_ptr + t)
    x = tl.load(kv_ptr + t.to(tl.int64) * KV_STRIDE + d, mask=dmask, other=0.0).to(DT).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=0) / HD + eps)
    w = tl.load(w_ptr + d, mask=dmask, other=0.0)
    e, o = _pairs((w * (x * r)).to(DT).to(tl.float32)[None, :], 1, HALF_P)
    i = tl.arange(0, HALF_P)[None, :]
    nope_half = HD // 2 - ROPE_HALF
    j = i - nope_half
    is_rope = (j >= 0) & (i < HD // 2)
    c = tl.load(cos_ptr + t * ROPE_HALF + j, mask=is_rope, other=1.0)
    s = tl.load(sin_ptr + t * ROPE_HALF + j, mask=is_rope, other=0.0)
    e, o = _rope_pairs(e, o, c, s)
    e = e.to(DT).to(tl.float32)
    o = o.to(DT).to(tl.float32)
    if QUANT:
        # FP8 blocks of QBLOCK elements = QBLOCK/2 pairs over the nope dims (a short last block as if padded)
        group = i // (QBLOCK // 2)
        is_nope = i < nope_half
        mag = tl.maximum(tl.abs(e), tl.abs(o))
        sc = tl.zeros([1, HALF_P], dtype=tl.float32)
        iv = tl.zeros([1, HALF_P], dtype=tl.float32)
        for g in tl.static_range((HD // 2 - ROPE_HALF + QBLOCK // 2 - 1) // (QBLOCK // 2)):
            sel = is_nope & (group == g)
            amax = tl.maximum(tl.max(tl.where(sel, mag, 0.0)), 1e-4)
            scale, inv, byte = pow2_scale(amax)
            sc = tl.where(sel, scale, sc)
            iv = tl.where(sel, inv, iv)
            if RING_FP8:
                tl.store(ring_sc_ptr + dest * NSC + g, byte, mask=dest >= 0)
        q8e = tl.minimum(tl.maximum(e * iv, -448.0), 448.0).to(tl.float8e4nv).to(tl.float32)
        q8o = tl.minimum(tl.maximum(o * iv, -448.0), 448.0).to(tl.float8e4nv).to(tl.float32)
        e = tl.where(is_nope, (q8e * sc).to(DT).to(tl.float32), e)
        o = tl.where(is_nope, (q8o * sc).to(DT).to(tl.float32), o)
    y = tl.reshape(_unpairs(e, o, 1, HALF_P), [2 * HALF_P])
    tl.store(out_ptr + t.to(tl.int64) * HD + d, y.to(DT), mask=dmask)
    if dest >= 0:
        if RING_FP8:
            nope = HD - 2 * ROPE_HALF
            y8 = tl.reshape(_unpairs(q8e, q8o, 1, HALF_P), [2 * HALF_P])
            tl.store(ring_ptr + dest * nope + d, y8.to(tl.float8e4nv), mask=d < nope)
            tl.store(ring_rope_ptr + dest * (2 * ROPE_HALF) + d - nope, y.to(RING_DT), mask=(d >= nope) & dmask)
        else:
            tl.store(ring_ptr + dest * HD + d, y.to(RING_DT), mask=dmask)


@triton.jit
def _store_ring_kernel(kv_ptr, ring_ptr, dest_ptr, HD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    t = tl.program_id(0)
    d = tl.load(dest_ptr + t)
    if d >= 0:
        offs = tl.arange(0, BLOCK)
        x = tl.load(kv_ptr + t.to(tl.int64) * HD + offs, mask=offs < HD)
        tl.store(ring_ptr + d * HD + offs, x.to(ring_ptr.dtype.element_ty), mask=offs < HD)


@triton.jit
def _store_ring_fp8_kernel(kv_ptr, nope_ptr, sc_ptr, rope_ptr, dest_ptr, HD: tl.constexpr, HD_P: tl.constexpr,
                           NOPE: tl.constexpr, NSC: tl.constexpr, QBLOCK: tl.constexpr, PDL: tl.constexpr):
    """Quantise row t of kv [T, HD] into an FP8 store at flat row dest[t] (same rule as the rounding above)."""
    pdl_enter(PDL)
    t = tl.program_id(0)
    dest = tl.load(dest_ptr + t)
    if dest >= 0:
        d = tl.arange(0, HD_P)
        x = tl.load(kv_ptr + t.to(tl.int64) * HD + d, mask=d < HD, other=0.0).to(tl.float32)
        is_nope = d < NOPE
        q8 = tl.zeros([HD_P], dtype=tl.float32)
        for g in tl.static_range(NSC):
            sel = is_nope & (d // QBLOCK == g)
            amax = tl.maximum(tl.max(tl.where(sel, tl.abs(x), 0.0)), 1e-4)
            scale, inv, byte = pow2_scale(amax)
            tl.store(sc_ptr + dest * NSC + g, byte)
            q8 = tl.where(sel, tl.minimum(tl.maximum(x * inv, -448.0), 448.0), q8)
        tl.store(nope_ptr + dest * NOPE + d, q8.to(tl.float8e4nv), mask=is_nope)
        tl.store(rope_ptr + dest * (HD - NOPE) + d - NOPE, x.to(rope_ptr.dtype.element_ty), mask=(d >= NOPE) & (d < HD))


def _half_p(hd: int) -> int:
    if hd % 2:
        raise ValueError(f"head dim must be even, got {hd}")
    return triton.next_power_of_2(hd // 2)


def q_norm_rope(q: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.qkv.q_norm_rope`. q: [T, H, hd]; cos/sin: [T, rd/2] fp32."""
    t, h, hd = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    half_p = _half_p(hd)
    block_h = max(1, min(triton.next_power_of_2(h), 4096 // half_p))
    if t:
        _q_norm_rope_kernel[(t, triton.cdiv(h, block_h))](
            q, out, cos.float().contiguous(), sin.float().contiguous(), h, eps, HD=hd, HALF_P=half_p,
            ROPE_HALF=cos.shape[-1], BLOCK_H=block_h, DT=_TL[q.dtype], **pdl.launch(q.device))
    return out


def kv_norm_rope_store(
    kv: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, nope_quant: bool,
    ring: torch.Tensor | Fp8KV, dest: torch.Tensor, dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.qkv.kv_norm_rope_store`. kv: [T, hd], its rows may be strided (a column view of
    a fused GEMM's output, read in place); ring: [slots, R, hd] or an FP8 store; dest: [T]. kv in another dtype
    than ``dtype`` is rounded to it as it is loaded (one launch)."""
    t, hd = kv.shape
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()
    out = torch.empty((t, hd), dtype=dtype or kv.dtype, device=kv.device)
    fp8 = isinstance(ring, Fp8KV)
    parts = tuple(ring) if fp8 else (ring, ring, ring)
    if t:
        _kv_norm_rope_store_kernel[(t,)](
            kv, weight.float().contiguous(), cos.float().contiguous(), sin.float().contiguous(), out, *parts,
            dest.contiguous(), eps, kv.stride(0), HD=hd, HALF_P=_half_p(hd), ROPE_HALF=cos.shape[-1],
            QUANT=nope_quant or fp8, QBLOCK=KV_QUANT_BLOCK, DT=_TL[out.dtype], RING_DT=_TL[ring.dtype], RING_FP8=fp8,
            NSC=triton.cdiv(hd - 2 * cos.shape[-1], KV_QUANT_BLOCK), **pdl.launch(kv.device))
    return out


def store_ring(kv: torch.Tensor, ring: torch.Tensor | Fp8KV, dest: torch.Tensor) -> None:
    """Kernel for :func:`dsv4.ops.qkv.store_ring`."""
    t, hd = kv.shape
    if t and isinstance(ring, Fp8KV):
        nope = ring.nope.shape[-1]
        _store_ring_fp8_kernel[(t,)](kv.contiguous(), *ring, dest.contiguous(), HD=hd, HD_P=triton.next_power_of_2(hd),
                                     NOPE=nope, NSC=ring.scale.shape[-1], QBLOCK=KV_QUANT_BLOCK,
                                     **pdl.launch(kv.device))
    elif t:
        _store_ring_kernel[(t,)](kv.contiguous(), ring, dest.contiguous(), HD=hd, BLOCK=triton.next_power_of_2(hd),
                                 **pdl.launch(kv.device))
