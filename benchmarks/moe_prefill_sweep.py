"""The grouped prefill GEMMs of the routed experts (``_gate_up_kernel``, ``_down_kernel``) over tile configs, on the GPU.

    python3 benchmarks/moe_prefill_sweep.py --forms fp8,bf16,fp4 --tokens 1024,4096 --budget 130

V4-Flash shapes (D=4096, 256 experts of I=2048, top-6, the shared expert in the same launches as in the model),
routing drawn uniformly at random (seeded: every expert about N*6/256 rows). Each tile of
``moe_triton.PREFILL_CANDIDATES[form]`` runs through ``moe_experts`` (config override, grouped path) and the device
time of each GEMM kernel is read from torch.profiler (the mean of ``--reps`` calls after a warm-up call that
compiles): no copy of the launch code here. Per kernel: ms, TFLOP/s (routed + shared rows only, padding not
counted), % of the bf16 peak measured in this run (torch.matmul 8192^3) and x its floor (max(weight + activation
bytes / copy bandwidth, FLOPs / peak of the MMA it runs: bf16 for bf16 and the FP4 dequant, FP8 for FP8)). At 96
rows per expert the weights are read once per expert: bf16 gate/up (8.6 GB) is HBM-bound, not FLOP-bound.

The shared-memory budget is raised to the H100 limit for the sweep (a tile the estimate still rejects is shrunk by
``fit_config``: its fitted form runs, marked ``fitted``; one the compiler rejects is skipped); ``>budget`` marks a
tile over the default ``SMEM_BUDGET`` (table entries must fit that). Registers and spills of each compiled kernel
are printed where Triton exposes them. The best tile per form then runs with launch groups 1, 4, 8, 16 (no
recompile). Ends with the best entries in ``DEFAULTS`` form and one JSON line. Past ``--budget`` seconds the
remaining tiles are skipped (said so); candidates are ordered most likely first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_moe as B  # noqa: E402
import kernels as K  # noqa: E402
import torch  # noqa: E402

from dsv4.ops import moe_triton as moe_tri  # noqa: E402

KERNELS = ("_gate_up_kernel", "_down_kernel")
H100_SMEM = 232448
FORMS = {"bf16": ("dense", "bf16", "bf16", False), "fp8": ("fp8", "fp8", "fp8", True),
         "fp4": ("fp4", "fp4", "fp8", True)}  # name: (table form, routed stack, shared stack, act_quant)


def routing(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [n, D] bf16, route weights [n, 6] fp32, ids [n, 6]: six distinct experts per token, uniform."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, K.D, device="cuda", generator=g).bfloat16()
    ids = torch.rand(n, B.E, device="cuda", generator=g).topk(B.TOPK, dim=-1).indices
    w = torch.rand(n, B.TOPK, device="cuda", generator=g) + 0.1
    return x, (w / w.sum(-1, keepdim=True) * B.SCALE).float(), ids


def kernel_ms(fn, reps: int) -> dict[str, float]:
    """Device ms per call of each GEMM kernel ``fn`` launches (summed over its launches: FP4 runs the shared FP8
    expert in its own pair), the mean over ``reps`` calls under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = dict.fromkeys(KERNELS, 0.0)
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        for k in KERNELS:
            if ev.key.startswith(k):
                out[k] += t / reps / 1e3
    return out


def compiled(before: dict) -> list[str]:
    """Registers / spills / shared bytes of the GEMM kernels compiled since ``before`` (Triton's JIT caches)."""
    info = []
    for name in KERNELS:
        fn = getattr(moe_tri, name)
        for key, kern in _cache(fn).items():
            if key in before.get(name, ()):
                continue
            md = kern.metadata
            info.append(f"{name[1:-7]}: regs {getattr(kern, 'n_regs', '?')} spills {getattr(kern, 'n_spills', '?')} "
                        f"smem {getattr(md, 'shared', '?')}")
    return info


def _cache(fn) -> dict:
    try:
        return dict(fn.device_caches[torch.cuda.current_device()][0])
    except Exception:  # noqa: BLE001 (another Triton layout: no resource line)
        return {}


def snapshot() -> dict:
    return {name: set(_cache(getattr(moe_tri, name))) for name in KERNELS}


def sweep_form(name: str, a: argparse.Namespace, tokens: list[int], bw: float, peaks: tuple[float, float],
               t0: float, budget: int, results: list, best_rows: list) -> None:
    """Every tile of one weight form at every token count; the best entries appended to ``best_rows``."""
    table_form, rf, sf, aq = FORMS[name]
    experts, shared = B._stack(rf, B.E), B._stack(sf, 1)
    per_up = sum(t[0].numel() * t.element_size() for t in (experts.w1, experts.w3, experts.w1_scale,
                                                            experts.w3_scale) if t is not None)
    per_down = sum(t[0].numel() * t.element_size() for t in (experts.w2, experts.w2_scale) if t is not None)
    peak = peaks[1] if name == "fp8" else peaks[0]
    batches = {n: routing(n, n) for n in tokens}
    # weights of every expert with a hit (all 256 here) + the shared one; x or h in, h or y out (bf16)
    floors = {}
    for n, (_, _, ids) in batches.items():
        touched = ids.unique().numel() + 1
        rows = n * B.TOPK + n
        fl = 2 * rows * K.D * B.I
        floors[n] = (2 * fl, fl, max((touched * per_up + rows * (K.D + B.I) * 2) / bw / 1e6, 2 * fl / peak / 1e9),
                     max((touched * per_down + rows * (K.D + B.I) * 2) / bw / 1e6, fl / peak / 1e9))
    quant = dict(fp8_dot=True, prequant=True) if aq else {}
    seen, tried = {}, []

    def run(cfg: dict, note: str = "") -> dict | None:
        eff = moe_tri.effective_config(tokens[-1], B.TOPK, experts, shared, 2, aq, cfg)
        cname = moe_tri.config_name(eff)
        if cname in seen:
            return None
        fitted = any(eff[k] != cfg[k] for k in ("bm", "bn_up", "bn_down", "bk", "num_stages"))
        over = max(moe_tri.smem_bytes(eff, 2, w.form, w.w1.element_size(), aq) for w in (experts, shared))
        over = over > budget
        note += (" fitted" if fitted else "") + (" >budget" if over else "")
        before = snapshot()
        pts = {}
        try:
            for n, (x, w, ids) in batches.items():
                def layer(x=x, w=w, ids=ids) -> torch.Tensor:
                    return moe_tri.moe_experts(x, experts, w, ids, B.LIMIT, aq, shared, B.LIMIT,
                                               out_dtype=torch.bfloat16, config=eff)
                layer()  # compiles
                pts[n] = kernel_ms(layer, a.reps)
        except Exception as e:  # noqa: BLE001 (OutOfResources and compile failures: the tile does not fit)
            print(f"{name} | - | {cname} | skipped: {type(e).__name__}: {str(e)[:120]}", flush=True)
            seen[cname] = None
            return None
        res = compiled(before)
        if res:
            note += " [" + "; ".join(res) + "]"
        for n, ms in pts.items():
            f_up, f_dn, fl_up, fl_dn = floors[n]
            up, dn = ms[KERNELS[0]], ms[KERNELS[1]]
            tf_up, tf_dn = f_up / up / 1e9, f_dn / dn / 1e9
            print(f"{name} | {n} | {cname} | {up:.3f} | {tf_up:.0f} | {100 * tf_up / peaks[0]:.0f}% | {up / fl_up:.2f}"
                  f" | {dn:.3f} | {tf_dn:.0f} | {100 * tf_dn / peaks[0]:.0f}% | {dn / fl_dn:.2f} |{note}", flush=True)
            results.append(dict(form=name, tokens=n, config=cname, up_ms=round(up, 4), down_ms=round(dn, 4),
                                up_floor_ms=round(fl_up, 4), down_floor_ms=round(fl_dn, 4), note=note.strip()))
        seen[cname] = (eff, pts)
        tried.append(cname)
        return seen[cname]

    cands = moe_tri.PREFILL_CANDIDATES[table_form]
    # the table's entries for these token counts first (1024 tokens: the "small" class), then the tiles
    defaults = list({moe_tri.size_class(n, B.TOPK, B.E): moe_tri.default_config(n, B.TOPK, B.E, table_form)
                     for n in tokens}.values())[::-1]
    for i, c in enumerate(defaults + [dict(c, group=8, direct=False, **quant) for c in cands]):
        if i >= len(defaults) and time.monotonic() - t0 > a.budget:
            print(f"# {name}: budget of {a.budget:.0f} s spent, {len(defaults) + len(cands) - i} tiles not run")
            break
        run(moe_tri._LAUNCH | c, " default" if i < len(defaults) else "")
    done = {c: seen[c] for c in tried}
    if not done:
        return
    # launch groups for the best tile of the largest batch (a runtime argument: no recompile)
    n_big = tokens[-1]
    best = min(done, key=lambda c: sum(done[c][1][n_big].values()))
    for g in (1, 4, 16, 8):
        if time.monotonic() - t0 <= a.budget + 15:
            run(dict(done[best][0], group=g), " group")
    for n in tokens:
        pts = {c: v[1][n] for c, v in seen.items() if v is not None}
        dflt = moe_tri.config_name(moe_tri.effective_config(
            n_big, B.TOPK, experts, shared, 2, aq, moe_tri.default_config(n, B.TOPK, B.E, table_form)))
        d_ms = sum(pts[dflt].values()) if dflt in pts else float("nan")
        up = min(pts, key=lambda c: pts[c][KERNELS[0]])
        dn = min(pts, key=lambda c: pts[c][KERNELS[1]])
        both = min(pts, key=lambda c: sum(pts[c].values()))
        eff = seen[both][0]
        keys = ("bm", "bn_up", "bn_down", "bk", "num_warps", "num_stages", "group") + (
            ("fp8_dot", "prequant") if aq else ())
        entry = "dict(" + ", ".join(f"{k}={eff[k]}" for k in keys) + ")"
        print(f"# {name} n={n}: best gate/up {up} {pts[up][KERNELS[0]]:.3f} ms; best down {dn} "
              f"{pts[dn][KERNELS[1]]:.3f} ms; best sum {both} {sum(pts[both].values()):.3f} ms")
        print(f"# DEFAULTS[{table_form!r}][{moe_tri.size_class(n, B.TOPK, B.E)!r}] = {entry}  # n={n}: "
              f"{sum(pts[both].values()):.3f} ms, default {d_ms:.3f} ms")
        best_rows.append(dict(form=name, tokens=n, best=both, entry=entry, best_ms=round(sum(pts[both].values()), 4),
                              default=dflt, default_ms=round(d_ms, 4)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--forms", default="fp8,bf16,fp4", help="comma-separated: bf16, fp8, fp4 (run in this order)")
    ap.add_argument("--tokens", default="1024,4096")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=130.0, help="seconds for the whole sweep")
    a = ap.parse_args()
    t0 = time.monotonic()
    tokens = [int(v) for v in a.tokens.split(",")]
    bw = K.hbm_gbps()
    peaks = B.matmul_peaks()
    gpu = torch.cuda.get_device_properties(0).name
    print(f"# {gpu}: copy {bw:.0f} GB/s, bf16 matmul 8192^3 {peaks[0]:.0f} TFLOP/s, fp8 {peaks[1]:.0f} TFLOP/s; "
          f"D={K.D} E={B.E} I={B.I} top-{B.TOPK} + shared expert, tokens {tokens}")
    moe_tri.SMEM_BUDGET, budget = H100_SMEM, moe_tri.SMEM_BUDGET
    print("form | tokens | config | up ms | up TFLOP/s | up %bf16 | up x floor | down ms | down TFLOP/s | "
          "down %bf16 | down x floor | note")
    results, best_rows = [], []
    for name in a.forms.split(","):  # one form's weights in memory at a time
        sweep_form(name, a, tokens, bw, peaks, t0, budget, results, best_rows)
        torch.cuda.empty_cache()
    print(f"# sweep: {time.monotonic() - t0:.0f} s")
    print(json.dumps(dict(bench="moe_prefill_sweep", gpu=gpu, bf16_peak=round(peaks[0]), fp8_peak=round(peaks[1]),
                          copy_gbps=round(bw), best=best_rows, points=results)))


if __name__ == "__main__":
    main()
