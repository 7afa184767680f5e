"""Slot and page allocation over a :class:`ModelCache`, with per-request snapshot and restore."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.cache.model_cache import ModelCache, pages_needed


class CacheFullError(RuntimeError):
    """No free slot or not enough free pages for the requested length."""


@dataclass
class SlotSnapshot:
    """Copy of one slot's state: every per-slot tensor row and its page-table rows."""

    slot: int
    num_pages: dict[int, int]
    tensors: dict[tuple[int, str], torch.Tensor]
    page_rows: dict[int, torch.Tensor]


class CacheManager:
    """Hands out request slots and compressed-pool pages; frees them; snapshots one slot's state.

    Pages are allocated per compression ratio: page id k of ratio r is valid in every layer of that ratio
    (the compressed entries and the indexer keys of all CSA layers share one table).
    """

    def __init__(self, cache: ModelCache) -> None:
        self.cache = cache
        self.free_slots = list(range(cache.num_slots - 1, -1, -1))
        # page 0 is the dummy page
        self.free_pages = {r: list(range(n - 1, 0, -1)) for r, n in cache.num_pages.items()}
        self.slot_pages: dict[int, dict[int, list[int]]] = {}

    # ---- queries -----------------------------------------------------------------------------------------
    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    def pages_in_use(self) -> dict[int, int]:
        return {r: self.cache.num_pages[r] - 1 - len(f) for r, f in self.free_pages.items()}

    def extra_pages(self, slot: int | None, total_tokens: int) -> dict[int, int]:
        """Pages per ratio a slot (or a new request) needs to grow to ``total_tokens`` tokens."""
        have = self.slot_pages.get(slot, {}) if slot is not None else {}
        return {
            r: max(0, pages_needed(total_tokens, r, self.cache.page_size) - len(have.get(r, [])))
            for r in self.free_pages
        }

    def shares_pool(self, a: int, b: int) -> bool:
        """Whether slots ``a`` and ``b`` draw on the same pages (always, here; not across data-parallel
        attention ranks): freeing one can make room for the other."""
        return True

    def usage(self) -> dict[str, float]:
        """Fraction in use: ``"slots"`` and ``"compressed_kv_pages:<ratio>"`` per ratio."""
        out = {"slots": 1 - self.num_free_slots / self.cache.num_slots}
        for r, used in sorted(self.pages_in_use().items()):
            out[f"compressed_kv_pages:{r}"] = used / max(1, self.cache.num_pages[r] - 1)
        return out

    def can_fit(self, slot: int | None, total_tokens: int) -> bool:
        if total_tokens > self.cache.max_seq_len:
            return False
        if slot is None and not self.free_slots:
            return False
        return all(n <= len(self.free_pages[r]) for r, n in self.extra_pages(slot, total_tokens).items())

    # ---- allocation ----------------------------------------------------------------------------------------
    def withhold_slot(self) -> int:
        """Take the highest slot out of circulation for good (CUDA-graph padding rows write there); its page
        table rows stay on the dummy page 0."""
        slot = max(self.free_slots)
        self.free_slots.remove(slot)
        return slot

    def alloc(self, fit_tokens: int = 0) -> int:
        """A fresh slot with reset compressor state and no pages. ``fit_tokens``: what the caller reserves next
        (``can_fit(None, fit_tokens)`` was checked); a data-parallel manager picks a rank that fits it."""
        if not self.free_slots:
            raise CacheFullError("no free request slot")
        slot = self.free_slots.pop()
        self.slot_pages[slot] = {r: [] for r in self.free_pages}
        for lc in self.cache.layers.values():
            lc.reset_slot(slot)
        return slot

    def reserve(self, slot: int, total_tokens: int) -> None:
        """Make room for the compressed entries of ``total_tokens`` tokens (all or nothing)."""
        if total_tokens > self.cache.max_seq_len:
            raise CacheFullError(f"{total_tokens} tokens exceed the cache's max_seq_len {self.cache.max_seq_len}")
        need = self.extra_pages(slot, total_tokens)
        if any(n > len(self.free_pages[r]) for r, n in need.items()):
            raise CacheFullError(f"not enough free pages for {total_tokens} tokens")
        for r, n in need.items():
            pages = self.slot_pages[slot][r]
            for _ in range(n):
                page = self.free_pages[r].pop()
                self.cache.page_tables[r][slot, len(pages)] = page
                pages.append(page)

    def free(self, slot: int) -> None:
        """Return a slot and all its pages (finish or abort)."""
        if slot not in self.slot_pages:
            raise KeyError(f"slot {slot} is not allocated")
        for r, pages in self.slot_pages.pop(slot).items():
            self.free_pages[r].extend(reversed(pages))
            self.cache.page_tables[r][slot].zero_()
        self.free_slots.append(slot)

    # ---- snapshot / restore --------------------------------------------------------------------------------
    def snapshot(self, slot: int) -> SlotSnapshot:
        """Copy everything a later step could overwrite for ``slot`` (the window ring and the tails).

        Compressed entries already emitted are never rewritten at a lower index, so the pools are not copied;
        entries past the restored length are dead and get overwritten when their windows close again.
        """
        tensors = {
            (lid, name): t[slot].clone()
            for lid, lc in self.cache.layers.items()
            for name, t in lc.slot_tensors().items()
        }
        rows = {r: t[slot].clone() for r, t in self.cache.page_tables.items()}
        return SlotSnapshot(slot, {r: len(p) for r, p in self.slot_pages[slot].items()}, tensors, rows)

    def restore(self, slot: int, snap: SlotSnapshot) -> None:
        """Put ``slot`` back to the snapshot's state; pages allocated since then are released."""
        for (lid, name), t in snap.tensors.items():
            getattr(self.cache.layers[lid], name)[slot].copy_(t)
        for r, keep in snap.num_pages.items():
            pages = self.slot_pages[slot][r]
            while len(pages) > keep:
                self.free_pages[r].append(pages.pop())
            self.cache.page_tables[r][slot].copy_(snap.page_rows[r])
