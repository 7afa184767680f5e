"""Prometheus metrics of one server: the engine's state read at scrape time, latencies observed per request.

Engine-side numbers (running and waiting requests, cache use per kind, token and request counters,
preemptions) come from ``engine.stats()`` when ``/metrics`` is scraped, so they can never drift from the
engine's own bookkeeping. Latencies (time to first token, inter-token latency, end-to-end) are only
visible to the server and are observed as tokens stream out. Each app owns its registry: two servers in
one process (tests) do not share counters.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class _EngineCollector(Collector):
    """Reads ``engine.stats()`` (an ``EngineStats``) on every scrape."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        yield GaugeMetricFamily("dsv4_num_requests_running", "Requests in the running batch.", value=s.num_running)
        yield GaugeMetricFamily("dsv4_num_requests_waiting", "Requests queued for admission.", value=s.num_waiting)
        cache = GaugeMetricFamily("dsv4_cache_usage_ratio", "Fraction of each cache kind in use (0..1).",
                                  labels=["kind"])
        for kind, used in sorted(s.cache_usage.items()):
            cache.add_metric([str(kind)], float(used))
        yield cache
        yield CounterMetricFamily("dsv4_prompt_tokens", "Prompt tokens prefilled.", value=s.prompt_tokens_total)
        yield CounterMetricFamily("dsv4_generation_tokens", "Tokens generated.", value=s.generation_tokens_total)
        yield CounterMetricFamily("dsv4_preemptions", "Requests preempted (recomputed later).",
                                  value=s.preemptions_total)
        done = CounterMetricFamily("dsv4_requests_finished", "Finished requests by finish reason.",
                                   labels=["finish_reason"])
        for reason, n in sorted(s.finished_total.items()):
            done.add_metric([str(reason)], n)
        yield done
        yield CounterMetricFamily("dsv4_spec_verifies", "Speculative verifies run (one per request and step).",
                                  value=s.spec_verifies_total)
        yield CounterMetricFamily("dsv4_spec_draft_tokens", "Draft tokens proposed by the MTP block.",
                                  value=s.spec_draft_tokens_total)
        yield CounterMetricFamily("dsv4_spec_accepted_tokens", "Draft tokens accepted by the target.",
                                  value=s.spec_accepted_tokens_total)
        hist = CounterMetricFamily("dsv4_spec_verifies_by_accepted", "Verifies by how many drafts they accepted.",
                                   labels=["accepted"])
        for n, count in enumerate(s.spec_accepted_histogram):
            hist.add_metric([str(n)], count)
        yield hist


class ServerMetrics:
    """The registry of one app: engine collector + latency histograms."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram("dsv4_time_to_first_token_seconds", "Request arrival to its first token.",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("dsv4_inter_token_latency_seconds", "Time between two streamed outputs of a request.",
                             buckets=_ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("dsv4_e2e_request_latency_seconds", "Request arrival to its last token.",
                             buckets=_E2E_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, started: float | None = None) -> RequestTimer:
        return RequestTimer(self, started)


class RequestTimer:
    """Latencies of one engine request (one choice): call :meth:`tokens` per output, :meth:`done` once."""

    def __init__(self, metrics: ServerMetrics, started: float | None = None) -> None:
        self.metrics = metrics
        self.start = self.last = time.perf_counter() if started is None else started
        self.first = True

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        t = time.perf_counter()
        if self.first:
            self.metrics.ttft.observe(t - self.start)
            self.first = False
        else:
            # one observation per token: an output with several (speculative decoding) shares the gap
            gap = (t - self.last) / n
            for _ in range(n):
                self.metrics.itl.observe(gap)
        self.last = t

    def done(self) -> None:
        if not self.first:
            self.metrics.e2e.observe(time.perf_counter() - self.start)
