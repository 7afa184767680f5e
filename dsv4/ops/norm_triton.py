"""Triton kernels for RMSNorm and RMSNorm fused with FP8 activation quantisation (references: :mod:`dsv4.ops.norm`).

One program normalises one row held in registers as ``[groups, BLOCK]`` (BLOCK = the quantisation block), so
the per-group amax of the fused quantisation is a row-wise reduction of the same tile. Rounding points follow
the references: ``rsqrt`` as an IEEE ``1 / sqrt`` (what torch's CPU kernel computes), ``(x * r) * w`` in fp32,
rounded once to ``x.dtype``; the quantised forms start from that rounded value, as ``act_quant(rms_norm(x))``
does. All three forms run one compiled kernel (the mode is a runtime argument), so with a quantisation block of
128 (the plain norm's tile) ``rms_norm_quant(x) == act_quant(rms_norm(x))`` bit for bit on the GPU too, every
size and scale format; the norm itself differs from torch's only by the order of the sum of squares.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops import pdl
from dsv4.ops.pdl import enter as pdl_enter
from dsv4.ops.quant_triton import pow2_scale

_PLAIN, _QUANT, _SIM = 0, 1, 2


# mode and ue8m0 are runtime arguments (never specialized on), so that the plain norm and its FP8 forms run one
# compiled kernel: the compiler picks the tile's register layout, and with it the order of the sum of squares,
# from every load and store of the kernel (an fp8 store vectorizes 16 elements per thread where a bf16 one takes
# 8); separate specializations could round the norm differently and break act_quant(rms_norm(x)) == fused.
@triton.jit(do_not_specialize=["mode", "ue8m0"])
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, q_ptr, s_ptr, N, G, X_STRIDE, eps, mode, ue8m0, BLOCK: tl.constexpr,
                     G_P2: tl.constexpr, PDL: tl.constexpr):
    """x [M, N] (rows X_STRIDE apart) -> mode 0: y [M, N] in y's dtype, the activation dtype; 1: q [M, N] e4m3
    codes as bytes and s [M, G] (ue8m0: e8m0 bytes, else fp32 in the same buffer's bytes); 2: the dequantised
    q in y's dtype. x in another dtype (an fp32 GEMM accumulation) is rounded to y's as it is loaded."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G_P2)
    c = tl.arange(0, BLOCK)
    cols = g[:, None] * BLOCK + c[None, :]
    mask = cols < N
    x = tl.load(x_ptr + row * X_STRIDE + cols, mask=mask, other=0.0).to(y_ptr.dtype.element_ty).to(tl.float32)
    ms = tl.math.div_rn(tl.sum(tl.sum(x * x, axis=1), axis=0), N.to(tl.float32))
    r = tl.math.div_rn(1.0, tl.sqrt_rn(ms + eps))
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (x * r) * w
    if mode == 0:
        tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # quantise the norm's output as rounded to the activation dtype (y's), like act_quant(rms_norm(x))
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(y), axis=1), 1e-4)
        if ue8m0 != 0:
            scale, inv, _ = pow2_scale(amax)
            v = y * inv[:, None]
        else:
            scale = amax * (1.0 / 448.0)
            v = tl.math.div_rn(y, scale[:, None])
        q = tl.minimum(tl.maximum(v, -448.0), 448.0).to(tl.float8e4nv)
        if mode == 2:
            tl.store(y_ptr + row * N + cols, (q.to(tl.float32) * scale[:, None]).to(y_ptr.dtype.element_ty),
                     mask=mask)
        else:
            tl.store(q_ptr + row * N + cols, q.to(tl.uint8, bitcast=True), mask=mask)
            if ue8m0 != 0:  # a power of two's exponent bits are its e8m0 byte
                byte = (scale.to(tl.int32, bitcast=True) >> 23).to(tl.uint8)
                tl.store(s_ptr + row * G + g, byte, mask=g < G)
            else:
                tl.store(s_ptr.to(tl.pointer_type(tl.float32)) + row * G + g, scale, mask=g < G)


def _launch(x2: torch.Tensor, weight: torch.Tensor, eps: float, y: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
            block: int, mode: int, ue8m0: bool) -> None:
    """q and s are byte buffers (e4m3 codes; e8m0 bytes or fp32 scales); modes that do not write them pass any.
    y's dtype is the activation dtype (the quantised forms pass x2 as y); x2's rows may be strided."""
    m, n = x2.shape
    if m == 0:
        return
    g = triton.cdiv(n, block)
    g_p2 = triton.next_power_of_2(g)
    warps = max(1, min(16, g_p2 * block // 1024))
    _rms_norm_kernel[(m,)](x2, weight.contiguous(), y, q, s, n, g, x2.stride(0), float(eps), mode, int(ue8m0),
                           BLOCK=block,
                           G_P2=g_p2, num_warps=warps, **pdl.launch(x2.device))


def _check_quant(block: int, scale_fmt: str | None) -> None:
    if scale_fmt not in ("ue8m0", None):
        raise ValueError(f"scale_fmt must be 'ue8m0' or None, got {scale_fmt!r}")
    if block <= 0 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.norm.rms_norm`: x [..., N] any float dtype, weight [N] -> [..., N] in ``dtype``
    (None: x.dtype). x in another dtype is rounded to ``dtype`` as it is loaded, one launch; rows of a 2-D x
    may be strided (a column view of a fused GEMM's output), read in place."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    y = torch.empty(x2.shape, dtype=dtype or x.dtype, device=x.device)
    b = y.view(torch.uint8)
    _launch(x2, weight, eps, y, b, b, min(128, triton.next_power_of_2(n)), _PLAIN, True)
    return y.view(x.shape)


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, block: int = 128,
                   scale_fmt: str | None = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel for :func:`dsv4.ops.norm.rms_norm_quant`: x [..., N] (N % block == 0) -> (q [..., N] e4m3,
    s [..., N/block] float8_e8m0fnu for ue8m0, fp32 otherwise)."""
    _check_quant(block, scale_fmt)
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"last dim {n} is not a multiple of the quantisation block {block}")
    x2 = x.reshape(-1, n).contiguous()
    ue8m0 = scale_fmt == "ue8m0"
    q = torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((x2.shape[0], n // block), dtype=torch.uint8 if ue8m0 else torch.float32, device=x.device)
    _launch(x2, weight, eps, x2, q.view(torch.uint8), s.view(torch.uint8), block, _QUANT, ue8m0)
    s = s.view(torch.float8_e8m0fnu) if ue8m0 else s
    return q.view(x.shape), s.view(*x.shape[:-1], n // block)


def rms_norm_quant_sim(x: torch.Tensor, weight: torch.Tensor, eps: float, block: int = 128,
                       scale_fmt: str | None = "ue8m0") -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.norm.rms_norm_quant_sim`: x [..., N] -> the FP8-rounded norm in x.dtype."""
    _check_quant(block, scale_fmt)
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    y = torch.empty_like(x2)
    b = y.view(torch.uint8)
    _launch(x2, weight, eps, y, b, b, block, _SIM, scale_fmt == "ue8m0")
    return y.view(x.shape)
