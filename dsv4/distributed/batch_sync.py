"""Rank 0 sends each forward's batch to the other ranks, which run the same forward on their slices.

One step is two messages: a header of host values over the gloo control group (the mode, the host mirrors,
the sizes, and rank 0's cache-manager calls since the last step: dsv4/distributed/cache_mirror.py), then the
batch's device tensors packed into one int64 tensor, broadcast over the world group (NCCL on GPUs: no host
sync on rank 0, and it keeps stream order with the forward). A header of ``None`` ends the followers' loop.
"""

from __future__ import annotations

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
    tensors = [getattr(batch, f) for f in _FIELDS]
    _broadcast_header(par, {
        "cache_ops": cache_ops, "mode": batch.mode.value, "sizes": [int(t.shape[0]) for t in tensors], "slots": batch.slots_cpu,
        "prefix_lens": batch.prefix_lens_cpu, "extend_lens": batch.extend_lens_cpu, "starts": batch.starts_cpu,
    })
    packed = torch.cat([t.to(torch.int64) for t in tensors])
    dist.broadcast(packed, src=0, group=par.world.pg)


def send_stop(par: Parallel) -> None:
    """Rank 0: end the followers' loops (after the last forward)."""
    _broadcast_header(par, None)


def recv_batch(par: Parallel, device: torch.device) -> tuple[ForwardBatch, list[Op]] | None:
    """Other ranks: wait for rank 0's next batch; returns it with the cache-manager calls to replay first, or
    None when rank 0 has stopped."""
    header = _broadcast_header(par, None)
    if header is None:
        return None
    sizes = header["sizes"]
    packed = torch.empty(sum(sizes), dtype=torch.int64, device=device)
    dist.broadcast(packed, src=0, group=par.world.pg)
    parts = dict(zip(_FIELDS, packed.split(sizes), strict=True))
    batch = ForwardBatch(mode=ForwardMode(header["mode"]), **parts, slots_cpu=header["slots"],
                         prefix_lens_cpu=header["prefix_lens"], extend_lens_cpu=header["extend_lens"],
                         starts_cpu=header["starts"])
    return batch, header["cache_ops"]
