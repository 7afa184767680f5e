"""The MoE layer over several ranks: expert parallel (routed experts split by range), the experts' and the
shared expert's intermediate dims split over the ranks that share them, one all-reduce to combine.

Every rank routes every token (the gate is replicated, so all ranks pick the same experts) and runs only
its own experts' slices through the model's ``OpSet.moe_experts``, the other ranks' hits marked -1 (skipped);
the partial outputs, already weighted by the routing, sum to the layer's output. Under data-parallel attention
every group's tokens are gathered for the experts first, the padding rows' hits skipped too
(:func:`moe_data_parallel`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dsv4.distributed.comm import all_gather, all_reduce, reduce_scatter
from dsv4.distributed.parallel import Parallel

if TYPE_CHECKING:
    from dsv4.model.moe import MoE


def local_hits(weights: torch.Tensor, ids: torch.Tensor, par: Parallel, n_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing (weights [N, k] fp32, global ids [N, k], -1 for a padding row's hits) -> the same hits in this
    rank's expert numbering, -1 for every hit of another rank's expert (``moe_experts`` with ``may_skip`` computes
    nothing for them; their weights are left as they are, never read).

    NOTE: ``moe_experts`` groups hits by expert on the device without a host sync, so hits cannot be dropped
    here; an id of -1 keeps the hit's slot, and the kernels skip it (no FLOPs, no weight reads). The old form (a
    weight of 0 on a local expert) gave the same sums but computed every rank's hits on every rank.
    """
    if par.ep_size == 1:
        return weights, ids
    local = ids - par.ep_rank * n_local
    mine = (local >= 0) & (local < n_local)
    return weights, torch.where(mine, local, -1)


def _partials(moe: MoE, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, par: Parallel,
              padded: bool = False) -> torch.Tensor:
    """This rank's fp32 share [T, D] of ``moe``'s output for x [T, D] and the routing (weights, global ids;
    ``padded``: ids of -1 mark padding rows)."""
    experts = moe.experts.stack()
    n = x.shape[0]
    # the shared expert's one hit per row: id 0, or -1 on a padding row (whose routed hits are all -1)
    sh_ids = ids[:, :1].clamp(max=0) if padded else torch.zeros(n, 1, dtype=torch.int64, device=x.device)
    weights, ids = local_hits(weights, ids, par, experts.w1.shape[0])
    skip = padded or par.ep_size > 1
    sh = moe.shared_experts
    # the fused kernel needs the shared slice as wide as the routed one: true when no rank holds whole experts
    fused = sh is not None and sh.w1.weight.shape[0] == experts.w1.shape[1]
    out = moe.ops.moe_experts(x, experts, weights, ids, moe.limit, moe.act_quant, sh.stack() if fused else None,
                              sh.limit if fused else None, out_dtype=torch.float32, may_skip=skip)
    if sh is not None and not fused:
        out += moe.ops.moe_experts(x, sh.stack(), torch.ones(n, 1, device=x.device), sh_ids, sh.limit,
                                   moe.act_quant, out_dtype=torch.float32, may_skip=padded)
    return out


def moe_parallel(moe: MoE, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, par: Parallel) -> torch.Tensor:
    """This rank's share of ``moe``'s output for x [T, D] and the routing (weights, global ids), summed over the
    world: [T, D] in x.dtype. Partials are fp32 and summed in fp32, then rounded once, as the one-rank op does."""
    return all_reduce(_partials(moe, x, weights, ids, par), par.world).to(x.dtype)


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[0] == n else torch.cat([t, t.new_zeros(n - t.shape[0], *t.shape[1:])])


def _skip_padding(ids: torch.Tensor, tokens: list[int], most: int) -> tuple[torch.Tensor, bool]:
    """ids [G * most, k] of G groups' rows, group g's real rows the first ``tokens[g]`` of its block -> the same
    with every padding row's hits -1 (a copy; fills of host-known slices, no sync), and whether any row was."""
    if min(tokens) == most:  # every decode graph's step: nothing to mark
        return ids, False
    ids = ids.clone()
    for g, t in enumerate(tokens):
        ids[g * most + t : (g + 1) * most] = -1
    return ids, True


def moe_data_parallel(moe: MoE, x: torch.Tensor, input_ids: torch.Tensor, par: Parallel) -> torch.Tensor:
    """The MoE under data-parallel attention: x [T, D] and input_ids [T] are this attention group's tokens.

    Every group's rows, padded to the step's largest group (``par.step.tokens``, host values: static shapes,
    no sync), are all-gathered over the dp group, routed (the gate is replicated: every rank routes the same
    rows alike) and run through this rank's experts, the padding rows' hits skipped (id -1); the fp32 partial
    sums are reduce-scattered back (all-reduced and sliced when a group has several ranks, which all need the
    group's rows). Returns [T, D] in x.dtype.
    """
    most = max(par.step.tokens)
    n = x.shape[0]
    xs = all_gather(_pad_rows(x, most), par.dp, dim=0)
    # hash routing reads the token ids; the scored gate ignores them
    ids_all = all_gather(_pad_rows(input_ids, most), par.dp, dim=0) if moe.gate.is_hash else input_ids
    weights, ids = moe.gate(xs, ids_all)
    ids, padded = _skip_padding(ids, par.step.tokens, most)
    out = _partials(moe, xs, weights, ids, par, padded)
    if par.tp_size == 1:  # the dp group is the world: each rank keeps its own block of rows
        out = reduce_scatter(out, par.world)
    else:
        out = all_reduce(out, par.world)[par.dp_rank * most : (par.dp_rank + 1) * most]
    return out[:n].to(x.dtype)
