"""DeepSeek-V4 attention: low-rank q, one shared K=V head, sliding window + compressed entries + sink,
inverse rope on the output, grouped low-rank output projection (DSV4_SPEC 4.5).

Every projection of the attention input (``wq_a``, ``wkv``, the compressors' and the indexer's) is one fused
GEMM (:class:`~dsv4.model.x_proj.XProjection`); the batch's per-token metadata is built once per forward
(:class:`BatchMeta`) and shared by every layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dsv4.cache.model_cache import LayerCache
from dsv4.config import CSA, SLIDING, ModelConfig
from dsv4.distributed.linear import row_parallel
from dsv4.engine.forward_batch import ForwardBatch
from dsv4.model.compressor import Compressor, Indexer
from dsv4.model.layers import ModelOptions, RMSNorm, checkpoint_fp8_linear, checkpoint_fp8_weight
from dsv4.model.x_proj import XProjection, fp8_fusable, fuse_state_dict, x_parts
from dsv4.ops.dispatch import get_ops

Rope = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (cos [T, rd/2], sin [T, rd/2], inv_freq [rd/2])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype, opts: ModelOptions) -> None:
        super().__init__()
        self.kind, self.ratio = cfg.layer_kind(layer_id), cfg.layer_ratio(layer_id)
        # tensor parallel: this rank's query heads and their output groups; the K=V head is replicated
        self.tp = opts.parallel.tp
        self.n_heads, self.head_dim, self.nope_dim = cfg.num_heads // self.tp.size, cfg.head_dim, cfg.nope_dim
        self.window, self.groups, self.eps = cfg.sliding_window, cfg.o_groups // self.tp.size, cfg.rms_norm_eps
        self.quant_sim = opts.quant_sim
        self.ops = get_ops(opts.ops)
        d, h, hd = cfg.hidden_size, self.n_heads, cfg.head_dim
        self.x_proj = self._x_projection(cfg, layer_id, dtype, opts)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, opts.ops)
        self.wq_b = checkpoint_fp8_linear(cfg.q_lora_rank, h * hd, dtype, opts)
        self.kv_norm = RMSNorm(hd, cfg.rms_norm_eps, opts.ops)
        # wo_a: the official conversion dequantizes it to bf16 and runs its einsum on unquantized inputs; native
        # weights keep it FP8 and the grouped kernel dequantizes per tile (same values, half the bytes read)
        self.wo_a = checkpoint_fp8_weight(h * hd // self.groups, self.groups * cfg.o_lora_rank, dtype, opts)
        self.wo_b = checkpoint_fp8_linear(self.groups * cfg.o_lora_rank, d, dtype, opts)
        self.attn_sink = nn.Parameter(torch.zeros(h), requires_grad=False)
        self.softmax_scale = hd**-0.5
        if self.kind != SLIDING:
            self.compressor = Compressor(hd, self.ratio, self.kind == CSA, cfg.rope_dim, cfg.rms_norm_eps,
                                         "fp8" if opts.quant_sim else None)
        if self.kind == CSA:
            self.indexer = Indexer(cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk,
                                   self.ratio, cfg.rope_dim, cfg.rms_norm_eps, dtype, opts)

    def _x_projection(self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype, opts: ModelOptions) -> XProjection:
        """The fused projection of x; native FP8 parts that cannot share scale blocks stay modules of their own
        (registered here under their checkpoint names, e.g. ``wq_a``)."""
        parts, d = x_parts(cfg, layer_id), cfg.hidden_size
        self._x_parts, self._x_native = parts, opts.weight_format == "native"
        # checkpoints and state dicts name the parts; load_state_dict folds them into the fused parameters
        self.register_load_state_dict_pre_hook(self._fuse_loaded)
        fp8, separate = None, {}
        if self._x_native and fp8_fusable(parts):
            fp8 = checkpoint_fp8_linear(d, sum(p.rows for p in parts if p.fp8), dtype, opts)
        elif self._x_native:
            for p in (p for p in parts if p.fp8):
                separate[p.name] = checkpoint_fp8_linear(d, p.rows, dtype, opts)
                self.add_module(p.name, separate[p.name])
        return XProjection(parts, d, dtype, opts.act_quant, fp8, separate)

    @staticmethod
    def _fuse_loaded(module: Attention, state: dict, prefix: str, *_: object) -> None:
        fuse_state_dict(state, prefix, module._x_parts, module._x_native)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, lc: LayerCache, rope: Rope,
                meta: BatchMeta | None = None) -> torch.Tensor:
        """x: [T, D] (attn_norm output) -> [T, D]. Reads and writes this layer's caches for every request.
        ``meta``: the forward's shared :class:`BatchMeta` (None builds one for this call)."""
        t = x.shape[0]
        cos, sin, inv_freq = rope
        ops = self.ops
        meta = meta if meta is not None else BatchMeta(batch)
        rows = meta.ring_rows(lc.ring.shape[1], self.window)
        # the parts sharing the compressors' fp32 GEMM come unrounded: each consumer rounds them to x.dtype as it
        # loads them (the same values as a cast first, one launch fewer per layer)
        p = self.x_proj(x, act_fp32=True)
        qr = ops.rms_norm(p["wq_a"], self.q_norm.weight, self.q_norm.eps, dtype=x.dtype)
        q = ops.q_norm_rope(self.wq_b(qr).view(t, self.n_heads, self.head_dim), self.eps, cos, sin)
        # rows that overwrite no ring row an earlier query of this batch still reads are stored here (every
        # decode row); attention reads this batch's own keys from `kv` either way
        kv = ops.kv_norm_rope_store(p["wkv"], self.kv_norm.weight, self.eps, cos, sin, self.quant_sim,
                                    lc.ring_store, rows.early, dtype=x.dtype)

        # compressed entries completed by this batch's tokens must exist before any row reads them
        picks = None
        if self.kind != SLIDING:
            self.compressor.update(p["compressor.wkv"], p["compressor.wgate"], batch, lc.comp_store, lc.page_table,
                                   lc.kv_state, lc.score_state, inv_freq, ops)
        if self.kind == CSA:
            picks = self.indexer(p["indexer.compressor.wkv"], p["indexer.compressor.wgate"],
                                 p["indexer.weights_proj"], qr, batch, lc, cos, sin, inv_freq,
                                 meta.max_entries(self.ratio))

        o = ops.paged_sparse_attention(q, kv, lc.ring_store, lc.comp_store, lc.page_table, picks, rows.slot,
                                       rows.p0, batch.positions, self.attn_sink, self.softmax_scale, self.window, self.ratio,
                                       cos, sin, meta.rows_per_request)
        if rows.late is not None:
            ops.store_ring(kv, lc.ring_store, rows.late)

        o = o.view(t, self.groups, -1)
        if self.wo_a.fp8_ops is not None:
            z = self.wo_a.fp8_ops.fp8_grouped_linear(o, self.wo_a.weight, self.wo_a.scale)
        else:
            z = torch.einsum("tgi,gri->tgr", o, self.wo_a.weight.view(self.groups, -1, o.shape[-1]))
        # row-parallel wo_b: the ranks' fp32 partials summed, one rounding (as one process's GEMM)
        return row_parallel(self.wo_b, z.flatten(1), self.tp)


class RingRows(NamedTuple):
    """Per-token metadata, [T] int64 each: the request's slot and prefix length, and the flat ring row
    (``slot * R + pos % R``) a token is stored at before attention (``early``) or after it (``late``), -1 =
    not then (each stored token is in exactly one; tokens followed by R newer ones in the batch in neither).
    ``late`` is None when the host knows no token is stored after attention (one token per request)."""

    slot: torch.Tensor
    p0: torch.Tensor
    early: torch.Tensor
    late: torch.Tensor | None


class BatchMeta:
    """One forward's per-token batch metadata, built once on the device (no host sync) and shared by every
    layer: each token's slot, prefix length and extend length ([T] int64), the :class:`RingRows` of each
    distinct (ring size, window), and the indexer's host bound on visible entries per compression ratio.

    It lives for one forward only (the batch tensors may be rewritten in place between forwards, e.g. by a
    CUDA-graph runner, so nothing here is cached on the batch itself).
    """

    def __init__(self, batch: ForwardBatch) -> None:
        self.batch = batch
        # one token per request (decode, draft; known from the host mirrors, so static under CUDA graphs): token r
        # is request r's, at position prefix_len, and the per-request tensors are already per token
        self.one_each = all(n == 1 for n in batch.extend_lens_cpu)
        # the fewest and the most rows of a request: routes attention rows to the single-row or multi-query form
        lens = batch.extend_lens_cpu
        self.rows_per_request = (min(lens), max(lens)) if lens else (1, 1)
        if self.one_each:
            self.slot, self.p0, self.n = batch.slots, batch.prefix_lens, batch.extend_lens
        else:
            t = batch.positions.shape[0]
            req = torch.repeat_interleave(torch.arange(batch.num_requests, device=batch.positions.device),
                                          batch.extend_lens, output_size=t)
            self.slot, self.p0, self.n = batch.slots[req], batch.prefix_lens[req], batch.extend_lens[req]
        self._rows: dict[tuple[int, int], RingRows] = {}
        self._entries: dict[int, int] = {}

    def ring_rows(self, ring: int, window: int) -> RingRows:
        """:func:`ring_rows` for this batch, computed at the first layer that asks."""
        key = (ring, window)
        if key not in self._rows:
            if self.one_each and ring >= window:
                # every token is its request's only one: stored (the ring keeps >= 1), and early (pos = p0 is
                # below p0 + R - window + 1), so no store after attention
                rows = RingRows(self.slot, self.p0, _ring_dest(self.batch.positions, self.slot, ring), None)
            else:
                rows = _ring_rows(self.batch.positions, self.slot, self.p0, self.n, ring, window)
            self._rows[key] = rows
        return self._rows[key]

    def max_entries(self, ratio: int) -> int:
        """The most compressed entries (at ``ratio``) any request sees after this step, from the host mirrors."""
        if ratio not in self._entries:
            b = self.batch
            self._entries[ratio] = max((p + n) // ratio for p, n in zip(b.prefix_lens_cpu, b.extend_lens_cpu,
                                                                        strict=True))
        return self._entries[ratio]


def ring_rows(batch: ForwardBatch, ring: int, window: int) -> RingRows:
    """Build :class:`RingRows` on the device from the batch's tensors (no host sync).

    A new token at position k overwrites the ring row of position k - R; a query at p >= p0 reads positions
    >= p - window + 1 below p0 from the ring, so the write is safe before attention iff k - R < p0 - window + 1.
    """
    return BatchMeta(batch).ring_rows(ring, window)


def _ring_rows(pos: torch.Tensor, slot: torch.Tensor, p0: torch.Tensor, n: torch.Tensor, ring: int,
               window: int) -> RingRows:
    dest = _ring_dest(pos, slot, ring)
    stored = pos >= p0 + n - ring  # only a request's last R tokens survive in its ring
    early = pos < p0 + (ring - window + 1)
    # bools: stored > early is stored & ~early, one launch
    return RingRows(slot, p0, torch.where(stored & early, dest, -1), torch.where(stored > early, dest, -1))


def _ring_dest(pos: torch.Tensor, slot: torch.Tensor, ring: int) -> torch.Tensor:
    """Flat ring rows ``slot * R + pos % R`` [T] int64, in two launches (an integer add with alpha is exact)."""
    return torch.add(pos % ring, slot, alpha=ring)
