"""A whole MoE layer at V4-Flash shapes: router + routed experts + shared expert (run by benchmarks/kernels.py).

    python3 benchmarks/kernels.py --quick --only moe      # one GPU run, < 250 s: sweep, winners, defaults

The layer is what ``MoE.forward`` runs with ops="triton": the fp32 router GEMM, ``route_scored`` (sqrtsoftplus,
top-6), then ``moe_experts`` (grouping, gate/up with SwiGLU, down, combine; the shared expert in the same
launches). Weight forms: "bf16" (bf16 experts and shared expert: the dequant build, no activation
quantisation), "fp8" (FP8 experts + FP8 shared expert) and "fp4" (FP4 experts + FP8 shared expert: the official
instruct checkpoints), the last two with FP8 activations (the native build).

floor = max(bytes / copy bandwidth, FLOPs / matmul peak). bytes = the distinct experts the batch touches x their
bytes (weights and scales) + the shared expert + the fp32 router weight + the activations in and out, averaged
over the input copies (which route differently). FLOPs = 2 x 3 x D x I per hit (N x top-k routed + N shared);
the peak is a measured bf16 GEMM for bf16 weights and a measured FP8 GEMM for FP8 and FP4 ones (e2m1 values
are e4m3 values: the decode path runs e4m3 MMAs per 32-column group; the prefill default dequantizes FP4 to bf16,
so its FP4 prefill cannot beat the bf16 peak). The bound that decides is named in the variant (mem / flop).

Sweep (every point a sweep row): the size class of each batch (``moe_triton.size_class``) picks its
candidates: 16-row blocks for tiny and small batches (split-K 1/2 for the down GEMM at tiny ones), the
prefill tiles at large ones (launch groups 1 and 8); e4m3 products on and off for the FP8 form at tiny and
large batches and for FP4 at every batch, all on the grouped path (x quantized once under act_quant); where the
hits fit the direct path (``moe_decode_triton``: batch 1 and 16 here) its GEMV-shaped tiles (all of them at tiny
batches, two at small ones), split-K 2, e4m3 products off and the down GEMM fused into the gate/up launch
(``fuse_down``); the default with ``prequant`` flipped at every
FP8/FP4 shape (x quantized by one launch or by every gate/up program). Each candidate is made legal for the form and fitted
(``effective_config``); duplicates are timed once. At batch 1 the device time of each kernel of the default is
printed (torch.profiler, eager) beside the graph-replay time of the whole layer. The table shows the best point
and the default per shape; the summary prints the winners, whether the default is within 10% of the best, and per
form and size class the configuration with the best geometric mean over that class's batches (what
``moe_triton.DEFAULTS`` should hold). Past ``SWEEP_BUDGET_S`` seconds the
remaining shapes time their default only (said so). The reference (``dsv4.ops.moe``, looped per expert, host
syncs) is timed on one copy without --quick.
"""

from __future__ import annotations

import math
import time
from functools import partial

import kernels as K
import torch
import torch.nn.functional as F

from dsv4.ops import moe as moe_ref
from dsv4.ops import moe_decode_triton as moe_direct
from dsv4.ops import moe_triton as moe_tri
from dsv4.ops import routing_triton as route_tri

E, I, TOPK, SCALE, LIMIT = 256, 2048, 6, 1.5, 10.0
BATCHES = (1, 16, 64, 256, 4096)
COPIES = 8
SWEEP_BUDGET_S = 200.0
if K.SMOKE:
    E, I, BATCHES, COPIES = 16, 128, (1,), 1
# the form being worked on first: past the sweep budget the later forms time their defaults only
FORMS = {"fp4": ("fp4", "fp8", True), "fp8": ("fp8", "fp8", True), "bf16": ("bf16", "bf16", False)}
_DECODE = moe_tri.CANDIDATES[:2]
_PREFILL = {"bf16": moe_tri.CANDIDATES[3:],
            "quant": (moe_tri.CANDIDATES[3], moe_tri.CANDIDATES[7]) + moe_tri.QUANT_CANDIDATES}
_START = [time.monotonic()]  # reset by run(): kernels.py imports every bench first


def _stack(form: str, e: int) -> moe_ref.ExpertWeights:
    """Random experts in ``form`` (e4m3 codes without NaN, packed e2m1 bytes; power-of-two fp32 scales)."""
    d, dev = K.D, K.DEV
    shapes = ((e, I, d), (e, I, d), (e, d, I))
    if form == "bf16":
        return moe_ref.ExpertWeights(*((torch.randn(s, device=dev) / s[-1] ** 0.5).bfloat16() for s in shapes))
    ws, ss = [], []
    for *lead, n, k in shapes:
        if form == "fp8":
            b = torch.randint(0, 256, (*lead, n, k), dtype=torch.uint8, device=dev)
            ws.append(torch.where((b & 0x7F) == 0x7F, b ^ 1, b).view(torch.float8_e4m3fn))
            ss.append(torch.exp2(torch.randint(-14, -11, (*lead, -(-n // 128), -(-k // 128)), device=dev).float()))
        else:
            ws.append(torch.randint(0, 256, (*lead, n, k // 2), dtype=torch.uint8, device=dev))
            ss.append(torch.exp2(torch.randint(-9, -6, (*lead, n, k // 32), device=dev).float()))
    return moe_ref.ExpertWeights(*ws, *ss)


def _expert_bytes(w: moe_ref.ExpertWeights) -> int:
    """Bytes of one expert of the stack (weights and scales)."""
    ts = [t for t in w if t is not None]
    return sum(t[0].numel() * t.element_size() for t in ts)


def matmul_peaks() -> tuple[float, float]:
    """Measured (bf16, fp8) dense GEMM TFLOP/s at 8192^3 (fp8 through torch._scaled_mm; twice bf16 if absent)."""
    if K.SMOKE:
        return math.inf, math.inf
    n = 8192
    a, b = torch.randn(n, n, device=K.DEV).bfloat16(), torch.randn(n, n, device=K.DEV).bfloat16()
    bf16 = 2 * n**3 / K.timed_ref(lambda: a @ b) / 1e9
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=K.DEV)
        fp8 = 2 * n**3 / K.timed_ref(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16)) / 1e9
    except Exception as e:  # noqa: BLE001
        print(f"# fp8 GEMM peak not measured ({type(e).__name__}); taking twice bf16")
        fp8 = 2 * bf16
    return bf16, fp8


def _row(variant: str, n: int, t_ms: float, nbytes: float, flops: float, tflops: float, bw: float,
         ref_ms: float | None = None, sweep: bool = False) -> dict:
    """kernels.row with floor = max(bytes / bandwidth, FLOPs / peak); the deciding bound ends the variant."""
    mem, flop = nbytes / bw / 1e6, flops / tflops / 1e9
    floor = max(mem, flop)
    r = dict(kernel="moe_layer", variant=f"{variant} [{'mem' if mem >= flop else 'flop'}]", batch=n, ctx=None,
             us=round(t_ms * 1e3, 2), bytes=int(nbytes), gbps=round(nbytes / t_ms / 1e6, 1),
             floor_us=round(floor * 1e3, 2), ratio=round(t_ms / floor, 2),
             ref_us=None if ref_ms is None else round(ref_ms * 1e3, 1))
    print(("sweep | " if sweep else "") + " | ".join(str(r[c]) for c in K.COLS), flush=True)
    return r


def _candidates(name: str, n: int, act_quant: bool) -> list[dict]:
    """The sweep points of one shape: launch-key variants of the size class's tile candidates."""
    cls = moe_tri.size_class(n, TOPK, E)
    # FP8: e4m3 MMAs on and off where that is open; FP4: both of its product paths everywhere (e4m3 MMAs per
    # 32-column group, or the bf16 dequant), its FP8 shared expert with e4m3 MMAs
    dots = (False, True) if name == "fp4" or (name == "fp8" and cls != "small") else (None,)
    key = "fp4_dot" if name == "fp4" else "fp8_dot"
    if cls == "large":
        tiles = _PREFILL["quant" if act_quant else "bf16"]
        launch = [dict(group=g) for g in (1, 8)]
    else:
        tiles = _DECODE
        launch = [dict(split=s) for s in ((1, 2) if cls == "tiny" else (1,))]
    out = []
    for t in tiles:
        for extra in launch:
            for dot in dots:
                out.append(dict(t, **extra) if dot is None else dict(t, **extra, fp8_dot=True) | {key: dot})
    grouped = dict(direct=False, prequant=act_quant)
    out = [c | grouped for c in out]
    if n * TOPK <= moe_direct.max_hits():  # the direct path: its GEMV-shaped tiles, split-K 2, e4m3 products off
        best_dots = {} if name == "bf16" else dict(fp8_dot=True, fp4_dot=name == "fp4")
        direct = dict(direct=True, prequant=False, split=1, **best_dots)
        tiles = moe_direct.CANDIDATES if cls == "tiny" else moe_direct.CANDIDATES[:2]
        out += [dict(t, **direct) for t in tiles]
        out.append(dict(moe_direct.CANDIDATES[1], **direct) | dict(split=2))
        if name != "bf16":
            out.append(dict(moe_direct.CANDIDATES[1], **direct) | {key: False})
        out += [dict(t, **direct) for t in moe_direct.FUSED_CANDIDATES]  # one launch reads every weight
    return out


def _bench_form(name: str, bw: float, quick: bool, w_gate: torch.Tensor, bias: torch.Tensor,
                peaks: tuple[float, float], winners: list) -> list[dict]:
    routed_form, shared_form, act_quant = FORMS[name]
    d, dev = K.D, K.DEV
    experts, shared = _stack(routed_form, E), _stack(shared_form, 1)
    per_expert, shared_bytes = _expert_bytes(experts), _expert_bytes(shared)
    tflops = peaks[0] if name == "bf16" else peaks[1]

    def layer(x: torch.Tensor, route=route_tri.route_scored, moe=moe_tri.moe_experts, **kw) -> torch.Tensor:
        w, ids = route(F.linear(x.float(), w_gate), bias, TOPK, "sqrtsoftplus", SCALE)
        return moe(x, experts, w, ids, LIMIT, act_quant, shared, LIMIT, out_dtype=x.dtype, **kw)

    def effective(n: int, cfg: dict | None) -> dict:
        return moe_tri.effective_config(n, TOPK, experts, shared, 2, act_quant, cfg)

    rows = []
    for n in BATCHES:
        xs = [torch.randn(n, d, device=dev).bfloat16() for _ in range(COPIES if n < 1024 else 2)]
        touched = [moe_ref.route_scored(F.linear(x.float(), w_gate), bias, TOPK, "sqrtsoftplus", SCALE)[1]
                   .unique().numel() for x in xs]
        mean_touched = sum(touched) / len(touched)
        nbytes = mean_touched * per_expert + shared_bytes + E * d * 4 + E * 4 + 2 * n * d * 2
        flops = 2 * 3 * d * I * (n * TOPK + n)
        default = moe_tri.config_name(effective(n, None))
        over = time.monotonic() - _START[0] > SWEEP_BUDGET_S
        if over:
            print(f"# moe sweep budget ({SWEEP_BUDGET_S:.0f} s) spent: {name} n={n} times its default only")
        configs = {} if K.SMOKE or over else {moe_tri.config_name(effective(n, c)): c
                                                for c in _candidates(name, n, act_quant)}
        if act_quant and not K.SMOKE:  # the default with x quantized once / by every program, whatever the budget
            flip = dict(prequant=not effective(n, None)["prequant"])
            configs.setdefault(moe_tri.config_name(effective(n, flip)), flip)
        points = {}
        for cname, cfg in configs.items():
            t_ms = K.timed(partial(layer, config=cfg), xs)
            points[cname] = t_ms
            K.SWEEP.append(_row(f"{name} {cname}", n, t_ms, nbytes, flops, tflops, bw, sweep=True))
        t_def = points.get(default) or K.timed(layer, xs)
        points.setdefault(default, t_def)
        best = min(points, key=points.get)
        ref = None if quick else K.timed_ref(partial(layer, xs[0], moe_ref.route_scored, moe_ref.moe_experts))
        variant = f"{name} experts, {mean_touched:.0f} touched"
        rows.append(_row(f"{variant}, best: {best}", n, points[best], nbytes, flops, tflops, bw, ref))
        rows.append(_row(f"{variant}, default: {default}", n, t_def, nbytes, flops, tflops, bw, ref))
        winners.append(dict(form=name, batch=n, cls=moe_tri.size_class(n, TOPK, E), best=best,
                            best_us=points[best] * 1e3, default=default, default_us=t_def * 1e3, points=points))
        if n == 1:
            _kernel_times(f"{name} n=1 default", layer, xs)
        del xs
    return rows


def _kernel_times(label: str, layer, xs: list) -> None:
    """Print the device time of each kernel the layer launches (us per layer call; eager under torch.profiler,
    one call per input copy): the sum against the graph-replay time shows what launch gaps cost."""
    if K.DEV != "cuda":
        return
    try:
        from torch.profiler import ProfilerActivity, profile

        for x in xs:
            layer(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for x in xs:
                layer(x)
            torch.cuda.synchronize()
        times = {}
        for ev in prof.key_averages():
            t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
            if t and ev.count:
                times[ev.key[:40]] = t / len(xs)
    except Exception as e:  # noqa: BLE001 (a profiler-less build: no breakdown)
        print(f"# moe kernel times for {label} not measured ({type(e).__name__}: {str(e)[:80]})")
        return
    parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(times.items(), key=lambda kv: -kv[1]))
    print(f"# moe kernel times, {label} (us per layer, eager): sum {sum(times.values()):.1f}: {parts}")


def _summary(winners: list) -> None:
    """Winners per shape, the default's slowdown, and per (form, class) the best geometric-mean config."""
    print("# moe winners: form | batch | class | best | best us | default | default us | default/best | verdict")
    for w in winners:
        r = w["default_us"] / w["best_us"]
        print(f"# {w['form']} | {w['batch']} | {w['cls']} | {w['best']} | {w['best_us']:.1f} | {w['default']} | "
              f"{w['default_us']:.1f} | {r:.3f} | {'OK' if r <= 1.10 else 'DEFAULT >10% SLOWER'}")
    print("# moe table picks (config with the best geometric mean of time/best over the class's batches):")
    for form in FORMS:
        for cls in ("tiny", "small", "large"):
            ws = [w for w in winners if w["form"] == form and w["cls"] == cls]
            if not ws:
                continue
            common = set.intersection(*(set(w["points"]) for w in ws))
            score = {c: math.prod(w["points"][c] * 1e3 / w["best_us"] for w in ws) ** (1 / len(ws)) for c in common}
            pick = min(score, key=score.get)
            print(f"# DEFAULTS[{form!r}][{cls!r}] = {pick}  (geo-mean {score[pick]:.3f} of best over batches "
                  f"{[w['batch'] for w in ws]})")


def run(bw: float, quick: bool) -> list[dict]:
    _START[0] = time.monotonic()
    w_gate = torch.randn(E, K.D, device=K.DEV) / K.D**0.5
    bias = torch.randn(E, device=K.DEV) * 0.01
    peaks = matmul_peaks()
    print(f"# moe: measured GEMM peaks bf16 {peaks[0]:.0f} TFLOP/s, fp8 {peaks[1]:.0f} TFLOP/s")
    rows, winners = [], []
    for name in FORMS:  # one form's weights in memory at a time
        rows += _bench_form(name, bw, quick, w_gate, bias, peaks, winners)
        if K.DEV == "cuda":
            torch.cuda.empty_cache()
    _summary(winners)
    print(f"# moe bench: {time.monotonic() - _START[0]:.0f} s")
    return rows
