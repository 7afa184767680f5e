"""mHC kernel timings at V4-Flash width (hidden 4096, hc 4, 24 mixes), run by benchmarks/kernels.py.

Rows: the layer boundary (post of one sub-layer + pre + RMSNorm of the next) at batch {1, 8, 64} as the model
runs it (default: fused or not by ``hyper_triton.MIN_FUSED_TOKENS``), the best of a sweep of the fused kernel's
configs for the token count's class of ``hyper_triton.DEFAULTS`` (first the mix kernel's parameters with the table's
collapse, then, on the best of those, the collapse's form: one program per token or ``cbd`` channels per program),
and the two unfused kernels (post, then pre+norm; also with the best config's collapse) for comparison; then pre+norm, post and the hyper head alone; then T = 4096
(a prefill chunk: the boundary and pre+norm only). The winners print as ``# mhc DEFAULTS`` lines in the table's
form. Goal (issue 5): the fused boundary at batch <= 8 within 1.5x of its floor.

Floor bytes, each moved once: bf16 streams in [T, 4, D] and out, the sub-layer output in [T, D], the normed next
input out [T, D], fp32 post/comb in and out, and the site's fp32 weights (fn 24 x 16384 x 4 bytes = 1.5 MiB,
base, scale, norm weight). Every timed copy has its own weights, as every layer has its own (43 layers x 2
sites x 1.5 MiB is far beyond L2), so fn is read from memory as in a real decode step.
"""

from __future__ import annotations

from functools import partial

import kernels as K
import torch
import triton

from dsv4.ops import hyper as ref
from dsv4.ops import hyper_triton as tri

HC, ITERS, HC_EPS, EPS = 4, 20, 1e-6, 1e-6
MIX = (2 + HC) * HC
BATCHES = (1, 2, 40) if K.SMOKE else (1, 8, 64, 4096)
PREFILL = 40 if K.SMOKE else 4096  # from here on only the boundary and pre+norm rows (the decode-only rows skip)


def _cands(t: int) -> list[dict]:
    """Mix-kernel launch parameters to sweep at ``t`` tokens: the table's own row first, then its neighbours
    (``bt`` only moves within the row's class: 16 for decode, 64/128 for prefill; 512 programs never won, session
    10, and left the sweep to make room for the collapse's)."""
    base = tri.default_config(t, K.D, torch.device(K.DEV))
    bts = (16,) if base["bt"] == 16 else (64, 128)
    out = [base]
    for bt in bts:
        for bd in (32, 64):
            for warps in (4, 8):
                for stages in (2, 3):
                    for programs in ((128, 256) if bt == 16 else (256,)):
                        c = dict(base, bt=bt, bd=bd, num_warps=warps, num_stages=stages, programs=programs)
                        if c not in out:
                            out.append(c)
    return out[:2] if K.SMOKE else out


def _collapse_cands(t: int, mix: dict) -> list[dict]:
    """The collapse's forms on the mix config ``mix``: the chunked one at 256 / 512 / 1024 channels per program
    with 2 and 4 warps (decode), 512 and 1024 with 4 warps (prefill), then the whole-row one if ``mix`` has another."""
    grid = ((256, 512, 1024), (2, 4)) if t < PREFILL else ((512, 1024), (4,))
    out = [dict(mix, cbd=cbd, cwarps=w) for cbd in grid[0] for w in grid[1]]
    if mix.get("cbd") is not None:
        out.append(dict(mix, cbd=None, cwarps=None))
    return out[:2] if K.SMOKE else out


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


def _boundary(c: dict, config: dict | None = None, fused: bool | None = None) -> None:
    tri.hc_post_pre_norm(c["a"], c["x"], c["post"], c["comb"], *c["site"], HC, ITERS, HC_EPS, EPS, config=config,
                         fused=fused)


def _unfused(c: dict, config: dict | None = None) -> None:
    x = tri.hc_post(c["a"], c["x"], c["post"], c["comb"])
    tri.hc_pre_norm(x, *c["site"], HC, ITERS, HC_EPS, EPS, config)


def _name(cfg: dict) -> str:
    tail = "" if cfg.get("cbd") is None else f"c{cfg['cbd']}w{cfg['cwarps']}"
    return f"bt{cfg['bt']}bd{cfg['bd']}w{cfg['num_warps']}s{cfg['num_stages']}p{cfg['programs']}{tail}"


def _sweep(configs: list[dict], copies: list, fused: bool | None, t: int, nbytes: int, bw: float,
           points: dict[str, float], cfgs: dict[str, dict]) -> str:
    """Time the boundary under each config into ``points`` / ``cfgs`` (by name); the best name so far."""
    for config in configs:
        name = _name(config)
        cfgs[name] = config
        try:
            points[name] = K.timed(lambda c, config=config: _boundary(c, config, fused), copies)
        except triton.runtime.errors.OutOfResources as e:  # a candidate too large for this GPU: skipped
            print(f"# mhc candidate {name} skipped: {str(e)[:80]}", flush=True)
            continue
        K.SWEEP.append(K.row("mhc_boundary", name, t, None, points[name], nbytes, bw, sweep=True))
    return min(points, key=points.get)


def run(bw: float, quick: bool) -> list[dict]:
    rows = []
    d = K.D
    for t in BATCHES:
        nb = _bytes(t, d)
        c0 = _case(t, d)
        copies = [c0] + [_case(t, d) for _ in range(K.n_copies(nb["boundary"]) - 1)]

        def reference(fn, *args, **kw) -> float | None:
            return None if quick else K.timed_ref(partial(fn, *args, **kw))

        points, cfgs = {}, {}
        fused = t <= tri.MAX_FUSED_TOKENS or None  # the sweep times the fused kernel wherever it can run

        best_mix = _sweep(_cands(t), copies, fused, t, nb["boundary"], bw, points, cfgs)
        collapse = _collapse_cands(t, cfgs[best_mix])
        best = _sweep(collapse, copies, fused, t, nb["boundary"], bw, points, cfgs)
        print(f"# mhc collapse forms at T={t} on {best_mix}: " + ", ".join(
            f"{n} {points[n] * 1e3:.1f} us" for n in [best_mix] + [_name(c) for c in collapse] if n in points),
            flush=True)
        default = points[_name(_cands(t)[0])]
        print(f"# mhc DEFAULTS row for T={t}: {cfgs[best]}  ({points[best] * 1e3:.1f} us; the table's row "
              f"{default * 1e3:.1f} us, {default / points[best]:.3f}x)", flush=True)
        ref_b = reference(ref.hc_post_pre_norm, c0["a"], c0["x"], c0["post"], c0["comb"], *c0["site"], HC, ITERS,
                          HC_EPS, EPS)
        rows.append(K.row("mhc_boundary", "default", t, None, K.timed(_boundary, copies), nb["boundary"], bw, ref_b))
        rows.append(K.row("mhc_boundary", "best: " + best, t, None, points[best], nb["boundary"], bw, ref_b))
        rows.append(K.row("mhc_boundary", "post, then pre+norm", t, None, K.timed(_unfused, copies), nb["boundary"],
                          bw, ref_b))
        if cfgs[best].get("cbd") != tri.default_config(t, d, torch.device(K.DEV)).get("cbd"):
            rows.append(K.row("mhc_boundary", "post, then pre+norm, best: " + best, t, None, K.timed(
                partial(_unfused, config=cfgs[best]), copies), nb["boundary"], bw, ref_b))
        rows.append(K.row("mhc_pre_norm", "", t, None, K.timed(
            lambda c: tri.hc_pre_norm(c["x"], *c["site"], HC, ITERS, HC_EPS, EPS), copies), nb["pre_norm"], bw,
            reference(ref.hc_pre_norm, c0["x"], *c0["site"], HC, ITERS, HC_EPS, EPS)))
        if t >= PREFILL:
            continue
        rows.append(K.row("mhc_post", "", t, None, K.timed(
            lambda c: tri.hc_post(c["a"], c["x"], c["post"], c["comb"]), copies), nb["post"], bw,
            reference(ref.hc_post, c0["a"], c0["x"], c0["post"], c0["comb"])))
        rows.append(K.row("mhc_head", "", t, None, K.timed(
            lambda c: tri.hc_head(c["x"], *c["head"], HC_EPS, EPS), copies), nb["head"], bw,
            reference(ref.hc_head, c0["x"], *c0["head"], HC_EPS, EPS)))
        if cfgs[best].get("cbd") is not None:
            rows.append(K.row("mhc_head", "collapse of " + best, t, None, K.timed(
                lambda c, cfg=cfgs[best]: tri.hc_head(c["x"], *c["head"], HC_EPS, EPS, config=cfg), copies), nb["head"],
                bw))
    return rows
