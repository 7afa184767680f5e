"""The MoE decode (direct) path over a grid of tiles at a few batch sizes, per weight form, on the GPU.

    python3 benchmarks/moe_direct_sweep.py --forms fp8,bf16 --batches 1 --budget 140

A whole layer as benchmarks/bench_moe.py times it (router GEMM, route_scored, moe_experts over 8 input copies
per CUDA-graph replay, so the experts come from HBM), its floor (distinct experts touched x their bytes + the
shared expert + the router weight, over the measured copy bandwidth), then for the fastest tile the device time of
each kernel (torch.profiler, eager) with programmatic dependent launch on and off. bench_moe.py's sweep spends its
budget on FP4 first; this one is for choosing ``moe_triton.DEFAULTS[form]["tiny"]``. ``--budget`` seconds per form.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_moe as B  # noqa: E402
import kernels as K  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dsv4.ops import moe as moe_ref  # noqa: E402
from dsv4.ops import moe_triton as moe_tri  # noqa: E402
from dsv4.ops import pdl  # noqa: E402
from dsv4.ops import routing_triton as route_tri  # noqa: E402

# (bn_up, bn_down, num_warps, num_stages, split)
TILES = ((64, 64, 4, 4, 2), (64, 64, 4, 4, 1), (32, 32, 4, 4, 1), (32, 32, 4, 4, 2), (16, 32, 4, 4, 1),
         (16, 16, 4, 6, 1), (32, 32, 4, 6, 1), (16, 32, 2, 6, 1), (32, 64, 4, 4, 2), (32, 32, 8, 4, 1),
         (64, 32, 4, 3, 1), (16, 64, 4, 6, 2), (32, 16, 4, 6, 1), (128, 128, 8, 3, 2), (32, 128, 4, 4, 4))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--forms", default="fp8,bf16", help="comma-separated: bf16, fp8, fp4")
    ap.add_argument("--batches", default="1", help="comma-separated token counts (direct path: <= 21)")
    ap.add_argument("--budget", type=float, default=140.0, help="seconds per form")
    a = ap.parse_args()
    bw = K.hbm_gbps()
    print(f"# {torch.cuda.get_device_properties(0).name}: copy bandwidth {bw:.0f} GB/s")
    w_gate = torch.randn(B.E, K.D, device="cuda") / K.D**0.5
    bias = torch.randn(B.E, device="cuda") * 0.01
    for name in a.forms.split(","):
        t0 = time.monotonic()
        rf, sf, aq = B.FORMS[name]
        ex, sh = B._stack(rf, B.E), B._stack(sf, 1)

        def layer(x, ex=ex, sh=sh, aq=aq, **kw):
            w, ids = route_tri.route_scored(F.linear(x.float(), w_gate), bias, B.TOPK, "sqrtsoftplus", B.SCALE)
            return moe_tri.moe_experts(x, ex, w, ids, B.LIMIT, aq, sh, B.LIMIT, out_dtype=x.dtype, **kw)

        for n in (int(v) for v in a.batches.split(",")):
            xs = [torch.randn(n, K.D, device="cuda").bfloat16() for _ in range(8)]
            touched = sum(moe_ref.route_scored(F.linear(x.float(), w_gate), bias, B.TOPK, "sqrtsoftplus",
                                               B.SCALE)[1].unique().numel() for x in xs) / len(xs)
            nbytes = touched * B._expert_bytes(ex) + B._expert_bytes(sh) + B.E * K.D * 4
            floor = nbytes / bw / 1e3
            default = moe_tri.config_name(moe_tri.effective_config(n, B.TOPK, ex, sh, 2, aq))
            print(f"## {name} n={n}: {touched:.1f} experts, {nbytes / 1e6:.1f} MB, floor {floor:.1f} us; "
                  f"default {default}")
            res = {}
            for bu, bd, w, s, k in TILES:
                if time.monotonic() - t0 > a.budget:
                    print(f"# {name}: budget spent")
                    break
                cfg = dict(bm=16, bn_up=bu, bn_down=bd, bk=128, num_warps=w, num_stages=s, split=k, direct=True,
                           fp8_dot=name != "bf16", fp4_dot=name == "fp4", prequant=False)
                cn = moe_tri.config_name(moe_tri.effective_config(n, B.TOPK, ex, sh, 2, aq, cfg))
                if cn not in res:
                    res[cn] = (K.timed(partial(layer, config=cfg), xs) * 1e3, cfg)
                    print(f"{name} | {n} | {cn} | {res[cn][0]:.1f} us | {res[cn][0] / floor:.2f}x", flush=True)
            if not res:
                continue
            best = min(res, key=lambda c: res[c][0])
            print(f"# best {name} n={n}: {best} {res[best][0]:.1f} us ({res[best][0] / floor:.2f}x its floor)")
            B._kernel_times(f"{name} n={n} best", partial(layer, config=res[best][1]), xs)
            pdl.set_enabled(False)
            print(f"# without PDL: {K.timed(partial(layer, config=res[best][1]), xs) * 1e3:.1f} us")
            B._kernel_times(f"{name} n={n} best, no PDL", partial(layer, config=res[best][1]), xs)
            pdl.set_enabled(True)
        del ex, sh
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
