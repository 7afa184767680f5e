"""The MTP (NextN) block: the draft model of speculative decoding (DSV4_SPEC 5)."""

from __future__ import annotations

import torch

from dsv4.config import ModelConfig
from dsv4.model.block import Block
from dsv4.model.layers import ModelOptions, RMSNorm, checkpoint_fp8_linear, fp32_param


class MTPBlock(Block):
    """A sliding-window, scored-MoE block with layer id ``num_layers + j``, plus ``e_proj``/``h_proj``,
    ``enorm``/``hnorm``, its own hyper head (``hc_head_*``) and final ``norm``. Embedding and LM head are the
    main model's."""

    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype, opts: ModelOptions) -> None:
        super().__init__(cfg, layer_id, dtype, opts)
        d = cfg.hidden_size
        self.e_proj = checkpoint_fp8_linear(d, d, dtype, opts)
        self.h_proj = checkpoint_fp8_linear(d, d, dtype, opts)
        self.enorm, self.hnorm, self.norm = (RMSNorm(d, cfg.rms_norm_eps, opts.ops) for _ in range(3))
        self.hc_head_fn, self.hc_head_base = fp32_param(cfg.hc_mult, cfg.hc_mult * d), fp32_param(cfg.hc_mult)
        self.hc_head_scale = fp32_param(1)

    def embed_input(self, emb: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        """emb: [T, D] embeddings of the next tokens; h_prev: [T, hc, D] target streams (pre hyper head).

        Returns the block's input streams ``e_proj(enorm(emb))`` broadcast + ``h_proj(hnorm(h_prev))``.
        """
        e = self.e_proj(self.enorm(emb))
        return e.unsqueeze(1) + self.h_proj(self.hnorm(h_prev))

    def forward_rows(self, x: torch.Tensor, mixed, input_ids: torch.Tensor, batch, lc, rope,
                     rows: torch.Tensor) -> torch.Tensor:
        """:meth:`Block.forward`, but past the attention only for ``rows`` [L] (returns their streams [L, hc, D]).

        The attention runs on every row, since each writes its key and value to the window cache (a catch-up
        row's only job); the block is the MTP's last, so the mHC and MoE of the other rows feed nothing. Every
        op past the attention is per token: the kept rows get what the whole batch would give them."""
        y, post, comb = mixed
        a = self.attn(y, batch, lc, rope, None)
        x, y, post, comb = self.ops.hc_post_pre_norm(a[rows], x[rows], post[rows], comb[rows], *self.ffn_site(),
                                                     *self._consts())
        return self.ops.hc_post(self.ffn(y, input_ids[rows]), x, post, comb)

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hc, D] -> [T, D]: the MTP's own hyper head and norm, ready for the shared LM head."""
        return self.norm(self.ops.hc_head(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.hc_eps,
                                          self.eps))
