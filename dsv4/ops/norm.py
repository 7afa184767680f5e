"""RMSNorm references (DSV4_SPEC 3.1, 3.2)."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Weighted RMSNorm over the last dim: ``(w_fp32 * x_fp32 * rsqrt(mean(x^2) + eps)).to(x.dtype)``.

    x: [..., N] any float dtype; weight: [N] (kept fp32 by the model). One rounding, at the end.
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (weight.float() * y).to(x.dtype)


def head_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unweighted RMSNorm of each head vector (the q head-norm), last dim.

    The official code does this arithmetic in the tensor's dtype (bf16 rounds ``square()``); in fp32 it is
    the same as transformers' fp32 rsqrt.
    """
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
