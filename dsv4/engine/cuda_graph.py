"""Decode and verify steps replayed from CUDA graphs, one graph per (rows per request, batch-size bucket).

A decode step of V4 launches hundreds of small kernels; at small batches the host, not the GPU, sets the
pace. Each bucket's whole forward (every layer, the hyper head, the final norm and the vocabulary head) is
captured once and replayed with one launch. What a replay needs lives in static device buffers: the batch's
token ids, positions, slots and prefix lengths are copied in, the graph runs, the logits and streams are read
out of its static outputs.

Two shapes are captured: decode (one row per request) and, with speculative decoding, verify (``n = k + 1``
rows per request: the last sampled token and ``k`` drafts at positions ``p .. p + k``, every row wanting
logits; ``ForwardMode.VERIFY``). A verify replays a graph when *every* request has exactly ``n`` rows: the
engine pads the requests with fewer drafts (near their token limit, or none) to ``n`` rows (module doc of
``dsv4/engine/spec_decode.py``); a batch that mixes in prompt chunks runs eagerly.

Padding: a batch of R requests runs in the smallest bucket B >= R. Rows of requests R..B-1 are tokens at
positions 0..n-1 of a slot reserved for padding (the cache manager never hands it out); its page-table rows
are all the dummy page 0, so whatever the padding rows write lands in state nobody reads.

The captured batch carries host-side *bounds* rather than the real per-request values (``prefix_lens_cpu``
says every request may be ``context_bound`` long): host code that sizes buffers from them sizes for the
worst case, and every per-row decision is taken on the device from the static buffers. Graphs are captured
largest first into one shared memory pool (the MTP draft graphs of ``dsv4/engine/draft_graph.py`` join it),
after an eager warm-up of each bucket (Triton compiles and fills its caches outside capture).

Under data-parallel attention every rank captures the same buckets (their MoE collectives must pair up) and a
step replays one bucket on every rank: the smallest that holds the largest group's requests; a group with fewer
(or none: its padding token) pads up to it (dsv4/distributed/dp_attention.py).

Off CUDA nothing is captured: a "replay" runs the same function eagerly on the same static buffers, so the CPU
tests exercise the padding and the bounds (``EngineConfig.graph_max_bs`` is 0 on CPU: only tests do that).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from dsv4.engine.forward_batch import ForwardBatch, ForwardMode

log = logging.getLogger(__name__)


def graph_buckets(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to ``max_bs`` (and ``max_bs`` itself)."""
    out = [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 16)) + [max_bs]
    return sorted(set(out))


class StaticGraph:
    """``fn()`` (reading only static buffers) captured into a CUDA graph in ``pool``; off CUDA, ``fn`` itself.

    ``replay()`` returns the outputs: the graph's static output tensors (overwritten by the next replay), or
    off CUDA what a fresh ``fn()`` returns.
    """

    def __init__(self, fn: Callable[[], object], device: torch.device, pool=None) -> None:
        self.fn, self.graph, self.out, self.pool = fn, None, None, pool
        if device.type != "cuda":
            return
        for _ in range(2):  # compile every kernel and settle allocator/cached buffers outside capture
            fn()
        torch.cuda.synchronize(device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = fn()
        self.pool = pool if pool is not None else self.graph.pool()

    def replay(self):
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return self.out


class CudaGraphRunner:
    """Captures ``forward(batch) -> (logits [B*n, V], streams [B*n, hc, D])`` for decode batches (n = 1) and,
    when ``verify_n > 1``, verify batches of ``verify_n`` rows per request, at each bucket.

    ``forward_fn(batch)`` is the model runner's eager forward (it must not sync the host); ``pad_slot`` a cache
    slot that no request uses; ``context_bound`` the longest context any request can reach (max_model_len).
    ``replays`` counts decode replays, ``verify_replays`` verify ones.
    """

    def __init__(self, forward_fn, max_bs: int, pad_slot: int, context_bound: int, device: torch.device,
                 verify_n: int = 0) -> None:
        self.forward_fn, self.pad_slot, self.context_bound = forward_fn, pad_slot, context_bound
        self.device = device
        self.buckets = graph_buckets(max_bs)
        self.max_bs = self.buckets[-1]
        self.verify_n = verify_n if verify_n > 1 else 0
        self.sizes = [1] + ([self.verify_n] if self.verify_n else [])  # rows per request of each graph shape
        n, top = self.max_bs, self.max_bs * max(self.sizes)
        z = torch.zeros(top, dtype=torch.int64, device=device)
        self.input_ids, self.positions = z.clone(), z.clone()
        self.prefix_lens = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), pad_slot, dtype=torch.int64, device=device)
        self.rows = torch.arange(top, dtype=torch.int64, device=device)
        # per rows-per-request s: every request's extend length, first row, and the padding rows' positions
        self.extend_lens = {s: torch.full((n,), s, dtype=torch.int64, device=device) for s in self.sizes}
        self.starts = {s: torch.arange(n, dtype=torch.int64, device=device) * s for s in self.sizes}
        self.pad_positions = {s: self.rows[: n * s] % s for s in self.sizes}
        self.graphs: dict[tuple[int, int], StaticGraph] = {}
        self.pool = None
        self.replays = 0
        self.verify_replays = 0

    def _batch(self, bs: int, s: int) -> ForwardBatch:
        """The static batch of bucket ``bs`` with ``s`` rows per request: device views of the buffers, host
        bounds (see the module doc)."""
        t = bs * s
        return ForwardBatch(
            mode=ForwardMode.DECODE if s == 1 else ForwardMode.VERIFY, input_ids=self.input_ids[:t],
            positions=self.positions[:t], slots=self.slots[:bs], prefix_lens=self.prefix_lens[:bs],
            extend_lens=self.extend_lens[s][:bs], starts=self.starts[s][:bs], logits_rows=self.rows[:t],
            slots_cpu=list(range(bs)), prefix_lens_cpu=[self.context_bound - s] * bs, extend_lens_cpu=[s] * bs,
            starts_cpu=[i * s for i in range(bs)],
        )

    def capture(self) -> None:
        t0 = time.perf_counter()
        for s in reversed(self.sizes):  # most rows first: the smaller graphs reuse its pool's blocks
            self._pad(0, self.max_bs, s)
            for bs in reversed(self.buckets):
                batch = self._batch(bs, s)
                g = StaticGraph(lambda b=batch: self.forward_fn(b), self.device, self.pool)
                self.pool = g.pool
                self.graphs[(s, bs)] = g
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("captured %d CUDA graphs (batch sizes %s, rows per request %s) in %.1f s", len(self.graphs),
                 self.buckets, self.sizes, time.perf_counter() - t0)

    def _rows_per_request(self, batch: ForwardBatch) -> int:
        """1 for a decode batch, ``verify_n`` for a verify batch with that many rows per request, else 0."""
        if batch.mode == ForwardMode.DECODE:
            return 1
        if batch.mode == ForwardMode.VERIFY and self.verify_n and \
                all(e == self.verify_n for e in batch.extend_lens_cpu):
            return self.verify_n
        return 0

    def can_run(self, batch: ForwardBatch) -> bool:
        s = self._rows_per_request(batch)
        return (s > 0 and batch.num_requests <= self.max_bs and batch.logits_rows.shape[0] == batch.num_tokens
                and bool(self.graphs))

    def run(self, batch: ForwardBatch, bs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the graph that fits ``batch`` (:meth:`can_run`: decode or uniform verify, every row wanting
        logits), or bucket ``bs`` (>= its requests: data-parallel attention replays one bucket on every rank).
        Returns views of the static outputs, valid until the next replay."""
        s = self._rows_per_request(batch)
        r = batch.num_requests
        bs = bs if bs is not None else next(b for b in self.buckets if b >= r)
        if bs not in self.buckets or bs < r:
            raise ValueError(f"bucket {bs} cannot run {r} requests (buckets {self.buckets})")
        self.input_ids[: r * s].copy_(batch.input_ids)
        self.positions[: r * s].copy_(batch.positions)
        self.prefix_lens[:r].copy_(batch.prefix_lens)
        self.slots[:r].copy_(batch.slots)
        if bs > r:
            self._pad(r, bs, s)
        logits, streams = self.graphs[(s, bs)].replay()
        if s == 1:
            self.replays += 1
        else:
            self.verify_replays += 1
        return logits[: r * s], streams[: r * s]

    def _pad(self, lo: int, hi: int, s: int) -> None:
        """Requests lo..hi-1 become padding: token 0 at positions 0..s-1 of the padding slot."""
        self.input_ids[lo * s : hi * s].zero_()
        self.positions[lo * s : hi * s].copy_(self.pad_positions[s][lo * s : hi * s])
        self.prefix_lens[lo:hi].zero_()
        self.slots[lo:hi].fill_(self.pad_slot)
