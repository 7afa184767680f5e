"""The attention input's projections at V4-Flash shapes, bf16: the separate modules as they ran before the fusion
(wq_a, wkv and weights_proj bf16 GEMMs; each compressor wkv/wgate an fp32 GEMM of the upcast input on an fp32
weight) against the fused :class:`dsv4.model.x_proj.XProjection` (one bf16 GEMM, fp32 out, one cast).

Per layer kind and token count: kernel launches (torch.profiler), eager microseconds (launch overhead
included: what a decode step without CUDA graphs pays) and CUDA-graph microseconds (device time), each for the
separate modules, the fused form and the fused weight run as one GEMM per part ("split"), all including the
copy each consumer kernel makes of a non-contiguous input; and the weight bytes read. Ends with one JSON line.

    python benchmarks/bench_x_proj.py            # about 30 s on an H100/H200
"""

from __future__ import annotations

import json
import statistics

import torch
import torch.nn.functional as F

from dsv4.config import CSA, HCA, SLIDING, flash_config
from dsv4.model.x_proj import XProjection, x_parts

TOKENS = (1, 16, 64, 256)
REPS = 200


def separate(parts, weights: dict[str, torch.Tensor]):
    """The pre-fusion modules: a closure over per-part weights (fp32 for the compressor parts)."""
    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {p.name: F.linear(x.float(), weights[p.name]) if p.fp32 else F.linear(x, weights[p.name])
                for p in parts}
    return run


def split_gemms(parts, xp: XProjection):
    """The fused weight run as one GEMM per part over its row view (contiguous outputs, no consumer copies)."""
    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out, row = {}, 0
        for p in parts:
            w = xp.weight[row: row + p.rows]
            row += p.rows
            out[p.name] = torch.mm(x, w.t(), out_dtype=torch.float32) if p.fp32 else F.linear(x, w)
        return out
    return run


def consumed(fn):
    """``fn`` plus the ``.contiguous()`` each consumer kernel's wrapper does on its input (a copy for a column
    view of the fused product when T > 1): the fair cost of handing the outputs on."""
    def run(x: torch.Tensor) -> list[torch.Tensor]:
        return [v.contiguous() for v in fn(x).values()]
    return run


def time_eager(fn, x: torch.Tensor) -> float:
    for _ in range(10):
        fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(REPS // 20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(20):
            fn(x)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1000 / 20)
    return statistics.median(times)


def time_graph(fn, x: torch.Tensor) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):
            fn(x)
    return time_eager(lambda _: g.replay(), x) / 20


def launches(fn, x: torch.Tensor) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(x)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset")))


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_x_proj needs CUDA")
    cfg = flash_config()
    rows = []
    print(f"{'kind':8s} {'T':>4s} {'MB sep':>7s} {'MB fus':>7s} {'launch sep':>10s} {'fus':>4s} "
          f"{'eager us sep':>12s} {'fus':>7s} {'split':>7s} {'graph us sep':>12s} {'fus':>7s} {'split':>7s} "
          f"{'best (graph)':>12s}")
    for kind in (SLIDING, CSA, HCA):
        parts = x_parts(cfg, cfg.layer_kinds.index(kind))
        with torch.device("cuda"):
            xp = XProjection(parts, cfg.hidden_size, torch.bfloat16, act_quant=False)
            xp.weight.copy_(torch.randn(xp.weight.shape) * 0.02)
        weights, row = {}, 0
        for p in parts:
            w = xp.weight[row: row + p.rows]
            weights[p.name] = w.float().contiguous() if p.fp32 else w.contiguous()
            row += p.rows
        sep, fus, spl = consumed(separate(parts, weights)), consumed(xp), consumed(split_gemms(parts, xp))
        mb_sep = sum(w.numel() * w.element_size() for w in weights.values()) / 1e6
        mb_fus = xp.weight.numel() * 2 / 1e6
        for t in TOKENS:
            x = torch.randn(t, cfg.hidden_size, device="cuda").bfloat16()
            r = dict(kind=kind, tokens=t, weight_mb_separate=round(mb_sep, 1), weight_mb_fused=round(mb_fus, 1),
                     launches_separate=launches(sep, x), launches_fused=launches(fus, x),
                     launches_split=launches(spl, x),
                     eager_us_separate=time_eager(sep, x), eager_us_fused=time_eager(fus, x),
                     eager_us_split=time_eager(spl, x), graph_us_separate=time_graph(sep, x),
                     graph_us_fused=time_graph(fus, x), graph_us_split=time_graph(spl, x))
            r["best_graph"] = min(("separate", "fused", "split"), key=lambda k: r[f"graph_us_{k}"])
            rows.append(r)
            print(f"{kind:8s} {t:4d} {mb_sep:7.1f} {mb_fus:7.1f} {r['launches_separate']:10d} "
                  f"{r['launches_fused']:4d} {r['eager_us_separate']:12.1f} {r['eager_us_fused']:7.1f} "
                  f"{r['eager_us_split']:7.1f} {r['graph_us_separate']:12.1f} {r['graph_us_fused']:7.1f} "
                  f"{r['graph_us_split']:7.1f} {r['best_graph']:>12s}")
    print(json.dumps({"bench": "x_proj", "rows": rows}))


if __name__ == "__main__":
    main()
