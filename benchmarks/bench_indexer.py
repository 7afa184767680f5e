"""Lightning Indexer benchmarks (scores + top-k) at V4-Flash shapes, run by benchmarks/kernels.py.

64 heads x 128, ratio 4, top-512, bf16 keys in pages of ``kernels.PAGE``: decode at batch x context, verify
with next_n = 2 and 4 draft rows per request, and one extend chunk. ``bytes`` is the fewest bytes the op
must move: each request's visible keys once, q, the head weights and the picks (the fp32 score scratch the
two kernels pass between them is not counted: it is the price of not fusing them). Rows "scores only" and
"top-k only" time the two kernels alone at the same shape (same bytes, for scale); "top-k only" runs the
unfused form (it scans its first radix pass itself, which the default gets from the scoring kernel) under a
few block/warp choices. Then one shape per shape class (decode, verify next_n 2 / 4 at batch 64, the 1024-row
extend, all at 64k) is swept over ``indexer_triton.CANDIDATES`` and the winners are printed as the
``DEFAULTS`` table; the scoring's TFLOP/s and compute floor are printed beside (the extend is compute-bound:
its byte floor is far below what the tensor cores need).
"""

from __future__ import annotations

import json
from functools import partial

import kernels as K
import torch

from dsv4.ops import indexer as ref
from dsv4.ops import indexer_triton as tri

NI, DI, RATIO = (4, 32, 4) if K.SMOKE else (64, 128, 4)
# the top-k kernel's default first (indexer_triton.default_config), then the alternatives to decide it by
SELECT_CONFIGS = ((64, 4),) if K.SMOKE else ((4096, 8), (2048, 4), (4096, 16), (8192, 16))
SWEEP_BATCH = K.BATCHES[-1] if K.SMOKE else 64  # the decode / verify batch the DEFAULTS sweep runs at


def case(requests: list[tuple[int, int]]) -> tuple[dict, int]:
    """Requests (prefix_len, extend_len) each in its own slot with random pages; returns (args, floor bytes)."""
    dev, ps = K.DEV, K.PAGE
    r = len(requests)
    entries = [(p + n) // RATIO for p, n in requests]
    per_slot = max(1, -(-max(entries) // ps))
    t = sum(n for _, n in requests)
    args = dict(
        q=torch.randn(t, NI, DI, device=dev).bfloat16(),
        weights=(torch.randn(t, NI, device=dev) * (DI * NI) ** -0.5).bfloat16(),
        keys=torch.randn(r * per_slot + 1, ps, DI, device=dev).bfloat16(),
        page_table=(torch.randperm(r * per_slot, device=dev) + 1).view(r, per_slot),
        slots=torch.arange(r, device=dev), extend_lens=torch.tensor([n for _, n in requests], device=dev),
        positions=torch.cat([torch.arange(p, p + n, device=dev) for p, n in requests]),
        ratio=RATIO, topk=K.TOPK, max_entries=max(entries),
    )
    nbytes = sum(entries) * DI * 2 + t * (NI * DI * 2 + NI * 2 + min(K.TOPK, max(entries)) * 8)
    return args, nbytes


def footprint(args: dict) -> int:
    return sum(v.numel() * v.element_size() for v in args.values() if isinstance(v, torch.Tensor))


def measure(kernel: str, b: int, ctx: int, requests: list[tuple[int, int]], bw: float, quick: bool,
            parts: bool = False) -> list[dict]:
    args, nbytes = case(requests)
    copies = [args] + [case(requests)[0] for _ in range(K.n_copies(footprint(args)) - 1)]
    ref_ms = None if quick else K.timed_ref(partial(ref.indexer_topk, **args))
    rows = [K.row(kernel, "default", b, ctx, K.timed(lambda a: tri.indexer_topk(**a), copies), nbytes, bw, ref_ms)]
    if parts:
        sargs = {k: v for k, v in args.items() if k != "topk"}
        scores = tri.paged_scores(**sargs)
        rows.append(K.row(kernel, "scores only", b, ctx, K.timed(lambda a: tri.paged_scores(
            **{k: v for k, v in a.items() if k != "topk"}), copies), nbytes, bw))
        for blk, warps in SELECT_CONFIGS:
            cfg = dict(block=blk, select_warps=warps)
            rows.append(K.row(kernel, f"top-k only (block {blk}, {warps} warps)", b, ctx, K.timed(
                lambda s, c=cfg: tri.select_topk(s, args["positions"], RATIO, K.TOPK, c, bf16_scores=True),
                [scores]), nbytes, bw))
    return rows


def flops(requests: list[tuple[int, int]]) -> float:
    """The scoring product's FLOPs: every row's heads against every entry it sees."""
    return sum(2.0 * NI * DI * ((p + i + 1) // RATIO) for p, n in requests for i in range(n))


def sweep(cls: str, b: int, ctx: int, requests: list[tuple[int, int]], bw: float) -> tuple[list[dict], dict]:
    """Time the class's default and every ``indexer_triton.CANDIDATES[cls]`` point at one shape; returns the
    rows (variant "sweep <config>"; a point that fails to compile or run is reported and skipped) and the
    fastest full configuration."""
    args, nbytes = case(requests)
    copies = [args] + [case(requests)[0] for _ in range(K.n_copies(footprint(args)) - 1)]
    rows, best, best_ms = [], None, float("inf")
    for cand in [{}] + list(tri.CANDIDATES[cls]):
        cfg = tri.DEFAULTS[cls] | cand
        name = tri.config_name(cfg) + (" (default)" if not cand else "")
        try:
            t_ms = K.timed(lambda a, c=cfg: tri.indexer_topk(**a, config=c), copies)
        except Exception as e:  # noqa: BLE001  (a candidate beyond the GPU's resources must not end the sweep)
            print(f"# indexer {cls} {name} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        rows.append(K.row(f"indexer_{cls}", "sweep " + name, b, ctx, t_ms, nbytes, bw))
        if t_ms < best_ms:
            best, best_ms = cfg, t_ms
    if best is not None:
        rows.append(K.row(f"indexer_{cls}", "best: " + tri.config_name(best), b, ctx, best_ms, nbytes, bw))
        tf = flops(requests) / best_ms / 1e9
        print(f"# indexer {cls} b{b} ctx {ctx}: best {tri.config_name(best)}, {tf:.0f} TFLOP/s of scoring "
              f"(compute floor at 989 TFLOP/s bf16: {flops(requests) / 989e12 * 1e6:.1f} us)", flush=True)
    return rows, best


def run(bw: float, quick: bool) -> list[dict]:
    """Defaults at every shape (``quick``: verify at the first and the 64-row batch only, the scores-only /
    top-k-only split for the extend only), then the sweep that
    decides ``indexer_triton.DEFAULTS`` (one shape per class at the longest context); ends by printing the
    winning table."""
    rows = []
    for ctx in K.CONTEXTS:
        for b in K.BATCHES:
            rows += measure("indexer_decode", b, ctx, [(ctx - 1, 1)] * b, bw, quick,
                            parts=b in (1, K.BATCHES[-1]) and not quick)
    ctx = K.CONTEXTS[-1]
    for next_n in (2, 4):
        for b in K.BATCHES:
            if quick and b not in (K.BATCHES[0], SWEEP_BATCH):
                continue
            rows += measure(f"indexer_verify{next_n}", b, ctx, [(ctx - next_n, next_n)] * b, bw, quick)
    for ctx in K.CONTEXTS:
        rows += measure("indexer_extend", K.EXTEND, ctx, [(ctx - K.EXTEND, K.EXTEND)], bw, quick, parts=True)
    ctx = K.CONTEXTS[-1]
    shapes = {"decode": (SWEEP_BATCH, [(ctx - 1, 1)] * SWEEP_BATCH),
              "verify2": (SWEEP_BATCH, [(ctx - 2, 2)] * SWEEP_BATCH),
              "verify4": (SWEEP_BATCH, [(ctx - 4, 4)] * SWEEP_BATCH),
              "extend": (K.EXTEND, [(ctx - K.EXTEND, K.EXTEND)])}
    winners = {}
    for cls, (b, requests) in shapes.items():
        got, best = sweep(cls, b, ctx, requests, bw)
        rows += got
        if best is not None:
            winners[cls] = best
    print("# indexer_triton.DEFAULTS from this sweep: " + json.dumps(winners), flush=True)
    return rows
