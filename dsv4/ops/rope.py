"""Interleaved (GPT-J) rotary embedding on the trailing ``rope_dim`` channels (DSV4_SPEC 3.6).

Two tables per model: ``main`` (base ``rope_theta``, no scaling) for sliding-only layers and the MTP block,
``compress`` (base ``compress_rope_theta`` with YaRN, no mscale) for CSA/HCA layers, their compressors and
the indexer. cos/sin are fp32 and computed from positions on the fly, so no table bounds the context.
"""

from __future__ import annotations

import math

import torch

from dsv4.config import YarnScaling


def rope_inv_freq(rope_dim: int, base: float, yarn: YarnScaling | None) -> torch.Tensor:
    """[rope_dim // 2] fp32 inverse frequencies, YaRN-blended when ``yarn`` is given."""
    inv = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if yarn is None:
        return inv

    def corr_dim(n_rot: float) -> float:
        return rope_dim * math.log(yarn.original_max_position_embeddings / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(corr_dim(yarn.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001  # keep the ramp finite
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return (inv / yarn.factor) * (1 - extrapolation) + inv * extrapolation


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] int, inv_freq [..., rope_dim // 2] -> (cos, sin), each [..., T, rope_dim // 2] fp32.

    Stacked tables (inv_freq [n, rd/2]) come out of one launch per function, each table a contiguous [T, rd/2]."""
    # the product converts the integer positions to fp32 as it reads them (as .to(float32) would, one launch fewer)
    angle = positions[:, None] * inv_freq.to(positions.device, torch.float32)[..., None, :]
    return angle.cos(), angle.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the trailing ``2 * cos.shape[-1]`` channels of ``x`` pairwise (interleaved), in fp32.

    x: [T, ..., D]; cos/sin: [T, rope_dim // 2] broadcast over the middle dims. ``inverse`` uses the
    conjugate rotation (the attention output's de-rotation at the query position). Returns x's dtype.
    """
    half = cos.shape[-1]
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    c, s = cos.view(shape), sin.view(shape)
    if inverse:
        s = -s
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    out[..., : -2 * half] = x[..., : -2 * half]
    # the products upcast x's 16-bit values exactly (fp32 opmath), as an explicit .float() would; the sums are
    # rounded to x.dtype as they are written into the output's interleaved pairs (fewer launches, same values)
    pairs, dst = x[..., -2 * half :].unflatten(-1, (half, 2)), out[..., -2 * half :].unflatten(-1, (half, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    if torch.is_grad_enabled() and x.requires_grad:  # training (the tiny model's trainer): out= has no autograd
        rot = torch.stack((re * c - im * s, re * s + im * c), dim=-1).flatten(-2).to(x.dtype)
        return torch.cat((x[..., : -2 * half], rot), dim=-1)
    torch.sub(re * c, im * s, out=dst[..., 0])
    torch.add(re * s, im * c, out=dst[..., 1])
    return out
