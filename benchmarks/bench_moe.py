"""A whole MoE layer at V4-Flash shapes: router + routed experts + shared expert (run by benchmarks/kernels.py).

The layer is what ``MoE.forward`` runs with ops="triton": the fp32 router GEMM, ``route_scored`` (sqrtsoftplus,
top-6), then ``moe_experts`` (grouping, gate/up with SwiGLU, down, combine; the shared expert in the same
launches). Weight forms: "bf16" (bf16 experts and shared expert: the dequant build, no activation
quantisation), "fp8" (FP8 experts + FP8 shared expert) and "fp4" (FP4 experts + FP8 shared expert: the official
instruct checkpoints), the last two with FP8 activations (the native build).

bytes = the distinct experts the batch touches x their bytes (weights and scales) + the shared expert + the
fp32 router weight + the activations in and out; averaged over the input copies, which route differently.
Every tile configuration of ``moe_triton.CANDIDATES`` (and for FP8 both product paths) is a sweep point; the
table shows the best and the default per shape. The reference (``dsv4.ops.moe``, looped per expert, host
syncs) is timed on one copy.
"""

from __future__ import annotations

from functools import partial

import kernels as K
import torch
import torch.nn.functional as F

from dsv4.ops import moe as moe_ref
from dsv4.ops import moe_triton as moe_tri
from dsv4.ops import routing_triton as route_tri

E, I, TOPK, SCALE, LIMIT = 256, 2048, 6, 1.5, 10.0
BATCHES = (1, 16, 64, 256)
COPIES = 8
if K.SMOKE:
    E, I, BATCHES, COPIES = 16, 128, (1,), 1
FORMS = {"bf16": ("bf16", "bf16", False), "fp8": ("fp8", "fp8", True), "fp4": ("fp4", "fp8", True)}


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


def _bench_form(name: str, bw: float, quick: bool, w_gate: torch.Tensor, bias: torch.Tensor) -> list[dict]:
    routed_form, shared_form, act_quant = FORMS[name]
    d, dev = K.D, K.DEV
    experts, shared = _stack(routed_form, E), _stack(shared_form, 1)
    per_expert, shared_bytes = _expert_bytes(experts), _expert_bytes(shared)

    def layer(x: torch.Tensor, route=route_tri.route_scored, moe=moe_tri.moe_experts, **kw) -> torch.Tensor:
        w, ids = route(F.linear(x.float(), w_gate), bias, TOPK, "sqrtsoftplus", SCALE)
        return moe(x, experts, w, ids, LIMIT, act_quant, shared, LIMIT, out_dtype=x.dtype, **kw)

    rows = []
    for n in BATCHES:
        xs = [torch.randn(n, d, device=dev).bfloat16() for _ in range(COPIES)]
        touched = [moe_ref.route_scored(F.linear(x.float(), w_gate), bias, TOPK, "sqrtsoftplus", SCALE)[1]
                   .unique().numel() for x in xs]
        mean_touched = sum(touched) / len(touched)
        nbytes = mean_touched * per_expert + shared_bytes + E * d * 4 + E * 4 + 2 * n * d * 2
        default = moe_tri.default_config(n, TOPK, E)
        # fp8_dot only changes FP8 weights under FP8 activations (the shared expert of the fp4 form too)
        configs = [default] if K.SMOKE else [
            dict(c, fp8_dot=f) for c in moe_tri.CANDIDATES for f in ((False, True) if act_quant else (False,))]
        points = {}
        for cfg in configs:
            t_ms = K.timed(partial(layer, config=cfg), xs)
            points[moe_tri.config_name(cfg)] = t_ms
            K.SWEEP.append(K.row("moe_layer", f"{name} {moe_tri.config_name(cfg)}", n, None, t_ms, nbytes, bw,
                                 sweep=True))
        best = min(points, key=points.get)
        ref = None if quick else K.timed_ref(partial(layer, xs[0], moe_ref.route_scored, moe_ref.moe_experts))
        variant = f"{name} experts, {mean_touched:.0f} touched"
        rows.append(K.row("moe_layer", f"{variant}, best: {best}", n, None, points[best], nbytes, bw, ref))
        t_def = points.get(moe_tri.config_name(default)) or K.timed(layer, xs)
        rows.append(K.row("moe_layer", f"{variant}, default", n, None, t_def, nbytes, bw, ref))
    return rows


def run(bw: float, quick: bool) -> list[dict]:
    w_gate = torch.randn(E, K.D, device=K.DEV) / K.D**0.5
    bias = torch.randn(E, device=K.DEV) * 0.01
    rows = []
    for name in FORMS:  # one form's weights in memory at a time
        rows += _bench_form(name, bw, quick, w_gate, bias)
        if K.DEV == "cuda":
            torch.cuda.empty_cache()
    return rows
