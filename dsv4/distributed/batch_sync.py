"""Rank 0 sends each forward's batch to the other ranks, which run the same forward on their slices.

One step is two messages: a header of host values over the gloo control group (the mode, the host mirrors,
the sizes, rank 0's cache-manager calls since the last step: dsv4/distributed/cache_mirror.py, and any extra
values of the step), then the batch's device tensors packed into one int64 tensor, broadcast over the world
group (NCCL on GPUs: no host sync on rank 0, and it keeps stream order with the forward). A header of
``None`` ends the followers' loop.

Under data-parallel attention one step carries one batch (and one list of cache calls) per attention group:
every rank receives them all in the same two messages and keeps its own group's (``par.dp_rank``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from dsv4.distributed.cache_mirror import Op
from dsv4.distributed.parallel import Parallel
from dsv4.engine.forward_batch import ForwardBatch, ForwardMode

_FIELDS = ("input_ids", "positions", "slots", "prefix_lens", "extend_lens", "starts", "logits_rows")


def _broadcast_header(par: Parallel, header: dict | None) -> dict | None:
    box = [header]
    dist.broadcast_object_list(box, src=0, group=par.control)
    return box[0]


def send_batch(par: Parallel, batch: ForwardBatch, cache_ops: list[Op]) -> None:
    """Rank 0: send ``batch`` and the cache-manager calls made since the last one to every other rank (call
    right before running it)."""
    send_batches(par, [batch], [cache_ops])


def send_batches(par: Parallel, batches: list[ForwardBatch], cache_ops: list[list[Op]],
                 extra: dict[str, Any] | None = None) -> None:
    """Rank 0: send batch ``d`` and cache calls ``d`` to the ranks of attention group ``d`` (one of each without
    data-parallel attention), with ``extra`` host values for every rank."""
    tensors = [getattr(b, f) for b in batches for f in _FIELDS]
    _broadcast_header(par, {
        "cache_ops": cache_ops, "extra": extra or {},
        "batches": [{"mode": b.mode.value, "slots": b.slots_cpu, "prefix_lens": b.prefix_lens_cpu,
                     "extend_lens": b.extend_lens_cpu, "starts": b.starts_cpu} for b in batches],
        "sizes": [int(t.shape[0]) for t in tensors],
    })
    packed = torch.cat([t.to(torch.int64) for t in tensors])
    dist.broadcast(packed, src=0, group=par.world.pg)


def send_stop(par: Parallel) -> None:
    """Rank 0: end the followers' loops (after the last forward)."""
    _broadcast_header(par, None)


def recv_batch(par: Parallel, device: torch.device) -> tuple[ForwardBatch, list[Op], dict[str, Any]] | None:
    """Other ranks: wait for rank 0's next batch; returns this rank's batch with the cache-manager calls to
    replay first and the step's extra values, or None when rank 0 has stopped."""
    header = _broadcast_header(par, None)
    if header is None:
        return None
    sizes = header["sizes"]
    packed = torch.empty(sum(sizes), dtype=torch.int64, device=device)
    dist.broadcast(packed, src=0, group=par.world.pg)
    mine = 0 if len(header["batches"]) == 1 else par.dp_rank
    n = len(_FIELDS)
    parts = packed.split(sizes)[mine * n : (mine + 1) * n]
    host = header["batches"][mine]
    batch = ForwardBatch(mode=ForwardMode(host["mode"]), **dict(zip(_FIELDS, parts, strict=True)),
                         slots_cpu=host["slots"], prefix_lens_cpu=host["prefix_lens"],
                         extend_lens_cpu=host["extend_lens"], starts_cpu=host["starts"])
    return batch, header["cache_ops"][mine], header["extra"]
