"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of V4 launches hundreds of small kernels; at small batches the host, not the GPU, sets the
pace. Each bucket's whole forward (every layer, the hyper head, the final norm and the vocabulary head) is
captured once and replayed with one launch. What a replay needs lives in static device buffers: the batch's
token ids, positions, slots and prefix lengths are copied in, the graph runs, the logits and streams are read
out of its static outputs.

Padding: a batch of R requests runs in the smallest bucket B >= R. Rows R..B-1 are a token at position 0 of
a slot reserved for padding (the cache manager never hands it out); its page-table rows are all the dummy
page 0, so whatever the padding rows write lands in state nobody reads.

The captured batch carries host-side *bounds* rather than the real per-request values (``prefix_lens_cpu``
says every request may be ``context_bound`` long): host code that sizes buffers from them sizes for the
worst case, and every per-row decision is taken on the device from the static buffers. Graphs are captured
largest first into one shared memory pool, after an eager warm-up of each bucket (Triton compiles and fills
its caches outside capture).
"""

from __future__ import annotations

import logging
import time

import torch

from dsv4.engine.forward_batch import ForwardBatch, ForwardMode

log = logging.getLogger(__name__)


def graph_buckets(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to ``max_bs`` (and ``max_bs`` itself)."""
    out = [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 16)) + [max_bs]
    return sorted(set(out))


class CudaGraphRunner:
    """Captures ``forward(batch) -> (logits [B, V], streams [B, hc, D])`` for decode batches of each bucket.

    ``forward_fn(batch)`` is the model runner's eager forward (it must not sync the host); ``pad_slot`` a cache
    slot that no request uses; ``context_bound`` the longest context any request can reach (max_model_len).
    """

    def __init__(self, forward_fn, max_bs: int, pad_slot: int, context_bound: int, device: torch.device) -> None:
        self.forward_fn, self.pad_slot, self.context_bound = forward_fn, pad_slot, context_bound
        self.device = device
        self.buckets = graph_buckets(max_bs)
        self.max_bs = self.buckets[-1]
        n = self.max_bs
        z = torch.zeros(n, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.prefix_lens = z.clone(), z.clone(), z.clone()
        self.slots = torch.full((n,), pad_slot, dtype=torch.int64, device=device)
        self.extend_lens = torch.ones(n, dtype=torch.int64, device=device)
        self.starts = torch.arange(n, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool = None
        self.replays = 0

    def _batch(self, bs: int) -> ForwardBatch:
        """The static batch of bucket ``bs``: device views of the buffers, host bounds (see the module doc)."""
        return ForwardBatch(
            mode=ForwardMode.DECODE, input_ids=self.input_ids[:bs], positions=self.positions[:bs],
            slots=self.slots[:bs], prefix_lens=self.prefix_lens[:bs], extend_lens=self.extend_lens[:bs],
            starts=self.starts[:bs], logits_rows=self.starts[:bs], slots_cpu=list(range(bs)),
            prefix_lens_cpu=[self.context_bound - 1] * bs, extend_lens_cpu=[1] * bs, starts_cpu=list(range(bs)),
        )

    def capture(self) -> None:
        t0 = time.perf_counter()
        self._pad(0, self.max_bs)
        for bs in reversed(self.buckets):  # largest first: the smaller graphs reuse its pool's blocks
            batch = self._batch(bs)
            for _ in range(2):  # compile every kernel and settle allocator/cached buffers outside capture
                self.forward_fn(batch)
            torch.cuda.synchronize(self.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = self.forward_fn(batch)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[bs], self.outputs[bs] = g, out
        torch.cuda.synchronize(self.device)
        log.info("captured %d CUDA graphs (batch sizes %s) in %.1f s", len(self.graphs), self.buckets,
                 time.perf_counter() - t0)

    def can_run(self, batch: ForwardBatch) -> bool:
        return (batch.mode == ForwardMode.DECODE and batch.num_requests <= self.max_bs
                and batch.logits_rows.shape[0] == batch.num_requests and bool(self.graphs))

    def run(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the bucket that fits ``batch`` (a decode batch, every row wanting logits)."""
        r = batch.num_requests
        bs = next(b for b in self.buckets if b >= r)
        self.input_ids[:r].copy_(batch.input_ids)
        self.positions[:r].copy_(batch.positions)
        self.prefix_lens[:r].copy_(batch.prefix_lens)
        self.slots[:r].copy_(batch.slots)
        if bs > r:
            self._pad(r, bs)
        self.graphs[bs].replay()
        self.replays += 1
        logits, streams = self.outputs[bs]
        return logits[:r], streams[:r]

    def _pad(self, lo: int, hi: int) -> None:
        """Rows lo..hi-1 become padding: token 0 at position 0 of the padding slot."""
        self.input_ids[lo:hi].zero_()
        self.positions[lo:hi].zero_()
        self.prefix_lens[lo:hi].zero_()
        self.slots[lo:hi].fill_(self.pad_slot)
