"""The cost model of benchmarks/decode.py: bytes and FLOPs of the model as built and of its caches, which the
floors (bytes / copy bandwidth, FLOPs / matmul peak) are made of."""

from __future__ import annotations

import torch
from decode_weights import model_tensors

from dsv4.cache.model_cache import ModelCache
from dsv4.config import CSA, SLIDING, ModelConfig


def weight_kind(name: str) -> str:
    for key, kind in (("embed.", "embed"), ("head.", "head"), (".ffn.experts.", "routed_experts"),
                      (".ffn.shared_experts.", "shared_expert"), ("gate.tid2eid", "hash_table"),
                      (".ffn.gate.", "router"), (".attn.indexer.", "indexer"), (".attn.compressor.", "compressor"),
                      (".attn.", "attention")):
        if name.startswith(key) or key in name:
            return kind
    return "mhc_norms_rope"


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Cost:
    """Bytes and FLOPs of the model as built (element sizes of the tensors it holds) and of its caches."""

    def __init__(self, cfg: ModelConfig, model: torch.nn.Module, cache: ModelCache) -> None:
        self.cfg = cfg
        self.by_kind: dict[str, int] = {}
        self.expert_bytes: dict[int, int] = {}  # per layer: one expert's w1 + w3 + w2 (+ scales)
        for name, t in model_tensors(model).items():
            kind = weight_kind(name)
            self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes(t)
            if kind == "routed_experts":
                lid = int(name.split(".")[1])
                self.expert_bytes[lid] = self.expert_bytes.get(lid, 0) + nbytes(t) // cfg.n_routed_experts
        self.embed_row = nbytes(model.embed.weight[0])
        self.layers = []  # (kind, ratio, ring row bytes, comp entry bytes, index entry bytes)
        for lid in range(cfg.num_layers):
            lc = cache.layers[lid]
            row = sum(nbytes(t[0, 0]) for n, t in lc.slot_tensors().items() if n.startswith("ring"))
            pools = lc.pools()
            comp = sum(nbytes(t[0, 0]) for n, t in pools.items() if "index" not in n)
            idx = sum(nbytes(t[0, 0]) for n, t in pools.items() if "index" in n)
            self.layers.append((lc.kind, lc.ratio, row, comp, idx))
        self.slot_bytes = {lid: sum(nbytes(t[0]) for t in cache.layers[lid].slot_tensors().values())
                           for lid in range(cfg.num_layers)}

    def weights_touched(self, tokens: int, experts: list[int]) -> int:
        """Weight bytes a forward of ``tokens`` tokens reads: everything once, but embedding rows, hash-table
        rows and only the routed experts it used (``experts[l]`` distinct in layer l)."""
        k = self.by_kind
        fixed = sum(k.values()) - k.get("embed", 0) - k.get("routed_experts", 0) - k.get("hash_table", 0)
        hash_rows = tokens * self.cfg.num_experts_per_tok * 8 * min(self.cfg.num_hash_layers, self.cfg.num_layers)
        return fixed + tokens * self.embed_row + hash_rows + sum(
            n * self.expert_bytes.get(lid, 0) for lid, n in enumerate(experts))

    def kv_read(self, pos: int) -> int:
        """Cache bytes one query token at position ``pos`` reads: its window, its compressed entries (CSA: the
        top-k picks, and every indexer key to score them), over all layers."""
        c, total = self.cfg, 0
        for kind, ratio, row, comp, idx in self.layers:
            total += min(pos + 1, c.sliding_window) * row
            n = (pos + 1) // ratio if ratio else 0
            total += (min(c.index_topk, n) * comp + n * idx) if kind == CSA else n * comp
        return total

    def kv_write_prefill(self, tokens: int) -> int:
        return sum(min(tokens, self.cfg.sliding_window) * row + (tokens // ratio if ratio else 0) * (comp + idx)
                   for _, ratio, row, comp, idx in self.layers)

    def dense_macs(self) -> int:
        """Multiply-adds per token of every projection (routed: the top-k experts), without attention."""
        c = self.cfg
        d, hd, ql = c.hidden_size, c.head_dim, c.q_lora_rank
        attn = d * ql + ql * c.num_heads * hd + d * hd + c.num_heads * hd * c.o_lora_rank + c.o_groups * c.o_lora_rank * d
        ffn = d * c.n_routed_experts + 3 * d * c.moe_intermediate_size * (c.n_shared_experts + c.num_experts_per_tok)
        total = 0
        for kind, _, _, _, _ in self.layers:
            total += attn + ffn + 2 * c.mix_hc * c.hc_mult * d
            if kind != SLIDING:
                total += 2 * d * (2 if kind == CSA else 1) * hd
            if kind == CSA:
                total += ql * c.index_n_heads * c.index_head_dim + d * c.index_n_heads + 4 * d * c.index_head_dim
        return total

    def attn_macs(self, pos: int) -> int:
        """Multiply-adds of attention (QK and PV over the keys it sees) and indexer scoring at ``pos``."""
        c, total = self.cfg, 0
        for kind, ratio, _, _, _ in self.layers:
            n = (pos + 1) // ratio if ratio else 0
            keys = min(pos + 1, c.sliding_window) + (min(c.index_topk, n) if kind == CSA else n)
            total += 2 * c.num_heads * c.head_dim * keys
            if kind == CSA:
                total += c.index_n_heads * c.index_head_dim * n
        return total

    def head_macs(self) -> int:
        return self.cfg.vocab_size * self.cfg.hidden_size + self.cfg.hc_mult ** 2 * self.cfg.hidden_size

    def decode(self, batch: int, ctx: int, experts: list[int]) -> tuple[int, float]:
        """(bytes, FLOPs) of one decode step: ``batch`` tokens at position ``ctx``, logits for each."""
        nb = self.weights_touched(batch, experts) + batch * self.kv_read(ctx)
        return nb, 2.0 * batch * (self.dense_macs() + self.attn_macs(ctx) + self.head_macs())

    def prefill(self, tokens: int, experts: list[int]) -> tuple[int, float]:
        """(bytes, FLOPs) of a prefill of ``tokens`` tokens from position 0, logits for the last one."""
        attn = sum(self.attn_macs(p) for p in range(tokens))
        nb = self.weights_touched(tokens, experts) + self.kv_write_prefill(tokens)
        return nb, 2.0 * (tokens * self.dense_macs() + attn + self.head_macs())
