"""Continuous batching: which requests run in the next forward, and with which tokens.

The scheduler owns the waiting queue and the running set over the :class:`CacheManager`; it never sees a
tensor. Each :meth:`Scheduler.schedule` call plans one step:

1. every decoding request gets one token; its cache grows by that token now (pages are reserved step by
   step as contexts grow, not for prompt + max_new_tokens up front). When the pools run dry, the request
   that arrived last is preempted by recompute: its slot and pages are freed and it goes back to the
   front of the waiting queue with its generated tokens, to prefill them again later (the cache it
   rebuilds equals the one it lost, so greedy outputs do not change);
2. requests still prefilling get chunks under ``chunked_prefill_size`` tokens in all, oldest first;
3. waiting requests are admitted while a slot, ``max_running_requests`` and the pages for their current
   length (the prompt, or prompt + generated after a preemption) allow, and the prefill budget is not spent
   (none in a step that preempted: that would only trade one preemption for the next).

Under data-parallel attention the manager places a new request on the attention rank with the fewest
requests among those whose pages fit it (dsv4/distributed/dp_attention.py), and a request that must grow
preempts only requests on its own rank.

Admission is FIFO, except that a request whose pages do not fit yet may be overtaken by later, smaller
ones at most ``MAX_OVERTAKES`` times; after that nothing passes it, so it cannot starve.

A request that could never run (longer than ``--max-model-len``, or needing more pages than the whole pool
holds) is rejected by :meth:`Scheduler.check` before it is queued.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from dsv4.cache.manager import CacheManager
from dsv4.engine.request import Request

# How often a waiting request at the head of the queue may be passed by later ones that fit.
MAX_OVERTAKES = 8
# How far behind a stuck head admission looks for a request that fits (bounds the work per step).
LOOKAHEAD = 64


@dataclass
class ScheduledBatch:
    """One step's plan: ``chunks[i]`` are the tokens ``reqs[i]`` feeds at positions from its ``num_cached``;
    ``sample[i]`` is True when those tokens complete what it must feed, so its last row needs logits;
    ``drafts[i]`` are the speculative draft tokens at the end of a decoding request's chunk (every row of such
    a chunk needs logits: the verify)."""

    reqs: list[Request] = field(default_factory=list)
    chunks: list[list[int]] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    drafts: list[list[int]] = field(default_factory=list)

    def add(self, req: Request, chunk: list[int], drafts: list[int] | None = None) -> None:
        drafts = drafts or []
        self.reqs.append(req)
        self.chunks.append(chunk + drafts)
        self.sample.append(req.num_cached + len(chunk) == req.total_len)
        self.drafts.append(drafts)

    def __len__(self) -> int:
        return len(self.reqs)


class Scheduler:
    def __init__(self, cache_manager: CacheManager, max_running_requests: int, chunked_prefill_size: int,
                 max_model_len: int) -> None:
        self.mgr = cache_manager
        self.max_running = min(max_running_requests, cache_manager.cache.num_slots)
        self.chunked_prefill_size = chunked_prefill_size
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.preemptions_total = 0
        self._arrivals = 0

    # ---- queue ---------------------------------------------------------------------------------------------
    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise ``ValueError`` (naming the limit and its flag) if such a request could never run."""
        total = prompt_len + max_new_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the maximum "
                             f"context of {self.max_model_len} tokens (--max-model-len)")
        # The pool must hold the request alone at its longest: then the oldest request always makes progress.
        cache = self.mgr.cache
        short = {r: n for r, n in self.mgr.extra_pages(None, total).items() if n > cache.num_pages[r] - 1}
        if short:
            raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) needs more "
                             f"compressed-KV pages than the cache holds ({short}); raise --max-total-tokens "
                             f"(or --mem-fraction)")

    def add(self, req: Request) -> None:
        """Queue a checked request at the back."""
        self._arrivals += 1
        req.arrival = self._arrivals
        self.waiting.append(req)

    def abort(self, req: Request) -> None:
        """Take ``req`` out wherever it is, freeing its slot and pages."""
        if req in self.running:
            self._release(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def finish(self, req: Request) -> None:
        """A running request is done: free what it holds."""
        self._release(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        """Plan the next forward (may be empty only when nothing is queued); reserves the pages it needs."""
        batch = ScheduledBatch()
        preemptions = self.preemptions_total
        # 1. decodes first: they are the oldest work, and their growth is what preemption makes room for.
        # Oldest arrivals first: a victim is always the newest arrival, so it is never one already batched.
        for req in sorted(self.running, key=lambda r: r.arrival):
            if req.prefilling or req.slot is None:  # preempted earlier in this loop
                continue
            if self._grow(req):
                batch.add(req, req.next_chunk(1), req.drafts)
        # 2. prefill chunks of admitted requests (their pages were reserved when they were admitted)
        budget = self.chunked_prefill_size
        for req in self.running:
            if req.prefilling and budget > 0:
                chunk = req.next_chunk(budget)
                budget -= len(chunk)
                batch.add(req, chunk)
        # 3. admit waiting requests while there is room and budget to start their prefill; not in a step that
        # had to preempt: the pages it freed are what the survivors grow into next
        while budget > 0 and self.preemptions_total == preemptions:
            req = self._admit_next()
            if req is None:
                break
            chunk = req.next_chunk(budget)
            budget -= len(chunk)
            batch.add(req, chunk)
        if not batch and self.waiting:
            # NOTE: check() guarantees a lone request fits an empty cache, so this is a bug, not a full cache.
            raise RuntimeError(f"scheduler stalled: {len(self.waiting)} waiting, {len(self.running)} running")
        return batch

    def _grow(self, req: Request) -> bool:
        """Reserve pages for ``req``'s next token and its drafts, preempting the newest arrivals if needed.
        False when ``req`` itself was preempted."""
        while not self.mgr.can_fit(req.slot, req.total_len + len(req.drafts)):
            # only a request on the same pages makes room (data-parallel attention ranks have pools of their own)
            victim = max((r for r in self.running if self.mgr.shares_pool(r.slot, req.slot)),  # type: ignore[arg-type]
                         key=lambda r: r.arrival)
            self.preempt(victim)
            if victim is req:
                return False
        self.mgr.reserve(req.slot, req.total_len + len(req.drafts))  # type: ignore[arg-type]
        return True

    def preempt(self, req: Request) -> None:
        """Recompute preemption: drop ``req``'s cache; it prefills prompt + generated tokens again later."""
        self._release(req)
        req.num_cached = 0
        req.drafts = []
        self.waiting.appendleft(req)
        self.preemptions_total += 1

    def _admit_next(self) -> Request | None:
        """Admit the first waiting request that may go now (see the module docstring), or None."""
        if not self.waiting or len(self.running) >= self.max_running or not self.mgr.num_free_slots:
            return None
        head = self.waiting[0]
        for i, req in enumerate(itertools.islice(self.waiting, LOOKAHEAD)):
            if i > 0 and head.times_overtaken >= MAX_OVERTAKES:
                return None
            if self.mgr.can_fit(None, req.total_len):
                if i > 0:
                    head.times_overtaken += 1
                del self.waiting[i]
                req.slot = self.mgr.alloc(req.total_len)
                self.mgr.reserve(req.slot, req.total_len)
                self.running.append(req)
                return req
        return None

    def _release(self, req: Request) -> None:
        self.running.remove(req)
        if req.slot is not None:
            self.mgr.free(req.slot)
            req.slot = None

    # ---- accounting ----------------------------------------------------------------------------------------
    def cache_usage(self) -> dict[str, float]:
        """Fraction in use: ``"slots"`` and ``"compressed_kv_pages:<ratio>"`` per ratio."""
        return self.mgr.usage()
