"""Who this process is in the parallel layout, and the process groups its collectives run over.

Layout (``world = max(tp, ep)``; the smaller size must divide it):

* attention: tensor parallel over blocks of ``tp`` consecutive ranks (query heads, the output projection,
  the vocabulary); with ``world > tp`` the blocks are replicas that run the same batch.
* MoE: over the whole world. Routed experts are split into ``ep`` contiguous ranges (rank r holds range
  ``r // (world/ep)``), and each range's intermediate dim into ``world/ep`` slices (``moe_tp``); the shared
  expert's intermediate dim is split over the world. Every rank's partial output sums to the layer's output.
* data-parallel attention (``dp > 1``, ``--enable-dp-attention``): the ``dp`` attention blocks (now of
  ``world/dp`` ranks each) run different requests with caches of their own; the ``dp`` group of a rank is the
  ranks at its place in every block (``rank % (world/dp)``), over which the MoE gathers every block's tokens
  (dsv4/distributed/dp_attention.py).

``Parallel.single()`` is the one-process layout: every size 1, no groups, and every collective a no-op.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# collectives that wait longer than this on a peer raise instead of hanging (a rank that died mid-step)
DATA_TIMEOUT = timedelta(minutes=10)
# followers wait on the control group between steps, however long the server sits idle
CONTROL_TIMEOUT = timedelta(days=365)


class ParallelConfigError(ValueError):
    """Sizes that do not make a layout; the message names the flag."""


@dataclass(frozen=True)
class Group:
    """One process group as the collectives see it: its size, this rank's index in it, the torch group."""

    size: int = 1
    rank: int = 0
    pg: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Parallel:
    """This rank's place in the layout (module doc). ``tp``: the attention group; ``world``: the MoE group
    (all ranks); ``dp``: the data-parallel attention group (size 1 without it); ``control``: a gloo group for
    the host messages rank 0 sends each step (None at size 1); ``step``: what the current forward's ranks hold
    (set before each forward under data-parallel attention)."""

    tp: Group = Group()
    world: Group = Group()
    ep_size: int = 1
    ep_rank: int = 0
    control: Any = field(default=None, compare=False, repr=False)
    dp: Group = Group()
    step: DPStep = field(default_factory=lambda: DPStep(), compare=False, repr=False)

    @staticmethod
    def single() -> Parallel:
        return SINGLE

    @property
    def tp_size(self) -> int:
        return self.tp.size

    @property
    def tp_rank(self) -> int:
        return self.tp.rank

    @property
    def world_size(self) -> int:
        return self.world.size

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def moe_tp_size(self) -> int:
        """Slices of each routed expert's intermediate dim (ranks that share one expert range)."""
        return self.world.size // self.ep_size

    @property
    def moe_tp_rank(self) -> int:
        return self.world.rank % self.moe_tp_size

    @property
    def dp_size(self) -> int:
        return self.dp.size

    @property
    def dp_rank(self) -> int:
        return self.dp.rank

    @property
    def drives(self) -> bool:
        """Rank 0 of a multi-rank world: it schedules and sends each step's batch to the others."""
        return self.world.size > 1 and self.world.rank == 0


@dataclass
class DPStep:
    """Host values of one data-parallel forward, the same on every rank (rank 0 sends them with the batch):
    ``tokens[d]`` = tokens attention rank ``d`` runs (at least 1: an idle rank runs one padding token)."""

    tokens: list[int] = field(default_factory=lambda: [1])


SINGLE = Parallel()


def world_size_for(tp_size: int, ep_size: int) -> int:
    """Ranks a ``--tp-size``/``--ep-size`` pair needs; raises :class:`ParallelConfigError` if they do not nest."""
    for name, v in (("tp-size", tp_size), ("ep-size", ep_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ParallelConfigError(f"--{name} must be an integer >= 1, got {v!r}")
    world = max(tp_size, ep_size)
    if world % tp_size or world % ep_size:
        raise ParallelConfigError(f"--tp-size {tp_size} and --ep-size {ep_size}: the smaller must divide the larger")
    return world


def attention_tp_size(tp_size: int, ep_size: int, dp_size: int = 1) -> int:
    """Ranks of one attention block: ``--tp-size``, or under data-parallel attention ``world / --dp-size``."""
    world = world_size_for(tp_size, ep_size)
    if dp_size == 1:
        return tp_size
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1 or world % dp_size:
        raise ParallelConfigError(f"--dp-size {dp_size} must divide the {world} ranks of max(--tp-size, --ep-size)")
    return world // dp_size


def layout(tp_size: int, ep_size: int, rank: int, dp_size: int = 1) -> Parallel:
    """The layout of ``rank`` without process groups (what :func:`from_world` fills in)."""
    world = world_size_for(tp_size, ep_size)
    attn = attention_tp_size(tp_size, ep_size, dp_size)
    if not 0 <= rank < world:
        raise ParallelConfigError(f"rank {rank} outside a world of {world}")
    return Parallel(tp=Group(attn, rank % attn), world=Group(world, rank), ep_size=ep_size,
                    ep_rank=rank // (world // ep_size), dp=Group(dp_size, rank // attn))


@functools.cache
def from_world(tp_size: int, ep_size: int, dp_size: int = 1) -> Parallel:
    """This process's :class:`Parallel` in the world torch.distributed was initialised with (by the launcher).

    Without an initialised default group only sizes 1 are allowed (:data:`SINGLE`). Creating the groups is a
    collective: every rank calls this with the same sizes, in the same order; the result is kept per process,
    as torch.distributed keeps its default group.
    """
    world = world_size_for(tp_size, ep_size)
    if not dist.is_initialized():
        if world > 1:
            raise ParallelConfigError(f"--tp-size {tp_size} --ep-size {ep_size} needs {world} processes: start it "
                                      f"with `dsv4 generate` or `dsv4 serve`, which launch them")
        return SINGLE
    if dist.get_world_size() != world:
        raise ParallelConfigError(f"--tp-size {tp_size} --ep-size {ep_size} needs {world} ranks, torch.distributed "
                                  f"has {dist.get_world_size()}")
    base = layout(tp_size, ep_size, dist.get_rank(), dp_size)
    if world == 1:
        return base
    attn = base.tp_size
    tp_pg = dp_pg = dist.group.WORLD
    if attn < world:
        # every rank creates every block's group, in the same order, as new_group requires
        for start in range(0, world, attn):
            pg = dist.new_group(list(range(start, start + attn)), timeout=DATA_TIMEOUT)
            if start <= base.rank < start + attn:
                tp_pg = pg
    if 1 < dp_size < world:
        for place in range(attn):
            pg = dist.new_group(list(range(place, world, attn)), timeout=DATA_TIMEOUT)
            if base.tp_rank == place:
                dp_pg = pg
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return Parallel(tp=Group(attn, base.tp_rank, tp_pg), world=Group(world, base.rank, dist.group.WORLD),
                    ep_size=ep_size, ep_rank=base.ep_rank, control=control,
                    dp=Group(dp_size, base.dp_rank, dp_pg if dp_size > 1 else None))


def agree_min(par: Parallel, value: int, device: torch.device) -> int:
    """The smallest ``value`` over all ranks (cache sizes every rank must share); ``value`` itself at size 1."""
    if par.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=par.world.pg)
    return int(t.item())


def check_model(cfg: Any, par: Parallel) -> None:
    """Raise :class:`ParallelConfigError` unless ``cfg`` (a ModelConfig) splits evenly over ``par``'s layout."""
    inter = cfg.moe_intermediate_size
    attn = "--tp-size" if par.dp_size == 1 else "max(--tp-size, --ep-size) / --dp-size"
    need = [("query heads", cfg.num_heads, par.tp_size, attn),
            ("output groups (o_groups)", cfg.o_groups, par.tp_size, attn),
            ("routed experts", cfg.n_routed_experts, par.ep_size, "--ep-size"),
            ("routed experts' intermediate size", inter, par.moe_tp_size, "max(--tp-size, --ep-size) / --ep-size")]
    if cfg.n_shared_experts:
        need.append(("shared expert's intermediate size", cfg.n_shared_experts * inter, par.world_size,
                     "max(--tp-size, --ep-size)"))
    for what, n, parts, flag in need:
        if n % parts:
            raise ParallelConfigError(f"the model's {n} {what} do not split over {parts} ranks ({flag})")
