"""``x @ w^T`` returned in fp32 from the GEMM's fp32 accumulation, for bf16/fp16 operands held in their own dtype.

Where the official model runs an fp32 GEMM on weights that the checkpoint stores in bf16 (the LM head, the
compressors' ``wkv``/``wgate``) and on an input that is itself a bf16 value (a norm's or an embedding's output),
every product of the upcast operands is exact in fp32: a bf16 GEMM that accumulates in fp32 and returns the fp32
sum computes the same function (only the summation order differs), while reading half the weight bytes and
without materialising an fp32 copy of either operand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mm_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x: [..., K], w: [N, K] -> [..., N] fp32.

    fp32 operands: a plain fp32 GEMM. On CUDA with x and w of the same 16-bit dtype: one GEMM with an fp32 output
    (``torch.mm(..., out_dtype=float32)``). Elsewhere (the CPU reference path): upcast operands. NOTE: a 16-bit
    ``w`` with an fp32 ``x`` upcasts too: ``x`` is only narrowed when it already has ``w``'s dtype."""
    if x.dtype == torch.float32 and w.dtype == torch.float32:
        return F.linear(x, w)
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype:
        return torch.mm(x.reshape(-1, x.shape[-1]), w.t(), out_dtype=torch.float32).view(*x.shape[:-1], -1)
    return F.linear(x.float(), w.float())
