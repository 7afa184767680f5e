"""The other ranks' caches follow rank 0's cache manager: slots and pages are handed out on rank 0 (its
scheduler owns them), and what that does to the device state (a fresh slot's reset compressor state, page-table
rows) must happen on every rank before the forward that relies on it.

Rank 0's :class:`MirroredCacheManager` records each allocation call; the calls travel with the next batch and
every other rank replays them, in order, on its own :class:`CacheManager`. The manager is deterministic, so
the replicas hand out the same slots and pages.
"""

from __future__ import annotations

from typing import Any

from dsv4.cache.manager import CacheManager, SlotSnapshot

Op = tuple[str, tuple[Any, ...]]


class MirroredCacheManager(CacheManager):
    """A :class:`CacheManager` that records ``alloc``/``reserve``/``free`` for the other ranks to replay."""

    def __init__(self, cache: Any) -> None:
        super().__init__(cache)
        self.pending: list[Op] = []

    def alloc(self, fit_tokens: int = 0) -> int:
        slot = super().alloc(fit_tokens)
        self.pending.append(("alloc", ()))
        return slot

    def reserve(self, slot: int, total_tokens: int) -> None:
        super().reserve(slot, total_tokens)  # all or nothing: a failed reserve changed nothing to replay
        self.pending.append(("reserve", (slot, total_tokens)))

    def free(self, slot: int) -> None:
        super().free(slot)
        self.pending.append(("free", (slot,)))

    def snapshot(self, slot: int) -> SlotSnapshot:
        raise NotImplementedError("cache snapshots are not mirrored to the other ranks yet (--tp-size/--ep-size > 1)")

    def restore(self, slot: int, snap: SlotSnapshot) -> None:
        raise NotImplementedError("cache snapshots are not mirrored to the other ranks yet (--tp-size/--ep-size > 1)")

    def take_ops(self) -> list[Op]:
        """The calls since the last batch was sent, oldest first."""
        ops, self.pending = self.pending, []
        return ops


def replay(manager: CacheManager, ops: list[Op]) -> None:
    """Apply rank 0's recorded calls to this rank's manager."""
    for name, args in ops:
        if name not in ("alloc", "reserve", "free"):
            raise ValueError(f"unknown cache operation {name!r}")
        getattr(manager, name)(*args)
