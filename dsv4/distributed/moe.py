"""The MoE layer over several ranks: expert parallel (routed experts split by range), the experts' and the
shared expert's intermediate dims split over the ranks that share them, one all-reduce to combine.

Every rank routes every token (the gate is replicated, so all ranks pick the same experts) and runs only
its own experts' slices through the model's ``OpSet.moe_experts``; the partial outputs, already weighted by
the routing, sum to the layer's output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dsv4.distributed.comm import all_reduce
from dsv4.distributed.parallel import Parallel

if TYPE_CHECKING:
    from dsv4.model.moe import MoE


def local_hits(weights: torch.Tensor, ids: torch.Tensor, par: Parallel, n_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing (weights [N, k] fp32, global ids [N, k]) -> the same hits in this rank's expert numbering.

    A hit of another rank's expert keeps its slot with weight 0 on a local expert (``id % n_local``, spread
    over them): its output is exactly zero. NOTE: ``moe_experts`` groups hits by expert on the device without a
    host sync, so hits cannot be dropped here; the zero hits cost FLOPs but no weight reads.
    """
    if par.ep_size == 1:
        return weights, ids
    local = ids - par.ep_rank * n_local
    mine = (local >= 0) & (local < n_local)
    return torch.where(mine, weights, 0.0), torch.where(mine, local, ids % n_local)


def moe_parallel(moe: MoE, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, par: Parallel) -> torch.Tensor:
    """This rank's share of ``moe``'s output for x [T, D] and the routing (weights, global ids), summed over the
    world: [T, D] in x.dtype. Partials are fp32 and summed in fp32, then rounded once, as the one-rank op does."""
    experts = moe.experts.stack()
    weights, ids = local_hits(weights, ids, par, experts.w1.shape[0])
    sh = moe.shared_experts
    # the fused kernel needs the shared slice as wide as the routed one: true when no rank holds whole experts
    fused = sh is not None and sh.w1.weight.shape[0] == experts.w1.shape[1]
    out = moe.ops.moe_experts(x, experts, weights, ids, moe.limit, moe.act_quant, sh.stack() if fused else None,
                              sh.limit if fused else None, out_dtype=torch.float32)
    if sh is not None and not fused:
        n = x.shape[0]
        out += moe.ops.moe_experts(x, sh.stack(), torch.ones(n, 1, device=x.device),
                                   torch.zeros(n, 1, dtype=torch.int64, device=x.device), sh.limit, moe.act_quant,
                                   out_dtype=torch.float32)
    return all_reduce(out, par.world).to(x.dtype)
