"""Routing, sampling and RMSNorm(+FP8 quant) kernels at V4-Flash shapes (run by benchmarks/kernels.py).

bytes: each input read once, each output written once. Scored routing reads the [N, 256] fp32 router logits
(the "gate" rows add the fp32 router GEMM: its 4 MiB weight and the bf16 activations); hash routing reads the
distinct router rows its tokens pick (at most all 256) and the activations; greedy and sampling read the fp32
logits once; the norms read bf16 activations and write bf16 (or e4m3 plus one e8m0 byte per 128).
"""

from __future__ import annotations

from functools import partial

import kernels as K
import torch
import torch.nn.functional as F

from dsv4.ops import moe as moe_ref
from dsv4.ops import norm as norm_ref
from dsv4.ops import norm_triton as norm_tri
from dsv4.ops import routing_triton as route_tri
from dsv4.ops import sampling as samp_ref
from dsv4.ops import sampling_triton as samp_tri

E, TOPK, VOCAB, SCALE = 256, 6, 129280, 1.5
ROUTE_BATCHES, SAMPLE_BATCHES, NORM_BATCHES = (1, 16, 64, 256), (1, 64, 512), (1, 64, 256)
if K.SMOKE:
    E, VOCAB = 16, 3000
    ROUTE_BATCHES, SAMPLE_BATCHES, NORM_BATCHES = (1, 2), (1, 2), (1, 2)


def _ref(fn, quick: bool) -> float | None:
    return None if quick else K.timed_ref(fn)


def bench_routing(bw: float, quick: bool) -> list[dict]:
    rows = []
    dev, d = K.DEV, K.D
    w_gate = torch.randn(E, d, device=dev) / d**0.5
    bias = torch.randn(E, device=dev) * 0.01
    tid2eid = torch.rand(VOCAB, E, device=dev).argsort(dim=1)[:, :TOPK].contiguous()
    for n in ROUTE_BATCHES:
        out_bytes = n * TOPK * (4 + 8)
        nb = n * E * 4 + E * 4 + out_bytes
        logits = [torch.randn(n, E, device=dev) for _ in range(K.n_copies(nb))]
        rows.append(K.row("route_scored", "sqrtsoftplus top-6", n, None,
                          K.timed(lambda x: route_tri.route_scored(x, bias, TOPK, "sqrtsoftplus", SCALE), logits), nb,
                          bw, _ref(partial(moe_ref.route_scored, logits[0], bias, TOPK, "sqrtsoftplus", SCALE), quick)))
        xs = [torch.randn(n, d, device=dev).bfloat16() for _ in range(K.n_copies(n * d * 2))]
        nb = E * d * 4 + n * d * 2 + E * 4 + out_bytes

        def gate(x: torch.Tensor, route=route_tri.route_scored) -> tuple[torch.Tensor, torch.Tensor]:
            return route(F.linear(x.float(), w_gate), bias, TOPK, "sqrtsoftplus", SCALE)

        rows.append(K.row("gate_scored", "fp32 GEMM + route_scored", n, None, K.timed(gate, xs), nb, bw,
                          _ref(partial(gate, xs[0], moe_ref.route_scored), quick)))
        ids = [torch.randint(0, VOCAB, (n,), device=dev) for _ in xs]
        hx = list(zip(xs, ids, strict=True))
        nb = min(n * TOPK, E) * d * 4 + n * d * 2 + n * (8 + TOPK * 8) + out_bytes
        rows.append(K.row("route_hash", "fused router rows", n, None,
                          K.timed(lambda a: route_tri.route_hash(a[0], w_gate, a[1], tid2eid, "sqrtsoftplus", SCALE),
                                  hx), nb, bw,
                          _ref(partial(moe_ref.route_hash, xs[0], w_gate, ids[0], tid2eid, "sqrtsoftplus", SCALE),
                               quick)))
    return rows


def bench_sampling(bw: float, quick: bool) -> list[dict]:
    rows = []
    dev = K.DEV
    for r in SAMPLE_BATCHES:
        nb = r * VOCAB * 4 + r * 4
        logits = [torch.randn(r, VOCAB, device=dev) * 3 for _ in range(K.n_copies(nb))]
        out = torch.empty(r, dtype=torch.int32, device=dev)
        rows.append(K.row("greedy", "int32 out", r, VOCAB, K.timed(lambda x, o=out: samp_tri.greedy(x, o), logits), nb,
                          bw, _ref(partial(samp_ref.greedy, logits[0]), quick)))
        temp = torch.full((r,), 0.8, device=dev)
        top_k = torch.zeros(r, dtype=torch.int64, device=dev)
        top_p = torch.full((r,), 0.9, device=dev)
        min_p = torch.zeros(r, device=dev)
        seeds = torch.arange(r, dtype=torch.int64, device=dev) + 1234
        steps = torch.zeros(r, dtype=torch.int64, device=dev)
        args = (temp, top_k, top_p, min_p, seeds, steps, out)
        gens = [samp_ref.make_generator(1234 + i, dev) for i in range(r)]
        # the floor is one read of the logits; the reference is the sort-based filter with per-request generators
        rows.append(K.row("sample", "T 0.8 top-p 0.9", r, VOCAB,
                          K.timed(lambda x, a=args: samp_tri.sample(x, *a), logits[:2]), nb, bw,
                          _ref(partial(samp_ref.sample, logits[0], temp, top_k, top_p, min_p, gens), quick)))
        k50 = torch.full((r,), 50, dtype=torch.int64, device=dev)
        args = (temp, k50, top_p, torch.full((r,), 0.05, device=dev), seeds, steps, out)
        rows.append(K.row("sample", "T 0.8 top-k 50 top-p 0.9 min-p 0.05", r, VOCAB,
                          K.timed(lambda x, a=args: samp_tri.sample(x, *a), logits[:2]), nb, bw, None))
    return rows


def bench_norm(bw: float, quick: bool) -> list[dict]:
    rows = []
    dev, d = K.DEV, K.D
    w = 1 + 0.1 * torch.randn(d, device=dev)
    for m in NORM_BATCHES:
        xs = [torch.randn(m, d, device=dev).bfloat16() for _ in range(K.n_copies(m * d * 4))]
        nb = m * d * 2 * 2 + d * 4
        rows.append(K.row("rms_norm", "bf16", m, None, K.timed(lambda x: norm_tri.rms_norm(x, w, 1e-6), xs), nb, bw,
                          _ref(partial(norm_ref.rms_norm, xs[0], w, 1e-6), quick)))
        nb = m * d * 2 + m * d + m * d // 128 + d * 4
        rows.append(K.row("rms_norm_quant", "e4m3 + ue8m0/128", m, None,
                          K.timed(lambda x: norm_tri.rms_norm_quant(x, w, 1e-6), xs), nb, bw,
                          _ref(partial(norm_ref.rms_norm_quant, xs[0], w, 1e-6), quick)))
        nb = m * d * 2 * 2 + d * 4
        rows.append(K.row("rms_norm_quant_sim", "bf16 out", m, None,
                          K.timed(lambda x: norm_tri.rms_norm_quant_sim(x, w, 1e-6), xs), nb, bw,
                          _ref(partial(norm_ref.rms_norm_quant_sim, xs[0], w, 1e-6), quick)))
    return rows


def run(bw: float, quick: bool) -> list[dict]:
    return bench_routing(bw, quick) + bench_sampling(bw, quick) + bench_norm(bw, quick)
