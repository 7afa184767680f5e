"""The DeepSeek-V4 network: embed -> hc expand -> blocks -> hyper head -> norm -> head (DSV4_SPEC 4).

Written once against the engine's :class:`ForwardBatch` and :class:`ModelCache`: it runs one flat batch of
tokens from many requests and keeps no per-sequence state of its own. Parameter names are the official
checkpoint names (routed experts stacked per layer).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from dsv4.cache.model_cache import ModelCache
from dsv4.config import SLIDING, ModelConfig
from dsv4.distributed.vocab import vocab_embedding, vocab_head
from dsv4.engine.forward_batch import ForwardBatch
from dsv4.model.attention import BatchMeta, Rope
from dsv4.model.block import Block
from dsv4.model.layers import ModelOptions, RMSNorm, fp32_param
from dsv4.model.mtp import MTPBlock
from dsv4.ops.dispatch import get_ops, resolve_ops
from dsv4.ops.rope import rope_cos_sin, rope_inv_freq


class DeepseekV4(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, opts: ModelOptions | None = None,
                 with_mtp: bool = True) -> None:
        super().__init__()
        opts = opts or ModelOptions()
        # the op implementation is chosen here, once, for the device the model is built on (the caller's
        # `with torch.device(...)`); every layer calls through the same OpSet
        ops = resolve_ops(opts.ops, torch.get_default_device())
        self.cfg, self.dtype, self.opts = cfg, dtype, replace(opts, ops=ops)
        self.ops = get_ops(ops)
        d = cfg.hidden_size
        # vocabulary-parallel under tensor parallelism; plain nn.Embedding / LMHead on one rank
        self.embed = vocab_embedding(cfg.vocab_size, d, dtype, self.opts.parallel)
        self.layers = nn.ModuleList(Block(cfg, i, dtype, self.opts) for i in range(cfg.num_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps, self.opts.ops)
        # the official head runs in fp32 and returns fp32 logits (on weights held in the model dtype: LMHead)
        self.head = vocab_head(d, cfg.vocab_size, dtype, self.opts.parallel)
        self.hc_head_fn, self.hc_head_base = fp32_param(cfg.hc_mult, cfg.hc_mult * d), fp32_param(cfg.hc_mult)
        self.hc_head_scale = fp32_param(1)
        self.mtp = nn.ModuleList(MTPBlock(cfg, i, dtype, self.opts) for i in cfg.mtp_layer_ids) if with_mtp else None
        # both rope tables stacked [2, rd/2] (main, compress): one set of launches builds both per forward
        inv = (rope_inv_freq(cfg.rope_dim, cfg.rope_theta, None),
               rope_inv_freq(cfg.rope_dim, cfg.compress_rope_theta, cfg.rope_scaling))
        self.register_buffer("rope_inv_freqs", torch.stack(inv), persistent=False)

    def _ropes(self, positions: torch.Tensor) -> dict[str, Rope]:
        cos, sin = rope_cos_sin(positions, self.rope_inv_freqs)  # [2, T, rd/2] each
        return {name: (cos[i], sin[i], self.rope_inv_freqs[i]) for i, name in enumerate(("main", "compress"))}

    def _rope_for(self, ropes: dict[str, Rope], layer_id: int) -> Rope:
        return ropes["main" if self.cfg.layer_kind(layer_id) == SLIDING else "compress"]

    def forward(self, batch: ForwardBatch, cache: ModelCache) -> torch.Tensor:
        """Run every token of the batch through the main layers, updating the caches.

        Returns the final residual streams [T, hc, D] (before the hyper head): the MTP block's input.
        """
        ropes = self._ropes(batch.positions)
        x = self.embed(batch.input_ids).unsqueeze(1).expand(-1, self.cfg.hc_mult, -1).contiguous()
        if not len(self.layers):
            return x
        # each block ends with the boundary into the next one's attention (one fused mHC op); the last with a post
        mixed = self.layers[0].enter(x)
        meta = BatchMeta(batch)  # the per-token batch metadata, once for every layer
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1].attn_site() if i + 1 < len(self.layers) else None
            x, mixed = layer(x, mixed, batch.input_ids, batch, cache.layers[layer.layer_id],
                             self._rope_for(ropes, layer.layer_id), nxt, meta)
        return x

    def logits(self, streams: torch.Tensor) -> torch.Tensor:
        """streams [L, hc, D] -> fp32 logits [L, V]."""
        h = self.ops.hc_head(streams, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.cfg.hc_eps,
                             self.cfg.rms_norm_eps)
        return self.head(self.norm(h))

    def forward_mtp(self, batch: ForwardBatch, cache: ModelCache, h_prev: torch.Tensor, depth: int = 0,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
        """MTP block ``depth`` over the batch: ``batch.input_ids`` are the *next* tokens paired with the target
        streams ``h_prev`` [T, hc, D] of the same rows. Returns the MTP's output streams [T, hc, D], or with
        ``rows`` [L] those rows' [L, hc, D] only, without the mHC and MoE of the others (a draft's catch-up
        feeds up to k + 1 rows per request and needs the output of its last: :meth:`MTPBlock.forward_rows`)."""
        if self.mtp is None:
            raise RuntimeError("this model was built without its MTP block")
        block = self.mtp[depth]
        rope = self._rope_for(self._ropes(batch.positions), block.layer_id)
        x = block.embed_input(self.embed(batch.input_ids), h_prev)
        lc = cache.layers[block.layer_id]
        if rows is not None:
            return block.forward_rows(x, block.enter(x), batch.input_ids, batch, lc, rope, rows)
        return block(x, block.enter(x), batch.input_ids, batch, lc, rope)[0]

    def mtp_logits(self, streams: torch.Tensor, depth: int = 0) -> torch.Tensor:
        """MTP output streams [L, hc, D] -> fp32 logits [L, V] through the shared head."""
        return self.head(self.mtp[depth].head_input(streams))
