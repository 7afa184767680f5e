"""Row-parallel output projection: each rank holds a block of the input features (its heads' columns of ``wo_b``)
and its partial products are summed over the group.

One process runs the whole K in one GEMM: fp32 accumulation, one rounding to the activation dtype. Rounding each
rank's partial to bf16 and summing in bf16 (a bf16 all-reduce) rounds two or three times instead, so a TP=2 bf16
run drifts further from fp32 than the one-process run. :func:`row_parallel` keeps the partials fp32 through the
all-reduce and rounds once, as the MoE's partials already are (dsv4/distributed/moe.py).
"""

from __future__ import annotations

from typing import Any

import torch

from dsv4.distributed.comm import all_reduce
from dsv4.distributed.parallel import Group
from dsv4.ops.mm_fp32 import mm_fp32
from dsv4.ops.quant import act_quant_sim


def row_parallel(lin: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
    """``sum over group of lin(x)`` for a :class:`~dsv4.model.layers.Linear` holding this rank's input columns:
    x [T, K / size] -> [T, N] in x.dtype, every rank the same values. At size 1 ``lin(x)`` itself (no copy).

    The partial GEMM returns its fp32 accumulation (native FP8 linears take the fp32 upcast of x: the same FP8
    input quantisation, an fp32 output), the sum runs in fp32, then one rounding.
    """
    if group.size == 1:
        return lin(x)
    if lin.fp8_ops is not None:
        y = lin.fp8_ops.fp8_linear(x.float(), lin.weight, lin.scale)
    else:
        y = mm_fp32(act_quant_sim(x, 128) if lin.act_quant else x, lin.weight)
    return all_reduce(y, group).to(x.dtype)
