"""One DeepSeek-V4 block: mHC around attention and around the MoE (DSV4_SPEC 4.2).

The mHC post of a sub-layer and the pre (+ the next sub-layer's RMSNorm) that follows it are one op
(``hc_post_pre_norm``, a fused kernel for small batches), also across blocks: a block hands the next one its
attention input instead of bare streams.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.cache.model_cache import LayerCache
from dsv4.config import ModelConfig
from dsv4.engine.forward_batch import ForwardBatch
from dsv4.model.attention import Attention, BatchMeta, Rope
from dsv4.model.layers import ModelOptions, RMSNorm, fp32_param
from dsv4.model.moe import MoE
from dsv4.ops.dispatch import get_ops

# an mHC site's parameters: fn [(2+hc)*hc, hc*D], scale [3], base [(2+hc)*hc], the sub-layer's norm weight [D]
HcSite = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
# a sub-layer's normed input [T, D], post [T, hc] and comb [T, hc, hc] (fp32)
Mixed = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Block(nn.Module):
    """Parameters use the official names: ``hc_attn_{fn,base,scale}``, ``hc_ffn_*``, ``attn_norm``,
    ``ffn_norm``, ``attn``, ``ffn``."""

    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype, opts: ModelOptions) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.ops = get_ops(opts.ops)
        self.hc, self.iters, self.hc_eps, self.eps = cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        mix, width = cfg.mix_hc, cfg.hc_mult * cfg.hidden_size
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = fp32_param(mix, width), fp32_param(mix), fp32_param(3)
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = fp32_param(mix, width), fp32_param(mix), fp32_param(3)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, opts.ops)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, opts.ops)
        self.attn = Attention(cfg, layer_id, dtype, opts)
        self.ffn = MoE(cfg, layer_id, dtype, opts)

    def attn_site(self) -> HcSite:
        return self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, self.attn_norm.weight

    def ffn_site(self) -> HcSite:
        return self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, self.ffn_norm.weight

    def enter(self, x: torch.Tensor) -> Mixed:
        """x: [T, hc, D] streams -> this block's attention input (mHC pre + attn_norm), post, comb."""
        return self.ops.hc_pre_norm(x, *self.attn_site(), self.hc, self.iters, self.hc_eps, self.eps)

    def forward(
        self, x: torch.Tensor, mixed: Mixed, input_ids: torch.Tensor, batch: ForwardBatch, lc: LayerCache,
        rope: Rope, next_site: HcSite | None = None, meta: BatchMeta | None = None,
    ) -> tuple[torch.Tensor, Mixed | None]:
        """x: [T, hc, D] residual streams; ``mixed`` = :meth:`enter` of x (or the previous block's boundary);
        ``meta``: the forward's batch metadata, shared by its blocks (None: built for this block).

        Each sub-layer's mHC post is fused with the next mHC pre + norm: the FFN's with the attention site's
        ``next_site`` of the following block when given. Returns the new streams [T, hc, D] and the next
        block's ``mixed`` (None, the post applied alone, without ``next_site``).
        """
        y, post, comb = mixed
        a = self.attn(y, batch, lc, rope, meta)
        x, y, post, comb = self.ops.hc_post_pre_norm(a, x, post, comb, *self.ffn_site(), *self._consts())
        f = self.ffn(y, input_ids)
        if next_site is None:
            return self.ops.hc_post(f, x, post, comb), None
        x, y, post, comb = self.ops.hc_post_pre_norm(f, x, post, comb, *next_site, *self._consts())
        return x, (y, post, comb)

    def _consts(self) -> tuple[int, int, float, float]:
        return self.hc, self.iters, self.hc_eps, self.eps
