"""The tensors of every cache kind, per layer (DESIGN.md "Caches").

Per request slot (fixed size, however long the context):
  * ``ring``  [slots, window + slack, head_dim]: the sliding-window KV; position p lives at row p % ring.
  * compressor tails (fp32): ``kv_state`` / ``score_state`` [slots, c*m + slack, c*d] where m is the ratio and
    c = 2 for CSA (overlapping windows), 1 for HCA: a ring indexed by position (row q % rows holds token q's
    projections; not the official code's shifting layout, see dsv4/ops/compressor.py), with the window ring's
    slack so that rejected speculative rows never replace rows a later window reads. Scores include the
    position bias. Reset to kv = 0 and score = -inf when a slot is handed out: that is "no previous window".
  * the indexer's compressor tail, same layout with d = index_head_dim (CSA only).
Paged pools (grow with context), addressed through one page table per compression ratio:
  * ``comp`` [pages, page_size, head_dim]: compressed KV entries; entry i of a slot is at
    ``comp[table[slot, i // page_size], i % page_size]``.
  * ``index_keys`` [pages, page_size, index_head_dim]: the indexer's keys (CSA only), same table.
Page 0 is a dummy page that is never handed out (padding rows of captured graphs can point at it).

``kv_cache_dtype`` ("auto": the activation dtype, "bf16", "fp8") sets how the ring and ``comp`` hold KV rows; with
"fp8" each is three tensors (:class:`~dsv4.ops.kv_fp8.Fp8KV`): ``ring``/``comp`` the FP8 nope dims,
``*_scale`` one e8m0 byte per 64 of them, ``*_rope`` the rope dims in the activation dtype (``ring_store`` /
``comp_store`` give the store the ops take).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.config import CSA, SLIDING, ModelConfig
from dsv4.ops.kv_fp8 import Fp8KV, alloc_fp8_kv

KV_CACHE_DTYPES = ("auto", "bf16", "fp8")


@dataclass
class LayerCache:
    layer_id: int
    kind: str
    ratio: int
    ring: torch.Tensor
    page_table: torch.Tensor | None = None
    comp: torch.Tensor | None = None
    kv_state: torch.Tensor | None = None
    score_state: torch.Tensor | None = None
    index_keys: torch.Tensor | None = None
    index_kv_state: torch.Tensor | None = None
    index_score_state: torch.Tensor | None = None
    ring_scale: torch.Tensor | None = None  # FP8 KV only
    ring_rope: torch.Tensor | None = None
    comp_scale: torch.Tensor | None = None
    comp_rope: torch.Tensor | None = None

    @property
    def ring_store(self) -> torch.Tensor | Fp8KV:
        """The window ring as the ops take it."""
        return self.ring if self.ring_rope is None else Fp8KV(self.ring, self.ring_scale, self.ring_rope)

    @property
    def comp_store(self) -> torch.Tensor | Fp8KV | None:
        """The compressed-entry pool as the ops take it."""
        return self.comp if self.comp_rope is None else Fp8KV(self.comp, self.comp_scale, self.comp_rope)

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors indexed by slot on dim 0 (what a snapshot copies)."""
        names = ("ring", "ring_scale", "ring_rope", "kv_state", "score_state", "index_kv_state", "index_score_state")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def pools(self) -> dict[str, torch.Tensor]:
        names = ("comp", "comp_scale", "comp_rope", "index_keys")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def reset_slot(self, slot: int) -> None:
        for name, t in self.slot_tensors().items():
            if name.startswith("ring"):
                continue
            t[slot].fill_(float("-inf") if "score" in name else 0.0)


def pages_needed(num_tokens: int, ratio: int, page_size: int) -> int:
    """Pages that hold the compressed entries of ``num_tokens`` tokens (complete windows only)."""
    return -(-(num_tokens // ratio) // page_size)


class ModelCache:
    """Allocates every cache tensor for ``cfg`` (main layers, then MTP layers when ``with_mtp``)."""

    def __init__(
        self, cfg: ModelConfig, num_slots: int, max_seq_len: int, max_total_tokens: int, *,
        page_size: int = 64, ring_slack: int = 0, dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu", with_mtp: bool = True, kv_cache_dtype: str = "auto",
    ) -> None:
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
        self.cfg, self.num_slots, self.max_seq_len, self.page_size = cfg, num_slots, max_seq_len, page_size
        self.ring_size = cfg.sliding_window + ring_slack
        self.ring_slack = ring_slack  # the compressor tails' rings get it too
        self.dtype, self.device = dtype, torch.device(device)
        self.kv_fp8 = kv_cache_dtype == "fp8"
        self.kv_dtype = torch.bfloat16 if kv_cache_dtype == "bf16" else dtype
        ratios = sorted({r for r in cfg.compress_ratios if r})
        # one page table (and one page budget) per ratio: CSA entries and indexer keys share theirs
        self.num_pages = {r: pages_needed(max_total_tokens, r, page_size) + num_slots + 1 for r in ratios}
        self.max_pages_per_slot = {r: max(1, pages_needed(max_seq_len, r, page_size)) for r in ratios}
        self.page_tables = {
            r: torch.zeros(num_slots, self.max_pages_per_slot[r], dtype=torch.int64, device=self.device)
            for r in ratios
        }
        ids = list(range(cfg.num_layers)) + (list(cfg.mtp_layer_ids) if with_mtp else [])
        self.layers: dict[int, LayerCache] = {i: self._make_layer(i) for i in ids}
        for lc in self.layers.values():
            for slot in range(num_slots):
                lc.reset_slot(slot)

    def _make_layer(self, layer_id: int) -> LayerCache:
        cfg, s = self.cfg, self.num_slots
        kind, m = cfg.layer_kind(layer_id), cfg.layer_ratio(layer_id)
        lc = LayerCache(layer_id, kind, m, None)
        lc.ring, lc.ring_scale, lc.ring_rope = self._kv_store(s, self.ring_size)
        if kind == SLIDING:
            return lc
        c = 2 if kind == CSA else 1
        pages = self.num_pages[m]
        lc.page_table = self.page_tables[m]
        lc.comp, lc.comp_scale, lc.comp_rope = self._kv_store(pages, self.page_size)
        rows = c * m + self.ring_slack
        lc.kv_state = self._zeros(s, rows, c * cfg.head_dim, fp32=True)
        lc.score_state = self._zeros(s, rows, c * cfg.head_dim, fp32=True)
        if kind == CSA:
            lc.index_keys = self._zeros(pages, self.page_size, cfg.index_head_dim)
            lc.index_kv_state = self._zeros(s, rows, 2 * cfg.index_head_dim, fp32=True)
            lc.index_score_state = self._zeros(s, rows, 2 * cfg.index_head_dim, fp32=True)
        return lc

    def _kv_store(self, *lead: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """KV rows [*lead, head_dim]: (data, scale, rope); scale and rope are None unless FP8."""
        if self.kv_fp8:
            return tuple(alloc_fp8_kv(lead, self.cfg.head_dim, self.cfg.rope_dim, self.dtype, self.device))
        return torch.zeros(*lead, self.cfg.head_dim, dtype=self.kv_dtype, device=self.device), None, None

    def _zeros(self, *shape: int, fp32: bool = False) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32 if fp32 else self.dtype, device=self.device)

    # ---- accounting --------------------------------------------------------------------------------------
    def bytes_per_token(self) -> dict[str, float]:
        """Bytes each context token costs in the paged pools, by kind (slot-sized state is not per token)."""
        out = {"compressed_kv": 0.0, "indexer_keys": 0.0}
        for lc in self.layers.values():
            for name in ("comp", "comp_scale", "comp_rope"):
                t = getattr(lc, name)
                if t is not None:
                    out["compressed_kv"] += t[0, 0].numel() * t.element_size() / lc.ratio
            if lc.index_keys is not None:
                out["indexer_keys"] += lc.index_keys[0, 0].numel() * lc.index_keys.element_size() / lc.ratio
        return out

    def bytes_per_slot(self) -> dict[str, int]:
        """Fixed bytes each request slot holds, by kind: the window ring and the compressor tails."""
        out = {"sliding_window": 0, "compressor_state": 0, "indexer_state": 0}
        for lc in self.layers.values():
            for name, t in lc.slot_tensors().items():
                key = "sliding_window" if name.startswith("ring") else "indexer_state" if "index" in name else "compressor_state"
                out[key] += t[0].numel() * t.element_size()
        return out

    def total_bytes(self) -> int:
        total = 0
        for lc in self.layers.values():
            for t in list(lc.slot_tensors().values()) + list(lc.pools().values()):
                total += t.numel() * t.element_size()
        return total
