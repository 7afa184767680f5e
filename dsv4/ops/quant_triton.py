"""Triton kernels for FP8 e4m3 activation quantisation (references: :mod:`dsv4.ops.quant`).

Bit-exact with the references: amax per group of ``block`` consecutive elements (floored at 1e-4), the scale
either a power of two built from the fp32 bit pattern of ``amax * fp32(1/448)`` (ue8m0: exponent - 127 +
(mantissa != 0)) or that product itself (float scales), ``q = e4m3(clamp(x / s, -448, 448))`` with round to
nearest even. For power-of-two scales ``x / s`` is the exact product ``x * 2^-e``; float scales use an IEEE
division (``div_rn``: Triton's ``/`` lowers to an approximate division on NVIDIA).

One program quantises ``BLOCK_M`` rows of one group, so every load is ``block`` contiguous elements per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
_BLOCK_M = 16


@triton.jit
def pow2_scale(amax):
    """amax [...] fp32 (floored, > 0) -> (2^e, 2^-e, e + 127 as the e8m0 byte) with
    e = ceil(log2(amax * fp32(1/448))) read off the fp32 bits; both powers are built from bits, so exact."""
    bits = (amax * (1.0 / 448.0)).to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    scale = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    return scale, inv, (e + 127).to(tl.uint8)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, G, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                      UE8M0: tl.constexpr, SIM: tl.constexpr):
    """x [M, K] -> q [M, K] fp8 and s [M, G] (uint8 e8m0 or fp32); SIM writes fp32(q) * s in q's dtype."""
    pid_m, g = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = g * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
    if UE8M0:
        scale, inv, byte = pow2_scale(amax)
        y = x * inv[:, None]
    else:
        scale = amax * (1.0 / 448.0)
        y = tl.math.div_rn(x, scale[:, None])
    q = tl.minimum(tl.maximum(y, -448.0), 448.0).to(tl.float8e4nv)
    if SIM:
        tl.store(q_ptr + offs, (q.to(tl.float32) * scale[:, None]).to(q_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(q_ptr + offs, q, mask=mask)
        if UE8M0:
            tl.store(s_ptr + rows * G + g, byte, mask=rows < M)
        else:
            tl.store(s_ptr + rows * G + g, scale, mask=rows < M)


@triton.jit
def _act_dequant_kernel(q_ptr, s_ptr, y_ptr, M, K, G, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                        UE8M0: tl.constexpr):
    pid_m, g = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = g * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if UE8M0:
        b = tl.load(s_ptr + rows * G + g, mask=rows < M, other=127).to(tl.int32)
        # byte 0 is 2^-127 (an fp32 subnormal), byte 255 NaN, as e8m0_to_float decodes them
        bits = tl.where(b == 0, 1 << 22, tl.where(b == 255, 0x7FC00000, b << 23))
        s = bits.to(tl.float32, bitcast=True)
    else:
        s = tl.load(s_ptr + rows * G + g, mask=rows < M, other=1.0).to(tl.float32)
    tl.store(y_ptr + offs, (q * s[:, None]).to(y_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, block: int, scale_fmt: str | None) -> None:
    if scale_fmt not in ("ue8m0", None):
        raise ValueError(f"scale_fmt must be 'ue8m0' or None, got {scale_fmt!r}")
    if block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")


def act_quant(x: torch.Tensor, block: int = 128, scale_fmt: str | None = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel for :func:`dsv4.ops.quant.act_quant`: ``x [..., K]`` -> ``(q [..., K] e4m3, s [..., K/block])``,
    ``s`` float8_e8m0fnu for ue8m0 and fp32 otherwise."""
    _check(x, block, scale_fmt)
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"last dim {k} is not a multiple of the quantisation block {block}")
    x2 = x.reshape(-1, k).contiguous()
    m, g = x2.shape[0], k // block
    q = torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x.device)
    ue8m0 = scale_fmt == "ue8m0"
    s = torch.empty((m, g), dtype=torch.uint8 if ue8m0 else torch.float32, device=x.device)
    if m:
        _act_quant_kernel[(triton.cdiv(m, _BLOCK_M), g)](x2, q, s, m, k, g, BLOCK=block, BLOCK_M=_BLOCK_M,
                                                         UE8M0=ue8m0, SIM=False)
    s = s.view(torch.float8_e8m0fnu) if ue8m0 else s
    return q.view(x.shape), s.view(*x.shape[:-1], g)


def act_quant_sim(x: torch.Tensor, block: int = 128, scale_fmt: str | None = "ue8m0") -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.quant.act_quant_sim`: ``(fp32(q) * s).to(x.dtype)`` in one pass.

    A last dim that is not a multiple of ``block`` gets a short last group (as if zero-padded)."""
    _check(x, block, scale_fmt)
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m, g = x2.shape[0], triton.cdiv(k, block)
    y = torch.empty_like(x2)
    if m:
        _act_quant_kernel[(triton.cdiv(m, _BLOCK_M), g)](x2, y, y, m, k, g, BLOCK=block, BLOCK_M=_BLOCK_M,
                                                         UE8M0=scale_fmt == "ue8m0", SIM=True)
    return y.view(x.shape)


def act_dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.quant.act_dequant`: ``q [..., K]`` e4m3 and ``s [..., K/block]`` (e8m0 or
    float) -> ``fp32(q) * s`` in ``dtype``."""
    k, g = q.shape[-1], s.shape[-1]
    block = k // g
    ue8m0 = s.dtype == torch.float8_e8m0fnu
    q2 = q.reshape(-1, k).contiguous()
    s2 = (s.view(torch.uint8) if ue8m0 else s.float()).reshape(-1, g).contiguous()
    y = torch.empty(q2.shape, dtype=dtype, device=q.device)
    if q2.shape[0]:
        _act_dequant_kernel[(triton.cdiv(q2.shape[0], _BLOCK_M), g)](q2, s2, y, q2.shape[0], k, g, BLOCK=block,
                                                                     BLOCK_M=_BLOCK_M, UE8M0=ue8m0)
    return y.view(q.shape)
