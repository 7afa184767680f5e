"""Triton kernels for RMSNorm and RMSNorm fused with FP8 activation quantisation (references: :mod:`dsv4.ops.norm`).

One program normalises one row held in registers as ``[groups, BLOCK]`` (BLOCK = the quantisation block), so
the per-group amax of the fused quantisation is a row-wise reduction of the same tile. Rounding points follow
the references: ``rsqrt`` as an IEEE ``1 / sqrt`` (what torch's CPU kernel computes), ``(x * r) * w`` in fp32,
rounded once to ``x.dtype``; the quantised forms start from that rounded value, as ``act_quant(rms_norm(x))``
does, so given the same norm output the FP8 codes and scales are bit-exact (the norm itself differs from
torch's only by the order of the sum of squares).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.quant_triton import pow2_scale

_PLAIN, _QUANT, _SIM = 0, 1, 2


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, s_ptr, N, G, eps, BLOCK: tl.constexpr, G_P2: tl.constexpr,
                     MODE: tl.constexpr, UE8M0: tl.constexpr):
    """x [M, N] -> MODE 0: y [M, N] in y's dtype; 1: q [M, N] e4m3 and s [M, G] (uint8 e8m0 or fp32);
    2: the dequantised q in y's dtype."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G_P2)
    c = tl.arange(0, BLOCK)
    cols = g[:, None] * BLOCK + c[None, :]
    mask = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    ms = tl.math.div_rn(tl.sum(tl.sum(x * x, axis=1), axis=0), N.to(tl.float32))
    r = tl.math.div_rn(1.0, tl.sqrt_rn(ms + eps))
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (x * r) * w
    if MODE == 0:
        tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # quantise the norm's output as rounded to the activation dtype (x's), like act_quant(rms_norm(x))
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(y), axis=1), 1e-4)
        if UE8M0:
            scale, inv, byte = pow2_scale(amax)
            v = y * inv[:, None]
        else:
            scale = amax * (1.0 / 448.0)
            v = tl.math.div_rn(y, scale[:, None])
        q = tl.minimum(tl.maximum(v, -448.0), 448.0).to(tl.float8e4nv)
        if MODE == 2:
            tl.store(y_ptr + row * N + cols, (q.to(tl.float32) * scale[:, None]).to(y_ptr.dtype.element_ty),
                     mask=mask)
        else:
            tl.store(y_ptr + row * N + cols, q, mask=mask)
            if UE8M0:
                tl.store(s_ptr + row * G + g, byte, mask=g < G)
            else:
                tl.store(s_ptr + row * G + g, scale, mask=g < G)


def _launch(x2: torch.Tensor, weight: torch.Tensor, eps: float, y: torch.Tensor, s: torch.Tensor, block: int,
            mode: int, ue8m0: bool) -> None:
    m, n = x2.shape
    if m == 0:
        return
    g = triton.cdiv(n, block)
    g_p2 = triton.next_power_of_2(g)
    warps = max(1, min(16, g_p2 * block // 1024))
    _rms_norm_kernel[(m,)](x2, weight.contiguous(), y, s, n, g, float(eps), BLOCK=block, G_P2=g_p2, MODE=mode,
                           UE8M0=ue8m0, num_warps=warps)


def _check_quant(block: int, scale_fmt: str | None) -> None:
    if scale_fmt not in ("ue8m0", None):
        raise ValueError(f"scale_fmt must be 'ue8m0' or None, got {scale_fmt!r}")
    if block <= 0 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.norm.rms_norm`: x [..., N] any float dtype, weight [N] -> [..., N] in x.dtype."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    y = torch.empty_like(x2)
    _launch(x2, weight, eps, y, y, min(128, triton.next_power_of_2(n)), _PLAIN, False)
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
    _launch(x2, weight, eps, q, s, block, _QUANT, ue8m0)
    s = s.view(torch.float8_e8m0fnu) if ue8m0 else s
    return q.view(x.shape), s.view(*x.shape[:-1], n // block)


def rms_norm_quant_sim(x: torch.Tensor, weight: torch.Tensor, eps: float, block: int = 128,
                       scale_fmt: str | None = "ue8m0") -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.norm.rms_norm_quant_sim`: x [..., N] -> the FP8-rounded norm in x.dtype."""
    _check_quant(block, scale_fmt)
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    y = torch.empty_like(x2)
    _launch(x2, weight, eps, y, y, block, _SIM, scale_fmt == "ue8m0")
    return y.view(x.shape)
