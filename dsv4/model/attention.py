"""DeepSeek-V4 attention: low-rank q, one shared K=V head, sliding window + compressed entries + sink,
inverse rope on the output, grouped low-rank output projection (DSV4_SPEC 4.5)."""

from __future__ import annotations

import torch
from torch import nn

from dsv4.cache.model_cache import LayerCache
from dsv4.config import CSA, SLIDING, ModelConfig
from dsv4.engine.forward_batch import ForwardBatch
from dsv4.model.compressor import Compressor, Indexer
from dsv4.model.layers import Linear, ModelOptions, RMSNorm, fp8_sim_nope, gather_entries
from dsv4.ops.attention import sparse_attention
from dsv4.ops.norm import head_rms_norm
from dsv4.ops.rope import apply_rope

Rope = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (cos [T, rd/2], sin [T, rd/2], inv_freq [rd/2])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype, opts: ModelOptions) -> None:
        super().__init__()
        self.kind, self.ratio = cfg.layer_kind(layer_id), cfg.layer_ratio(layer_id)
        self.n_heads, self.head_dim, self.nope_dim = cfg.num_heads, cfg.head_dim, cfg.nope_dim
        self.window, self.groups, self.eps = cfg.sliding_window, cfg.o_groups, cfg.rms_norm_eps
        self.quant_sim = opts.quant_sim
        d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        aq = opts.act_quant  # wo_a is not: the official conversion dequantizes it to bf16
        self.wq_a = Linear(d, cfg.q_lora_rank, dtype, act_quant=aq)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, h * hd, dtype, act_quant=aq)
        self.wkv = Linear(d, hd, dtype, act_quant=aq)
        self.kv_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.wo_a = Linear(h * hd // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, dtype)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, d, dtype, act_quant=aq)
        self.attn_sink = nn.Parameter(torch.zeros(h), requires_grad=False)
        self.softmax_scale = hd**-0.5
        if self.kind != SLIDING:
            self.compressor = Compressor(d, hd, self.ratio, self.kind == CSA, cfg.rope_dim, cfg.rms_norm_eps,
                                         "fp8" if opts.quant_sim else None)
        if self.kind == CSA:
            self.indexer = Indexer(d, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk,
                                   self.ratio, cfg.rope_dim, cfg.rms_norm_eps, dtype, opts)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, lc: LayerCache, rope: Rope) -> torch.Tensor:
        """x: [T, D] (attn_norm output) -> [T, D]. Reads and writes this layer's caches for every request."""
        t = x.shape[0]
        cos, sin, inv_freq = rope
        qr = self.q_norm(self.wq_a(x))
        q = head_rms_norm(self.wq_b(qr).view(t, self.n_heads, self.head_dim), self.eps)
        q = apply_rope(q, cos, sin)
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)
        if self.quant_sim:
            kv = fp8_sim_nope(kv, self.nope_dim)

        # compressed entries completed by this batch's tokens must exist before any row reads them
        picks = None
        if self.kind != SLIDING:
            self.compressor.update(x, batch, lc.comp, lc.page_table, lc.kv_state, lc.score_state, inv_freq)
        if self.kind == CSA:
            picks = self.indexer(x, qr, batch, lc, cos, sin, inv_freq)

        out = torch.empty_like(q)
        ring = lc.ring.shape[1]
        for r, slot in enumerate(batch.slots_cpu):
            s, n, p0 = batch.starts_cpu[r], batch.extend_lens_cpu[r], batch.prefix_lens_cpu[r]
            lo = max(0, p0 - self.window + 1)
            old_pos = torch.arange(lo, p0, device=x.device)
            keys = torch.cat((lc.ring[slot, old_pos % ring], kv[s : s + n].to(lc.ring.dtype)))
            key_pos = torch.arange(lo, p0 + n, device=x.device)
            q_pos = batch.positions[s : s + n]
            visible = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] > q_pos[:, None] - self.window)
            if self.kind != SLIDING:
                count = (p0 + n) // self.ratio
                keys = torch.cat((keys, gather_entries(lc.comp, lc.page_table[slot], count)))
                if picks is None:  # HCA: every closed window
                    vis_c = torch.arange(count, device=x.device)[None, :] < ((q_pos + 1) // self.ratio)[:, None]
                else:  # CSA: the indexer's picks (-1 = none)
                    sel = picks[r]
                    vis_c = torch.zeros(n, count + 1, dtype=torch.bool, device=x.device)
                    vis_c.scatter_(1, torch.where(sel < 0, count, sel), True)
                    vis_c = vis_c[:, :count]
                visible = torch.cat((visible, vis_c), dim=1)
            out[s : s + n] = sparse_attention(q[s : s + n], keys.to(q.dtype), visible, self.attn_sink,
                                              self.softmax_scale)
            # the last `ring` new tokens replace the oldest ring rows (read above, before this write)
            keep = min(n, ring)
            new_pos = torch.arange(p0 + n - keep, p0 + n, device=x.device)
            lc.ring[slot, new_pos % ring] = kv[s + n - keep : s + n].to(lc.ring.dtype)

        o = apply_rope(out, cos, sin, inverse=True).view(t, self.groups, -1)
        wo_a = self.wo_a.weight.view(self.groups, -1, o.shape[-1])
        z = torch.einsum("tgi,gri->tgr", o, wo_a)
        return self.wo_b(z.flatten(1))
