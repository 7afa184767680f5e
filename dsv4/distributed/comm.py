"""Collectives over a :class:`~dsv4.distributed.parallel.Group`: no-ops (no copy, no launch) at size 1.

They run on the device tensors' own backend (NCCL on CUDA, gloo on CPU) and never sync the host, so they can
sit inside a captured CUDA graph.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsv4.distributed.parallel import Group

# torch 2.13 renamed the flat-tensor collectives; older releases (>= 2.11 is supported) have only the old names
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum ``x`` over the group, in place; returns ``x``."""
    if group.size == 1:
        return x
    dist.all_reduce(x, group=group.pg)
    return x


def all_gather(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's ``x`` (same shape everywhere) along ``dim``, in rank order."""
    if group.size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((group.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather(out, x, group=group.pg)
    dim = dim % x.dim()
    if dim == 0:
        return out
    # [size * n0, ...] -> [size, n0, ...] -> the ranks' blocks side by side along dim
    return out.view(group.size, *x.shape).movedim(0, dim).flatten(dim, dim + 1)


def reduce_scatter(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum ``x`` [n, ...] over the group and keep this rank's rows ``[rank*n/size, (rank+1)*n/size)``."""
    if group.size == 1:
        return x
    if x.shape[0] % group.size:
        raise ValueError(f"reduce_scatter: {x.shape[0]} rows do not split over {group.size} ranks")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // group.size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter(out, x, group=group.pg)
    return out
