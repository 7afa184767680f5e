"""RMSNorm references (DSV4_SPEC 3.1, 3.2)."""

from __future__ import annotations

import torch

from dsv4.ops.quant import act_quant, act_quant_sim


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Weighted RMSNorm over the last dim: ``(w_fp32 * x_fp32 * rsqrt(mean(x^2) + eps)).to(x.dtype)``.

    x: [..., N] any float dtype; weight: [N] (kept fp32 by the model). One rounding, at the end. ``dtype``: the
    activation dtype (None: x.dtype); x in another one (the fused projection's fp32 accumulation) is rounded
    to it first, and the result is in it.
    """
    x = x if dtype is None else x.to(dtype)
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (weight.float() * y).to(x.dtype)


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, block: int = 128,
                   scale_fmt: str | None = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """``act_quant(rms_norm(x))``: the norm rounded to ``x.dtype`` first, then FP8 e4m3 per 1x``block`` group.

    x: [..., N] (N % block == 0). Returns (q [..., N] float8_e4m3fn, s [..., N/block] float8_e8m0fnu for ue8m0,
    fp32 otherwise), as :func:`dsv4.ops.quant.act_quant`.
    """
    return act_quant(rms_norm(x, weight, eps), block, scale_fmt)


def rms_norm_quant_sim(x: torch.Tensor, weight: torch.Tensor, eps: float, block: int = 128,
                       scale_fmt: str | None = "ue8m0") -> torch.Tensor:
    """``act_quant_sim(rms_norm(x))``: the norm's output rounded through FP8 and back to ``x.dtype`` (the model's
    simulation of an FP8 GEMM input), same shape as ``x``; a short last group is allowed."""
    return act_quant_sim(rms_norm(x, weight, eps), block, scale_fmt)


def head_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unweighted RMSNorm of each head vector (the q head-norm), last dim.

    The official code does this arithmetic in the tensor's dtype (bf16 rounds ``square()``); in fp32 it is
    the same as transformers' fp32 rsqrt.
    """
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
