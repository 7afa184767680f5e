"""mHC kernel timings at V4-Flash width (hidden 4096, hc 4, 24 mixes), run by benchmarks/kernels.py.

Rows: the fused layer boundary (post of one sub-layer + pre + RMSNorm of the next) at batch {1, 8, 64} with its
default config and the two unfused kernels (post, then pre+norm) for comparison; then pre+norm, post and the
hyper head alone. Sweep rows (``sweep |``): the channel splits and the per-batch launch parameters of
``hyper_triton``; at the end it prints the winning ``SPLITS`` entry and ``ROWS`` table to paste. Goal (issue 5): the fused boundary at batch <= 8
within 1.5x of its floor.

Floor bytes, each moved once: bf16 streams in [T, 4, D] and out, the sub-layer output in [T, D], the normed next
input out [T, D], fp32 post/comb in and out, and the site's fp32 weights (fn 24 x 16384 x 4 bytes = 1.5 MiB,
base, scale, norm weight). Every timed copy has its own weights, as every layer has its own (43 layers x 2
sites x 1.5 MiB is far beyond L2), so fn is read from memory as in a real decode step.
"""

from __future__ import annotations

from functools import partial

import kernels as K
import torch

from dsv4.ops import hyper as ref
from dsv4.ops import hyper_triton as tri

HC, ITERS, HC_EPS, EPS = 4, 20, 1e-6, 1e-6
MIX = (2 + HC) * HC
BATCHES = (1, 2) if K.SMOKE else (1, 8, 64)
# Sweep, in two parts (each point compiles a kernel, so the lists are short). Splits (splits, channels per chunk):
# a row's bits depend on them, so ONE entry is chosen for every batch (the sum of the batch-1 and batch-8 times,
# the goal rows) and printed as the `SPLITS` entry. Per-batch launch parameters (token block, warps, one launch
# or two, collapse tile, collapse warps): the best per batch is printed as a `ROWS` entry.
SPLIT_SWEEP = ((32, 32), (16, 32), (64, 32), (32, 16))
ROW_SWEEP = (dict(bt=16, num_warps=4, fuse=True, ct=1, cd=4096, cwarps=4),
             dict(bt=16, num_warps=8, fuse=True, ct=1, cd=4096, cwarps=4),
             dict(bt=16, num_warps=4, fuse=False, ct=1, cd=1024, cwarps=4),
             dict(bt=16, num_warps=4, fuse=False, ct=2, cd=512, cwarps=4),
             dict(bt=16, num_warps=8, fuse=False, ct=1, cd=2048, cwarps=8),
             dict(bt=32, num_warps=8, fuse=False, ct=4, cd=1024, cwarps=8))
if K.SMOKE:
    SPLIT_SWEEP, ROW_SWEEP = SPLIT_SWEEP[:1], ROW_SWEEP[:3:2]

def _weights(d: int, m: int) -> tuple[torch.Tensor, ...]:
    k = HC * d
    return (torch.randn(m, k, device=K.DEV) * 3 * k**-0.5, torch.randn(3 if m > HC else 1, device=K.DEV),
            torch.randn(m, device=K.DEV), 1 + 0.2 * torch.randn(d, device=K.DEV))


def _case(t: int, d: int) -> dict:
    """One independent set of inputs: streams, sub-layer output, post/comb, a pre site and a head site."""
    base = torch.randn(t, 1, d, device=K.DEV)
    comb = torch.softmax(torch.randn(t, HC, HC, device=K.DEV), -1)
    return dict(x=(base + 0.3 * torch.randn(t, HC, d, device=K.DEV)).bfloat16(),
                a=torch.randn(t, d, device=K.DEV).bfloat16(), post=2 * torch.rand(t, HC, device=K.DEV),
                comb=comb / comb.sum(-2, keepdim=True), site=_weights(d, MIX), head=_weights(d, HC)[:3])


def _bytes(t: int, d: int) -> dict[str, int]:
    streams, vec, mixing = t * HC * d * 2, t * d * 2, t * (HC + HC * HC) * 4
    site = (MIX * HC * d + MIX + 3 + d) * 4
    return dict(boundary=2 * streams + 2 * vec + 2 * mixing + site, pre_norm=streams + vec + mixing + site,
                post=2 * streams + vec + mixing, head=streams + vec + (HC * HC * d + HC + 1) * 4)


def _boundary(c: dict, config: dict | None = None) -> None:
    tri.hc_post_pre_norm(c["a"], c["x"], c["post"], c["comb"], *c["site"], HC, ITERS, HC_EPS, EPS, config=config)


def _unfused(c: dict) -> None:
    x = tri.hc_post(c["a"], c["x"], c["post"], c["comb"])
    tri.hc_pre_norm(x, *c["site"], HC, ITERS, HC_EPS, EPS)


def _row_name(cfg: dict) -> str:
    return (f"bt{cfg['bt']}w{cfg['num_warps']}" + (" 1 launch" if cfg["fuse"] else " 2 launches")
            + f" ct{cfg['ct']}cd{cfg['cd']}cw{cfg['cwarps']}")


def _sweep(t: int, copies: list, nb: dict, bw: float, results: dict) -> None:
    """Time the split candidates (with this batch's default launch parameters) and the launch-parameter
    candidates (with the default split) on the fused boundary; record into ``results``."""
    for sp in SPLIT_SWEEP:
        config = dict(splits=sp[0], bd=sp[1])
        ms = K.timed(lambda c, config=config: _boundary(c, config), copies)
        results.setdefault("split", {}).setdefault(sp, {})[t] = ms
        K.SWEEP.append(K.row("mhc_boundary", f"split {sp[0]}x{sp[1]}", t, None, ms, nb["boundary"], bw, sweep=True))
    for cfg in ROW_SWEEP:
        if t == 1 and cfg["bt"] > 16:
            continue
        ms = K.timed(lambda c, cfg=cfg: _boundary(c, cfg), copies)
        results.setdefault("rows", {}).setdefault(t, {})[_row_name(cfg)] = (ms, cfg)
        K.SWEEP.append(K.row("mhc_boundary", _row_name(cfg), t, None, ms, nb["boundary"], bw, sweep=True))


def _print_choice(results: dict, d: int) -> None:
    """The winning SPLITS entry (batches 1 and 8 summed) and the ROWS table, as Python to paste."""
    splits = results.get("split", {})
    if splits:
        best = min(splits, key=lambda sp: sum(v for t, v in splits[sp].items() if t <= 8))
        print(f"# mhc: best split (batches <= 8): SPLITS = {{{d}: {best}}}")
    rows = results.get("rows", {})
    if rows:
        print("# mhc: best launch parameters per batch, ROWS = (")
        for t in sorted(rows):
            name = min(rows[t], key=lambda k: rows[t][k][0])
            print(f"#     ({t}, dict({', '.join(f'{k}={v}' for k, v in rows[t][name][1].items())})),  "
                  f"# {rows[t][name][0] * 1e3:.2f} us")
        print("# mhc: (keep the last ROWS entry, batches > 64, as it is)")


def run(bw: float, quick: bool) -> list[dict]:
    rows, results = [], {}
    d = K.D
    for t in BATCHES:
        nb = _bytes(t, d)
        c0 = _case(t, d)
        copies = [c0] + [_case(t, d) for _ in range(K.n_copies(nb["boundary"]) - 1)]

        def reference(fn, *args, **kw) -> float | None:
            return None if quick else K.timed_ref(partial(fn, *args, **kw))

        _sweep(t, copies, nb, bw, results)
        ref_b = reference(ref.hc_post_pre_norm, c0["a"], c0["x"], c0["post"], c0["comb"], *c0["site"], HC, ITERS,
                          HC_EPS, EPS)
        rows.append(K.row("mhc_boundary", "fused, default", t, None, K.timed(_boundary, copies), nb["boundary"], bw,
                          ref_b))
        rows.append(K.row("mhc_boundary", "post, then pre+norm", t, None, K.timed(_unfused, copies), nb["boundary"],
                          bw, ref_b))
        rows.append(K.row("mhc_pre_norm", "", t, None, K.timed(
            lambda c: tri.hc_pre_norm(c["x"], *c["site"], HC, ITERS, HC_EPS, EPS), copies), nb["pre_norm"], bw,
            reference(ref.hc_pre_norm, c0["x"], *c0["site"], HC, ITERS, HC_EPS, EPS)))
        rows.append(K.row("mhc_post", "", t, None, K.timed(
            lambda c: tri.hc_post(c["a"], c["x"], c["post"], c["comb"]), copies), nb["post"], bw,
            reference(ref.hc_post, c0["a"], c0["x"], c0["post"], c0["comb"])))
        rows.append(K.row("mhc_head", "", t, None, K.timed(
            lambda c: tri.hc_head(c["x"], *c["head"], HC_EPS, EPS), copies), nb["head"], bw,
            reference(ref.hc_head, c0["x"], *c0["head"], HC_EPS, EPS)))
    _print_choice(results, d)
    return rows
