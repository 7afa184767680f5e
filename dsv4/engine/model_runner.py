"""Builds the model and its caches from the configs and runs one forward per batch."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dsv4.cache.manager import CacheManager
from dsv4.cache.model_cache import ModelCache
from dsv4.config import ModelConfig
from dsv4.engine.engine_config import EngineConfig
from dsv4.engine.forward_batch import ForwardBatch
from dsv4.model.deepseek_v4 import DeepseekV4
from dsv4.model.layers import ModelOptions
from dsv4.weights import load_weights

log = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model, the cache tensors and the cache manager.

    ``forward(batch)`` returns fp32 logits [L, V] for ``batch.logits_rows`` and the final residual streams
    [T, hc, D] (the MTP block's input).
    """

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, model_dir: Path, progress: bool = True):
        self.model_cfg, self.engine_cfg = model_cfg, engine_cfg
        self.device, self.dtype = engine_cfg.torch_device(), engine_cfg.torch_dtype()
        opts = ModelOptions(quant_sim=engine_cfg.quant_sim,
                            act_quant=engine_cfg.quant_sim and model_cfg.quantization is not None)
        with torch.device(self.device):
            # the MTP block is only needed for speculative decoding, which is not wired in yet
            self.model = DeepseekV4(model_cfg, self.dtype, opts, with_mtp=False).eval()
        load_weights(self.model, model_cfg, model_dir, progress=progress)
        self.max_seq_len = engine_cfg.max_model_len or model_cfg.max_position_embeddings
        total = engine_cfg.max_total_tokens or engine_cfg.max_running_requests * min(self.max_seq_len, 8192)
        self.cache = ModelCache(
            model_cfg, engine_cfg.max_running_requests, self.max_seq_len, total, page_size=engine_cfg.page_size,
            dtype=self.dtype, device=self.device, with_mtp=False,
        )
        self.cache_manager = CacheManager(self.cache)
        log.info("cache: %.1f MiB, %s bytes/token, %s bytes/slot", self.cache.total_bytes() / 2**20,
                 {k: round(v, 1) for k, v in self.cache.bytes_per_token().items()}, self.cache.bytes_per_slot())

    @torch.no_grad()
    def forward(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        streams = self.model(batch, self.cache)
        return self.model.logits(streams[batch.logits_rows]), streams
