"""Helpers to drive the model directly through ForwardBatch and the caches (no scheduler)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from dsv4.cache.manager import CacheManager
from dsv4.cache.model_cache import ModelCache
from dsv4.config import ModelConfig
from dsv4.engine.forward_batch import ForwardBatch
from dsv4.model.deepseek_v4 import DeepseekV4
from dsv4.model.layers import ModelOptions


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor] | None = None, quant_sim: bool = False,
                with_mtp: bool = False) -> DeepseekV4:
    model = DeepseekV4(cfg, torch.float32, ModelOptions(quant_sim=quant_sim), with_mtp=with_mtp).eval()
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not [k for k in missing if with_mtp or not k.startswith("mtp.")], missing
        assert not unexpected, unexpected
    return model


def new_cache(cfg: ModelConfig, slots: int = 4, max_seq: int = 512, page_size: int = 4,
              with_mtp: bool = False, ring_slack: int = 0, dtype: torch.dtype = torch.float32,
              ) -> tuple[ModelCache, CacheManager]:
    cache = ModelCache(cfg, slots, max_seq, slots * max_seq, page_size=page_size, with_mtp=with_mtp,
                       ring_slack=ring_slack, dtype=dtype, device=torch.get_default_device())
    return cache, CacheManager(cache)


def run_chunks(model: DeepseekV4, cache: ModelCache, mgr: CacheManager, slot: int, ids: list[int],
               chunks: list[int], start: int = 0, device: str = "cpu") -> torch.Tensor:
    """Feed ``ids`` in chunks of the given sizes; return the logits of every fed token [len(ids), V]."""
    out, p = [], start
    for c in chunks:
        mgr.reserve(slot, p + c)
        b = ForwardBatch.build([slot], [p], [ids[p - start : p - start + c]], all_logits=True, device=device)
        out.append(model.logits(model(b, cache)[b.logits_rows]))
        p += c
    assert p - start == len(ids)
    return torch.cat(out)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row max relative error of a against reference b (NaN anywhere fails as inf)."""
    if torch.isnan(a).any() or torch.isnan(b).any():
        return torch.full((a.shape[0],), float("inf"))
    return (a - b).abs().amax(-1) / b.abs().amax(-1).clamp_min(1e-12)


def compiled_rows(script: str) -> list[dict]:
    """Run ``script`` (a test file whose ``__main__`` compiles kernels for sm_90 with Triton's own compiler and
    prints one JSON row per kernel) in a subprocess without the interpreter; return its rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.abspath(script)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
