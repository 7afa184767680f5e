"""What every rank but 0 runs: build its slice of the model and caches, then run each batch rank 0 sends."""

from __future__ import annotations

import logging
from pathlib import Path

from dsv4.config import ModelConfig
from dsv4.distributed.batch_sync import recv_batch
from dsv4.distributed.cache_mirror import replay
from dsv4.distributed.dp_attention import run_group
from dsv4.engine.engine_config import EngineConfig
from dsv4.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)


def follow(config: EngineConfig) -> None:
    """Serve rank 0's forwards until it stops. ``config.model`` must be a directory (the launcher resolves the
    embedded model once, before the ranks start). Any failure propagates: the launcher then stops every rank."""
    model_dir = Path(config.model)  # type: ignore[arg-type]
    runner = ModelRunner(ModelConfig.from_json(model_dir), config, model_dir, progress=False)
    steps = 0
    dp = runner.parallel.dp_size > 1
    while (msg := recv_batch(runner.parallel, runner.device)) is not None:
        batch, cache_ops, extra = msg
        replay(runner.cache_manager, cache_ops)
        if dp:  # this attention group's own batch, then the logits go to rank 0 (dsv4/distributed/dp_attention.py)
            run_group(runner, batch, extra)
        else:
            runner.forward(batch)
        steps += 1
    log.debug("rank %d: rank 0 stopped after %d steps", runner.parallel.rank, steps)
