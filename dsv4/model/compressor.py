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
from dsv4.model.layers import ModelOptions, RMSNorm, checkpoint_fp8_linear
from dsv4.ops.compressor import compress_update
from dsv4.ops.dispatch import OpSet, get_ops


class Compressor(nn.Module):
    """``ape`` [ratio, c*d], ``norm`` [d]; c = 2 when ``overlap``. Its projections ``wkv``/``wgate`` [c*d, D]
    are rows of the attention's fused x projection (dsv4/model/x_proj.py), which hands :meth:`update` their
    fp32 outputs."""

    def __init__(self, head_dim: int, ratio: int, overlap: bool, rope_dim: int, eps: float,
                 quant: str | None) -> None:
        super().__init__()
        self.head_dim, self.ratio, self.overlap, self.rope_dim = head_dim, ratio, overlap, rope_dim
        self.quant = quant  # None, "fp8" (main: nope dims) or "fp4" (indexer: Hadamard + FP4)
        c = 2 if overlap else 1
        self.ape = nn.Parameter(torch.zeros(ratio, c * head_dim), requires_grad=False)
        self.norm = RMSNorm(head_dim, eps)

    def update(
        self, kv: torch.Tensor, score: torch.Tensor, batch: ForwardBatch, pool: torch.Tensor, table: torch.Tensor,
        kv_state: torch.Tensor, score_state: torch.Tensor, inv_freq: torch.Tensor, ops: OpSet | None = None,
    ) -> None:
        """Feed the batch's tokens; write closed windows' entries into ``pool``; keep the tails.

        kv, score: [T, c*d] fp32, the ``wkv``/``wgate`` projections of the tokens; pool: [pages, page_size, d]; table: [slots, max_pages]; kv_state/score_state
        [slots, c*m, c*d] fp32 (layout in dsv4/cache/model_cache.py). ``ops``: the model's op set (None: the
        reference). One batched op over device tensors, no host sync (dsv4.ops.compressor.compress_update).
        """
        compress = compress_update if ops is None else ops.compress_update
        compress(kv, score, self.ape, self.norm.weight, self.norm.eps, inv_freq, self.quant,
                 batch.positions, batch.slots, batch.prefix_lens, batch.extend_lens, batch.starts, kv_state,
                 score_state, pool, table)


class Indexer(nn.Module):
    """Lightning Indexer: ``wq_b`` [nI*dI, q_lora] and its own compressor; ``weights_proj`` [nI, D] and the
    compressor's projections are rows of the attention's fused x projection."""

    def __init__(self, q_lora_rank: int, n_heads: int, head_dim: int, topk: int, ratio: int,
                 rope_dim: int, eps: float, dtype: torch.dtype, opts: ModelOptions) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.topk, self.ratio = n_heads, head_dim, topk, ratio
        self.quant_sim = opts.quant_sim
        self.wq_b = checkpoint_fp8_linear(q_lora_rank, n_heads * head_dim, dtype, opts)
        self.compressor = Compressor(head_dim, ratio, True, rope_dim, eps, "fp4" if opts.quant_sim else None)
        self.weight_scale = head_dim**-0.5 * n_heads**-0.5
        self.ops = get_ops(opts.ops)

    def forward(
        self, kv: torch.Tensor, score: torch.Tensor, weights: torch.Tensor, qr: torch.Tensor, batch: ForwardBatch,
        lc, cos: torch.Tensor, sin: torch.Tensor, inv_freq: torch.Tensor, max_entries: int | None = None,
    ) -> torch.Tensor:
        """Update the indexer keys, then pick each row's top-k visible compressed entries.

        kv, score: [T, 2*dI] fp32, the indexer compressor's projections; weights: [T, nI] the ``weights_proj``
        output, in the activation dtype (qr's) or its unrounded fp32 accumulation (rounded to qr's dtype first);
        qr: [T, q_lora] the normed low-rank query.

        ``max_entries``: a host bound on any row's visible entries (static under CUDA graphs); None takes the
        batch's most entries after this step from its host mirrors. Returns [T, K] int64 picks, K =
        min(topk, max_entries): each row's picks in ascending entry order, then -1 (see
        :func:`dsv4.ops.indexer.indexer_topk`; ties go to the lowest entry index).
        """
        self.compressor.update(kv, score, batch, lc.index_keys, lc.page_table, lc.index_kv_state, lc.index_score_state,
                               inv_freq, self.ops)
        t = qr.shape[0]
        # rope (+ Hadamard and FP4 under quant_sim) and the scaled head weights (in the activation dtype, as the
        # official code): one kernel
        q, w = self.ops.indexer_q(self.wq_b(qr).view(t, self.n_heads, self.head_dim), weights, self.weight_scale,
                                  cos, sin, self.quant_sim, w_dtype=qr.dtype)
        if max_entries is None:
            max_entries = max((p + n) // self.ratio for p, n in zip(batch.prefix_lens_cpu, batch.extend_lens_cpu,
                                                                    strict=True))
        return self.ops.indexer_topk(q, w, lc.index_keys, lc.page_table, batch.slots, batch.extend_lens,
                                     batch.positions, self.ratio, self.topk, max_entries)
