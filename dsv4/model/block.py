"""One DeepSeek-V4 block: mHC around attention and around the MoE (DSV4_SPEC 4.2)."""

from __future__ import annotations

import torch
from torch import nn

from dsv4.cache.model_cache import LayerCache
from dsv4.config import ModelConfig
from dsv4.engine.forward_batch import ForwardBatch
from dsv4.model.attention import Attention, Rope
from dsv4.model.layers import ModelOptions, RMSNorm, fp32_param
from dsv4.model.moe import MoE
from dsv4.ops.hyper import hc_post, hc_pre


class Block(nn.Module):
    """Parameters use the official names: ``hc_attn_{fn,base,scale}``, ``hc_ffn_*``, ``attn_norm``,
    ``ffn_norm``, ``attn``, ``ffn``."""

    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype, opts: ModelOptions) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.hc, self.iters, self.hc_eps, self.eps = cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        mix, width = cfg.mix_hc, cfg.hc_mult * cfg.hidden_size
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = fp32_param(mix, width), fp32_param(mix), fp32_param(3)
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = fp32_param(mix, width), fp32_param(mix), fp32_param(3)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_id, dtype, opts)
        self.ffn = MoE(cfg, layer_id, dtype, opts)

    def forward(
        self, x: torch.Tensor, input_ids: torch.Tensor, batch: ForwardBatch, lc: LayerCache, rope: Rope
    ) -> torch.Tensor:
        """x: [T, hc, D] residual streams -> [T, hc, D]."""
        h, post, comb = hc_pre(x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, self.hc, self.iters,
                               self.hc_eps, self.eps)
        x = hc_post(self.attn(self.attn_norm(h), batch, lc, rope), x, post, comb)
        h, post, comb = hc_pre(x, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, self.hc, self.iters,
                               self.hc_eps, self.eps)
        return hc_post(self.ffn(self.ffn_norm(h), input_ids), x, post, comb)
