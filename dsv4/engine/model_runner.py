"""Builds the model and its caches from the configs and runs one forward per batch."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from dsv4.cache.manager import CacheManager
from dsv4.cache.model_cache import ModelCache
from dsv4.config import ModelConfig
from dsv4.distributed.batch_sync import send_batch
from dsv4.distributed.cache_mirror import MirroredCacheManager
from dsv4.distributed.dp_attention import drive as dp_drive
from dsv4.distributed.dp_attention import graph_forward as dp_graph_forward
from dsv4.distributed.dp_attention import graph_max_bs as dp_graph_max_bs
from dsv4.distributed.dp_attention import group_managers, slots_per_group
from dsv4.distributed.parallel import agree_min, check_model, from_world
from dsv4.engine.cuda_graph import CudaGraphRunner
from dsv4.engine.engine_config import EngineConfig
from dsv4.engine.forward_batch import ForwardBatch
from dsv4.model.deepseek_v4 import DeepseekV4
from dsv4.model.layers import ModelOptions
from dsv4.ops import pdl
from dsv4.weights import check_weight_format, load_weights

log = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model, the cache tensors and the cache manager.

    ``forward(batch)`` returns fp32 logits [L, V] for ``batch.logits_rows`` and the final residual streams
    [T, hc, D] (the MTP block's input).
    """

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, model_dir: Path, progress: bool = True):
        self.model_cfg, self.engine_cfg = model_cfg, engine_cfg
        self.device, self.dtype = engine_cfg.torch_device(), engine_cfg.torch_dtype()
        # "auto" means kernels on CUDA; a CPU engine on a GPU machine must still get the references
        ops = "ref" if engine_cfg.ops == "auto" and self.device.type != "cuda" else engine_cfg.ops
        check_weight_format(model_cfg, engine_cfg.weight_format)
        pdl.set_enabled(not engine_cfg.disable_pdl)
        # this rank's place among --tp-size/--ep-size ranks (one process: every size 1, no collectives)
        self.parallel = from_world(engine_cfg.tp_size, engine_cfg.ep_size, engine_cfg.attn_dp_size)
        check_model(model_cfg, self.parallel)
        opts = ModelOptions(quant_sim=engine_cfg.quant_sim,
                            act_quant=engine_cfg.quant_sim and model_cfg.quantization is not None, ops=ops,
                            weight_format=engine_cfg.weight_format, parallel=self.parallel)
        spec = engine_cfg.speculative_algorithm == "MTP"
        if spec and not model_cfg.num_mtp_layers:
            raise ValueError("--speculative-algorithm MTP needs a checkpoint with an MTP block (num_nextn_predict_layers "
                             "is 0 in config.json)")
        with torch.device(self.device):
            # the MTP block (the draft model) is only built for speculative decoding
            self.model = DeepseekV4(model_cfg, self.dtype, opts, with_mtp=spec).eval()
        load_weights(self.model, model_cfg, model_dir, progress=progress, weight_format=engine_cfg.weight_format,
                     parallel=self.parallel)
        self.max_seq_len = engine_cfg.max_model_len or model_cfg.max_position_embeddings
        # rank 0 schedules for every rank: all must hold the same pools
        total = agree_min(self.parallel, self._pool_tokens(), self.device)
        dp = self.parallel.dp_size
        graph_bs = engine_cfg.graph_max_bs() if dp == 1 else dp_graph_max_bs(engine_cfg)
        # CUDA-graph padding rows need a slot of their own that no request ever gets (so do idle DP groups)
        slots = slots_per_group(engine_cfg.max_running_requests, dp) if dp > 1 else \
            engine_cfg.max_running_requests + (1 if graph_bs else 0)
        self.cache = ModelCache(
            model_cfg, slots, self.max_seq_len, total,
            page_size=engine_cfg.page_size, dtype=self.dtype, device=self.device, with_mtp=spec,
            kv_cache_dtype=engine_cfg.kv_cache_dtype,
            # a verify writes k rows past what may be accepted: the ring's slack keeps them off live rows
            ring_slack=engine_cfg.speculative_num_steps + 1 if spec else 0,
        )
        # rank 0's slot and page calls are replayed by the other ranks (dsv4/distributed/cache_mirror.py)
        self.cache_manager = (MirroredCacheManager if self.parallel.drives else CacheManager)(self.cache)
        if dp > 1:  # rank 0 manages every attention group's caches (dsv4/distributed/dp_attention.py)
            self.cache_manager, self.dp_pad_slot = group_managers(self.parallel, self.cache)  # type: ignore[assignment]
        log.info("cache: %.1f MiB, %s bytes/token, %s bytes/slot", self.cache.total_bytes() / 2**20,
                 {k: round(v, 1) for k, v in self.cache.bytes_per_token().items()}, self.cache.bytes_per_slot())
        self.graphs: CudaGraphRunner | None = None
        if graph_bs:
            pad_slot = self.cache_manager.withhold_slot() if dp == 1 else self.dp_pad_slot
            # under DP attention every group runs the bucket's rows through the MoE (dsv4/distributed/dp_attention.py)
            fwd = self._forward_eager if dp == 1 else functools.partial(dp_graph_forward, self)
            # with MTP, verify batches (k + 1 rows per request) get graphs too (dsv4/engine/cuda_graph.py)
            self.graphs = CudaGraphRunner(fwd, graph_bs, pad_slot, self.max_seq_len, self.device,
                                          verify_n=engine_cfg.speculative_num_steps + 1 if spec else 0)
            self.graphs.capture()

    def _pool_tokens(self) -> int:
        """Context tokens the paged pools hold: --max-total-tokens, else on CUDA what --mem-fraction of the
        memory left after the weights holds, else (CPU) max_running_requests x min(max_model_len, 8192)."""
        cfg = self.engine_cfg
        if cfg.max_total_tokens is not None:
            return cfg.max_total_tokens
        if self.device.type != "cuda":
            return cfg.max_running_requests * min(self.max_seq_len, 8192)
        # A cache with no pool tokens on the meta device costs nothing and tells the bytes of everything else:
        # the slots' state, the page tables and the pages that per-slot rounding may leave partly empty.
        probe = ModelCache(self.model_cfg, cfg.max_running_requests, self.max_seq_len, 0, page_size=cfg.page_size,
                           dtype=self.dtype, device="meta", with_mtp=False, kv_cache_dtype=cfg.kv_cache_dtype)
        torch.cuda.empty_cache()  # blocks the loader freed count as free memory
        free, _ = torch.cuda.mem_get_info(self.device)
        return pool_tokens_for_memory(free, cfg.mem_fraction, sum(probe.bytes_per_token().values()),
                                      probe.total_bytes(), cfg.max_running_requests * self.max_seq_len)

    @torch.no_grad()
    def forward(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.parallel.dp_size > 1:  # split over the attention groups, logits gathered back (rank 0)
            return dp_drive(self, batch)
        if self.parallel.drives:  # the other ranks run this same forward (dsv4/distributed/follower.py)
            send_batch(self.parallel, batch, self.cache_manager.take_ops())  # type: ignore[attr-defined]
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(batch)
        return self._forward_eager(batch)

    @torch.no_grad()
    def _forward_eager(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        streams = self.model(batch, self.cache)
        if batch.logits_rows.shape[0] == 0:  # only mid-prompt chunks: nothing to sample
            return torch.empty((0, self.model_cfg.vocab_size), dtype=torch.float32, device=self.device), streams
        return self.model.logits(streams[batch.logits_rows]), streams


def pool_tokens_for_memory(free_bytes: int, mem_fraction: float, bytes_per_token: float, fixed_bytes: int,
                           cap: int) -> int:
    """How many context tokens the paged pools can hold in ``free_bytes x mem_fraction`` once ``fixed_bytes``
    (per-slot state, page tables, rounding pages) are paid; at most ``cap`` (slots x max_model_len, all that
    could ever be used). Raises ``ValueError`` naming the flags when nothing is left."""
    budget = free_bytes * mem_fraction - fixed_bytes
    if budget <= 0 or (bytes_per_token > 0 and budget < bytes_per_token):
        raise ValueError(f"not enough GPU memory for the caches: {free_bytes / 2**30:.2f} GiB free x --mem-fraction "
                         f"{mem_fraction} does not cover the {fixed_bytes / 2**30:.2f} GiB of per-request state; "
                         f"lower --max-running-requests or --max-model-len, or raise --mem-fraction")
    if bytes_per_token <= 0:
        return cap
    return min(cap, int(budget / bytes_per_token))
