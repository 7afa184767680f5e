"""The MTP drafts of one engine step replayed from a CUDA graph per (catch-up rows, batch-size bucket).

After a target step, the MTP block catches up on each request's rows whose next token is now known and then
drafts ``k`` tokens (:class:`dsv4.engine.spec_decode.MTPDrafter`). The rows per request vary (1 after a plain
decode, ``accepted + 1`` after a verify, a whole chunk after a prompt), so the graphs cover the uniform shapes
a decoding step has: each request's catch-up is padded to ``m`` rows, the most any request of the step feeds
(1..k+1: a graph per m, so a step after rejections does not run k + 1 rows' attention per request; past the
attention only each request's last row runs, ``DeepseekV4.forward_mtp(..., rows=)``), then ``k - 1`` chained
single-row steps follow (each step's argmax is the next one's input token), all in one graph, and the greedy
drafts ``[B, k]`` stay on the device. Steps with a longer catch-up (a prompt chunk) run eagerly.

Padded rows of a request (catch-up row ``j >= fed``) sit at positions ``p0 + j``: the MTP block is
sliding-window only, and those positions are at most ``k - 1`` past what the request has now cached, the same
range the chained drafts write: the ring's ``k + 1`` rows of slack keep them off live rows, and the next step
writes them again with the real rows before any query reads them. They repeat the request's last real stream
and token (so they tend to route to the same experts: fewer weight bytes); the chained steps read from the
last *real* row (``last``, a device index). Padding requests are tokens at positions 0..m-1 of the withheld
padding slot, as in :mod:`dsv4.engine.cuda_graph`.

Static inputs are one int64 buffer, each graph (m rows, bucket B) reading its own compact layout from its start
(``ids``, ``pos``, ``gather`` [B*m], then ``slots``, ``prefix``, ``last`` [B]), filled by one host-to-device copy
of just those values, and ``h_prev`` [B*m, hc, D], gathered
from the target's streams by ``gather`` (outside the graph, so the streams may come from a graph replay or an
eager forward). Nothing here reads the device: the drafts stay there (``MTPDrafter.table``).
"""

from __future__ import annotations

import logging
import time

import torch

from dsv4.engine.cuda_graph import StaticGraph, graph_buckets
from dsv4.engine.forward_batch import ForwardBatch, ForwardMode
from dsv4.engine.spec_decode import greedy_for

log = logging.getLogger(__name__)


class DraftGraphRunner:
    """Graphs of ``catch-up (m = 1..k+1 rows per request) + (k - 1) chained steps -> drafts [B, k]`` at the
    buckets of ``max_bs``, captured into ``pool`` (the target's graph pool). ``replays`` counts replays."""

    def __init__(self, model, cache, k: int, max_bs: int, pad_slot: int, context_bound: int,
                 device: torch.device, pool=None) -> None:
        self.model, self.cache, self.k, self.n = model, cache, k, k + 1
        self.pad_slot, self.context_bound, self.device, self.pool = pad_slot, context_bound, device, pool
        self.buckets = graph_buckets(max_bs)
        self.max_bs = b = self.buckets[-1]
        t = b * self.n
        self.meta = torch.zeros(3 * t + 3 * b, dtype=torch.int64, device=device)
        cfg = model.cfg
        self.h_prev = torch.zeros(t, cfg.hc_mult, cfg.hidden_size, dtype=model.dtype, device=device)
        self.sizes = list(range(1, self.n + 1))  # catch-up rows per request of each graph shape
        self.extend = {m: torch.full((b,), m, dtype=torch.int64, device=device) for m in self.sizes}
        self.starts = {m: torch.arange(b, dtype=torch.int64, device=device) * m for m in self.sizes}
        self.ones = self.extend[1]
        self.arange = self.starts[1]
        self.graphs: dict[tuple[int, int], StaticGraph] = {}
        self.replays = 0
        self.greedy = greedy_for(torch.device(device))

    def _view(self, name: str, bs: int, m: int) -> torch.Tensor:
        """Graph ``(m, bs)``'s part of the static buffer: its own compact layout from offset 0 (module doc)."""
        t = bs * m
        o = {"ids": 0, "pos": t, "gather": 2 * t, "slots": 3 * t, "prefix": 3 * t + bs, "last": 3 * t + 2 * bs}[name]
        return self.meta[o : o + (t if o < 3 * t else bs)]

    def _drafts(self, bs: int, m: int) -> torch.Tensor:
        """The captured function: reads only the static buffers; returns greedy drafts [bs, k] int64."""
        t, model, cache = bs * m, self.model, self.cache
        pos, slots, last = self._view("pos", bs, m), self._view("slots", bs, m), self._view("last", bs, m)
        catch_up = ForwardBatch(
            mode=ForwardMode.DRAFT, input_ids=self._view("ids", bs, m), positions=pos, slots=slots,
            prefix_lens=self._view("prefix", bs, m), extend_lens=self.extend[m][:bs], starts=self.starts[m][:bs],
            logits_rows=last, slots_cpu=list(range(bs)), prefix_lens_cpu=[self.context_bound - m] * bs,
            extend_lens_cpu=[m] * bs, starts_cpu=[i * m for i in range(bs)])
        h = model.forward_mtp(catch_up, cache, self.h_prev[:t], rows=last)  # MoE only for the last rows
        tok = self.greedy(model.mtp_logits(h))
        toks = [tok]
        cpos = pos[last] + 1  # each request's next chained row
        ones, rows = self.ones[:bs], self.arange[:bs]
        for _ in range(self.k - 1):
            chain = ForwardBatch(
                mode=ForwardMode.DRAFT, input_ids=tok, positions=cpos, slots=slots, prefix_lens=cpos,
                extend_lens=ones, starts=rows, logits_rows=rows, slots_cpu=list(range(bs)),
                prefix_lens_cpu=[self.context_bound - 1] * bs, extend_lens_cpu=[1] * bs, starts_cpu=list(range(bs)))
            h = model.forward_mtp(chain, cache, h)
            tok = self.greedy(model.mtp_logits(h))
            toks.append(tok)
            cpos = cpos + 1
        return torch.stack(toks, dim=1)

    def capture(self) -> None:
        t0 = time.perf_counter()
        for m in reversed(self.sizes):  # most rows first, then largest batch first, as the target's graphs
            for bs in reversed(self.buckets):
                self._fill(self._layout([], bs, m))  # the warm-up runs are eager: valid inputs, the padding slot
                g = StaticGraph(lambda b=bs, m=m: self._drafts(b, m), self.device, self.pool)
                self.pool = g.pool
                self.graphs[(m, bs)] = g
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("captured %d MTP draft graphs (k = %d, batch sizes %s, catch-up rows %s) in %.1f s",
                 len(self.graphs), self.k, self.buckets, self.sizes, time.perf_counter() - t0)

    def can_run(self, items) -> bool:
        """Whether a step's catch-up items (``spec_decode.CatchUp``) fit the graphs: at most ``max_bs`` of them,
        each with 1..k+1 rows."""
        return bool(self.graphs) and 0 < len(items) <= self.max_bs and all(1 <= len(it.rows) <= self.n
                                                                            for it in items)

    def _layout(self, items, bs: int, m: int) -> list[int]:
        """The host values of graph ``(m, bs)``'s part of the static int64 buffer for ``items`` (module doc):
        O(bs * m) values, not the whole buffer, so a large ``max_bs`` costs a small step nothing."""
        t = bs * m
        ids, pos, gather = [0] * t, [0] * t, [0] * t
        slots, prefix, last = [self.pad_slot] * bs, [0] * bs, [0] * bs
        for i in range(bs):
            if i < len(items):
                it = items[i]
                fed = len(it.rows)
                slots[i], prefix[i], last[i] = it.slot, it.start, i * m + fed - 1
                for j in range(m):
                    pos[i * m + j] = it.start + j
                    gather[i * m + j] = it.rows[min(j, fed - 1)]
                    ids[i * m + j] = it.next_ids[min(j, fed - 1)]
            else:
                last[i] = i * m + m - 1
                for j in range(m):
                    pos[i * m + j] = j
        return ids + pos + gather + slots + prefix + last

    def _fill(self, values: list[int]) -> None:
        # pinned and non-blocking: a pageable copy would wait for the stream (a host sync every step)
        self.meta[: len(values)].copy_(torch.tensor(values, dtype=torch.int64, pin_memory=self.device.type == "cuda"),
                                       non_blocking=True)

    def run(self, streams: torch.Tensor, items) -> torch.Tensor:
        """Draft for ``items`` (:meth:`can_run`) from the target's streams [T, hc, D]: [len(items), k] int64 on the
        device, a view of the graph's output (valid until the next replay); no host read."""
        r = len(items)
        bs = next(b for b in self.buckets if b >= r)
        m = max(len(it.rows) for it in items)
        self._fill(self._layout(items, bs, m))
        t = bs * m
        torch.index_select(streams, 0, self._view("gather", bs, m), out=self.h_prev[:t])
        drafts = self.graphs[(m, bs)].replay()[:r]
        self.replays += 1
        return drafts
