"""The MoE layer over several ranks: expert parallel (routed experts split by range), the experts' and the
shared expert's intermediate dims split over the ranks that share them, one all-reduce to combine.

Every rank routes every token (the gate is replicated, so all ranks pick the same experts) and runs only
its own experts' slices through the model's ``OpSet.moe_experts``; the partial outputs, already weighted by
the routing, sum to the layer's output. Under data-parallel attention every group's tokens are gathered for
the experts first (:func:`moe_data_parallel`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dsv4.distributed.comm import all_gather, all_reduce, reduce_scatter
from dsv4.distributed.parallel import Parallel

if TYPE_CHECKING:
    from dsv4.model.moe import MoE


def local_hits(weights: torch.Tensor, ids: torch.Tensor, par: Parallel, n_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing (weights [N, k] fp32, global ids [N, k]) -> the same hits in this rank's expert numbering.

    A hit of another rank's expert keeps its slot with weight 0 (its output is exactly zero) on one local expert
    that the batch reads anyway: the lowest this rank has a hit of (the last one when it has none). Spread over
    the local experts instead, the zero hits made each rank read up to N*k experts at decode, as many as without
    expert parallelism. NOTE: ``moe_experts`` groups hits by expert on the device without a host sync, so hits
    cannot be dropped here; the zero hits still cost FLOPs.
    """
    if par.ep_size == 1:
        return weights, ids
    local = ids - par.ep_rank * n_local
    mine = (local >= 0) & (local < n_local)
    spare = torch.where(mine, local, n_local - 1).amin()  # a device scalar: no sync
    return torch.where(mine, weights, 0.0), torch.where(mine, local, spare)


def _partials(moe: MoE, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, par: Parallel) -> torch.Tensor:
    """This rank's fp32 share [T, D] of ``moe``'s output for x [T, D] and the routing (weights, global ids)."""
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
    return out


def moe_parallel(moe: MoE, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, par: Parallel) -> torch.Tensor:
    """This rank's share of ``moe``'s output for x [T, D] and the routing (weights, global ids), summed over the
    world: [T, D] in x.dtype. Partials are fp32 and summed in fp32, then rounded once, as the one-rank op does."""
    return all_reduce(_partials(moe, x, weights, ids, par), par.world).to(x.dtype)


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[0] == n else torch.cat([t, t.new_zeros(n - t.shape[0], *t.shape[1:])])


def moe_data_parallel(moe: MoE, x: torch.Tensor, input_ids: torch.Tensor, par: Parallel) -> torch.Tensor:
    """The MoE under data-parallel attention: x [T, D] and input_ids [T] are this attention group's tokens.

    Every group's rows, padded to the step's largest group (``par.step.tokens``, host values: static shapes,
    no sync), are all-gathered over the dp group, routed (the gate is replicated: every rank routes the same
    rows alike) and run through this rank's experts; the fp32 partial sums are reduce-scattered back (all-reduced
    and sliced when a group has several ranks, which all need the group's rows). Returns [T, D] in x.dtype.
    """
    most = max(par.step.tokens)
    n = x.shape[0]
    xs = all_gather(_pad_rows(x, most), par.dp, dim=0)
    # hash routing reads the token ids; the scored gate ignores them
    ids_all = all_gather(_pad_rows(input_ids, most), par.dp, dim=0) if moe.gate.is_hash else input_ids
    weights, ids = moe.gate(xs, ids_all)
    out = _partials(moe, xs, weights, ids, par)
    if par.tp_size == 1:  # the dp group is the world: each rank keeps its own block of rows
        out = reduce_scatter(out, par.world)
    else:
        out = all_reduce(out, par.world)[par.dp_rank * most : (par.dp_rank + 1) * most]
    return out[:n].to(x.dtype)
