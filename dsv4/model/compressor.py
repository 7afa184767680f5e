"""KV compressors (CSA ratio-m overlapping, HCA non-overlapping) and the Lightning Indexer (DSV4_SPEC 4.6, 4.7).

The compressor turns every ``ratio`` tokens into one entry by a per-channel softmax-gated pooling. A prefill
chunk of any length after any prefix, a decode token and a verify row all go through :meth:`Compressor.update`:
it continues the slot's carried tail, emits every window that closes inside the chunk into the paged pool,
and leaves the new tail behind. Pooling is fp32 as in the official code.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.engine.forward_batch import ForwardBatch
from dsv4.model.layers import (
    Linear,
    ModelOptions,
    RMSNorm,
    checkpoint_fp8_linear,
    fp8_sim_nope,
    scatter_entries,
)
from dsv4.ops.compressor import pool_windows
from dsv4.ops.dispatch import get_ops
from dsv4.ops.quant import fp4_act_quant_sim, hadamard_transform
from dsv4.ops.rope import apply_rope


class Compressor(nn.Module):
    """``wkv``/``wgate`` [c*d, D] (fp32), ``ape`` [ratio, c*d], ``norm`` [d]; c = 2 when ``overlap``."""

    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, rope_dim: int, eps: float,
                 quant: str | None) -> None:
        super().__init__()
        self.head_dim, self.ratio, self.overlap, self.rope_dim = head_dim, ratio, overlap, rope_dim
        self.quant = quant  # None, "fp8" (main: nope dims) or "fp4" (indexer: Hadamard + FP4)
        c = 2 if overlap else 1
        self.wkv = Linear(dim, c * head_dim, torch.float32, fp32=True)
        self.wgate = Linear(dim, c * head_dim, torch.float32, fp32=True)
        self.ape = nn.Parameter(torch.zeros(ratio, c * head_dim), requires_grad=False)
        self.norm = RMSNorm(head_dim, eps)

    def update(
        self, x: torch.Tensor, batch: ForwardBatch, pool: torch.Tensor, table: torch.Tensor,
        kv_state: torch.Tensor, score_state: torch.Tensor, inv_freq: torch.Tensor,
    ) -> None:
        """Feed the batch's tokens; write closed windows' entries into ``pool``; keep the tails.

        x: [T, D]; pool: [pages, page_size, d]; table: [slots, max_pages]; kv_state/score_state
        [slots, c*m, c*d] fp32 (layout in dsv4/cache/model_cache.py).
        """
        m, d = self.ratio, self.head_dim
        kv_all, z_all = self.wkv(x), self.wgate(x)
        off = m if self.overlap else 0
        for r, slot in enumerate(batch.slots_cpu):
            s, n, p0 = batch.starts_cpu[r], batch.extend_lens_cpu[r], batch.prefix_lens_cpu[r]
            pos = batch.positions[s : s + n]
            kv = kv_all[s : s + n]
            z = z_all[s : s + n] + self.ape[pos % m]
            tail = p0 % m
            seq_kv = torch.cat((kv_state[slot, off : off + tail], kv))
            seq_z = torch.cat((score_state[slot, off : off + tail], z))
            first, nwin = p0 // m, (p0 + n) // m - p0 // m
            if nwin:
                cur_kv = seq_kv[: nwin * m].view(nwin, m, -1)
                cur_z = seq_z[: nwin * m].view(nwin, m, -1)
                if self.overlap:
                    # window i pools the first halves of window i-1 and the second halves of window i
                    prev_kv = torch.cat((kv_state[slot, None, :m], cur_kv[:-1]))[..., :d]
                    prev_z = torch.cat((score_state[slot, None, :m], cur_z[:-1]))[..., :d]
                    pooled = pool_windows(torch.cat((prev_kv, cur_kv[..., d:]), 1), torch.cat((prev_z, cur_z[..., d:]), 1))
                    kv_state[slot, :m] = cur_kv[-1]
                    score_state[slot, :m] = cur_z[-1]
                else:
                    pooled = pool_windows(cur_kv, cur_z)
                entries = self._finish(pooled.to(pool.dtype), (first + torch.arange(nwin, device=x.device)) * m, inv_freq)
                scatter_entries(pool, table[slot], first, entries)
            rest = (p0 + n) % m
            if rest:
                kv_state[slot, off : off + rest] = seq_kv[nwin * m :]
                score_state[slot, off : off + rest] = seq_z[nwin * m :]

    def _finish(self, e: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """Norm, rope at the window's first position, then the quantisation simulation."""
        e = self.norm(e)
        angle = positions.float()[:, None] * inv_freq[None, :]
        e = apply_rope(e, angle.cos(), angle.sin())
        if self.quant == "fp8":
            e = fp8_sim_nope(e, self.head_dim - self.rope_dim)
        elif self.quant == "fp4":
            e = fp4_act_quant_sim(hadamard_transform(e), 32)
        return e


class Indexer(nn.Module):
    """Lightning Indexer: ``wq_b`` [nI*dI, q_lora], ``weights_proj`` [nI, D] and its own compressor."""

    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, topk: int, ratio: int,
                 rope_dim: int, eps: float, dtype: torch.dtype, opts: ModelOptions) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.topk, self.ratio = n_heads, head_dim, topk, ratio
        self.quant_sim = opts.quant_sim
        self.wq_b = checkpoint_fp8_linear(q_lora_rank, n_heads * head_dim, dtype, opts)
        self.weights_proj = Linear(dim, n_heads, dtype)
        self.compressor = Compressor(dim, head_dim, ratio, True, rope_dim, eps, "fp4" if opts.quant_sim else None)
        self.weight_scale = head_dim**-0.5 * n_heads**-0.5
        self.ops = get_ops(opts.ops)

    def forward(
        self, x: torch.Tensor, qr: torch.Tensor, batch: ForwardBatch, lc, cos: torch.Tensor, sin: torch.Tensor,
        inv_freq: torch.Tensor, max_entries: int | None = None,
    ) -> torch.Tensor:
        """Update the indexer keys, then pick each row's top-k visible compressed entries.

        ``max_entries``: a host bound on any row's visible entries (static under CUDA graphs); None takes the
        batch's most entries after this step from its host mirrors. Returns [T, K] int64 picks, K =
        min(topk, max_entries): each row's picks in ascending entry order, then -1 (see
        :func:`dsv4.ops.indexer.indexer_topk`; ties go to the lowest entry index).
        """
        self.compressor.update(x, batch, lc.index_keys, lc.page_table, lc.index_kv_state, lc.index_score_state,
                               inv_freq)
        t = x.shape[0]
        q = apply_rope(self.wq_b(qr).view(t, self.n_heads, self.head_dim), cos, sin)
        if self.quant_sim:
            q = fp4_act_quant_sim(hadamard_transform(q), 32)
        w = self.weights_proj(x) * self.weight_scale  # in the activation dtype, as the official code
        if max_entries is None:
            max_entries = max((p + n) // self.ratio for p, n in zip(batch.prefix_lens_cpu, batch.extend_lens_cpu,
                                                                    strict=True))
        return self.ops.indexer_topk(q, w, lc.index_keys, lc.page_table, batch.slots, batch.extend_lens,
                                     batch.positions, self.ratio, self.topk, max_entries)
