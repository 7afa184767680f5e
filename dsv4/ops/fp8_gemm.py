"""Reference for the native FP8 linear (DSV4_SPEC 3.5, 7.3): the official ``fp8_gemm`` on block-scaled weights.

The official GEMM quantises its input per token in groups of 128 columns (e4m3, power-of-two scales:
:func:`dsv4.ops.quant.act_quant`), multiplies FP8 by FP8 per 128-wide K block in fp32 and applies both scales
per block. Every such product is exact in fp32 (4 significant bits times 4, times powers of two), so the
reference dequantises both operands exactly and runs one fp32 matmul: it differs from the blockwise form only in
the order of the fp32 sums.
"""

from __future__ import annotations

import torch

from dsv4.ops.quant import act_quant_sim, dequantize_fp8_block

BLOCK = 128  # the activation quantisation group along K and the weight's square scale block


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``y = act_quant(x) @ dequant(weight)^T``.

    x: [..., K] any float dtype; weight: [N, K] float8_e4m3fn; scale: [ceil(N/128), ceil(K/128)] fp32, one per
    128x128 weight block. Returns [..., N] in ``x.dtype`` (fp32 accumulation, one rounding). A K that is not a
    multiple of 128 (tiny test models) gets a short last activation group, as if zero-padded.
    """
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"fp8_linear: input has {x.shape[-1]} features, the weight {k}")
    a = act_quant_sim(x.float(), BLOCK)
    w = dequantize_fp8_block(weight, scale, (BLOCK, BLOCK))
    return (a.reshape(-1, k) @ w.t()).to(x.dtype).view(*x.shape[:-1], n)


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The grouped output projection ``wo_a`` kept in FP8 (DSV4_SPEC 4.5 step 7): ``z[t, g] = W_g @ x[t, g]``.

    Weight-only: the official conversion dequantizes wo_a to bf16 and runs the einsum on unquantized bf16
    activations, so here the weight is dequantized exactly as the loader would (fp32 product, one rounding to
    the activation dtype) and the activations are used as they are; a kernel that does the same per tile reads
    half the bytes and gives the same values up to the order of the fp32 sums.

    x: [T, G, K]; weight: [G*R, K] float8_e4m3fn; scale: [ceil(G*R/128), ceil(K/128)] fp32. -> [T, G, R] x.dtype.
    """
    t, g, k = x.shape
    if weight.shape[0] % g or weight.shape[1] != k:
        raise ValueError(f"fp8_grouped_linear: weight {tuple(weight.shape)} does not fit {g} groups of {k} inputs")
    w = dequantize_fp8_block(weight, scale, (BLOCK, BLOCK)).to(x.dtype).view(g, -1, k)
    return torch.einsum("tgi,gri->tgr", x, w)
