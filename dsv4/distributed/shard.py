"""Which part of each checkpoint tensor a rank holds, from the ``split`` column of the weight table
(:class:`dsv4.weights.TensorSpec`): a group and a dim.

"tp0"/"tp1": rows/columns over the attention group; "vocab0": rows over the attention group, the vocabulary
padded to whole shards; "world0"/"world1": over every rank (the shared expert); "moe0"/"moe1": over the ranks
that share one range of routed experts. Routed experts themselves go to ranks by range (:func:`local_expert`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from dsv4.distributed.parallel import Parallel, ParallelConfigError
from dsv4.distributed.vocab import vocab_shard


class Shard(NamedTuple):
    """The part of a tensor one rank holds: ``[start, stop)`` along ``dim`` of the logical shape, in a
    parameter ``size`` long along that dim (more than stop - start only for the vocabulary's zero padding)."""

    dim: int
    start: int
    stop: int
    size: int


def shard_of(spec: Any, par: Parallel) -> Shard | None:
    """This rank's :class:`Shard` of table entry ``spec`` (None: it holds all of it). Raises
    :class:`ParallelConfigError` when the dim does not split evenly."""
    if not spec.split:
        return None
    group, dim = spec.split[:-1], int(spec.split[-1])
    n = spec.shape[dim]
    if group == "vocab":
        if par.tp_size == 1:
            return None
        start, size = vocab_shard(n, par.tp)
        return Shard(dim, min(start, n), min(start + size, n), size)
    ranks, rank = {"tp": (par.tp_size, par.tp_rank), "world": (par.world_size, par.rank),
                   "moe": (par.moe_tp_size, par.moe_tp_rank)}[group]
    if ranks == 1:
        return None
    if n % ranks:
        raise ParallelConfigError(f"tensor {spec.name!r}: dim {dim} of shape {spec.shape} does not split over "
                                  f"{ranks} ranks")
    size = n // ranks
    return Shard(dim, rank * size, (rank + 1) * size, size)


def local_expert(expert: int, n_experts: int, par: Parallel) -> int | None:
    """Index of routed expert ``expert`` (of ``n_experts``) in this rank's stack; None if another rank holds it."""
    n = n_experts // par.ep_size
    e = expert - par.ep_rank * n
    return e if 0 <= e < n else None
