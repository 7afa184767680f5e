"""Block-scaled FP8 GEMM (native FP8 linears) at V4-Flash shapes (run by benchmarks/kernels.py).

    python3 benchmarks/kernels.py --quick --only fp8_gemm   # one GPU run, ~2 minutes: the decode sweep

Shapes: what the model runs through ``fp8_linear``: the fused x projection (wq_a + wkv, 4096 -> 1536), wq_b
1024 -> 64*512, the indexer's wq_b 1024 -> 64*128, wo_b 8192 -> 4096 (the shared expert runs inside the MoE
launches, not here), at M = 1, 16, 64, 256, 4096 rows; and ``fp8_grouped_linear`` for wo_a (8 groups of
4096 -> 1024). bytes: the FP8 weight and its fp32 block scales read once, the bf16 activations read once, the
bf16 output written once (the floor of a memory-bound GEMM; at large M the GEMM is compute-bound and the variant
column adds the achieved FP8 TFLOP/s). Each timed replay rotates over enough weight copies that the weights
come from HBM, not L2. ``ref_us`` is the bf16 GEMM on the dequantized weight (what weight format "dequant"
runs), timed the same way over bf16 weight copies.

Decode sweep (M = 1 and 16, every shape, wo_a included; sweep rows): the default and the default with
``fuse_sum`` (the split-K partials summed by each tile's last program instead of a second launch) first, then
``DECODE_CANDIDATES`` tiles at the generic split count, then on the tile with the best geometric mean over the
two row counts every split count in ``SPLITS`` with and without ``fuse_sum``. Printed at the end, per shape,
the configuration with the best geometric mean of time / best over M = 1 and 16, as the line for
``fp8_gemm_triton.DECODE`` (``GROUPED_DECODE`` for wo_a). Past ``SWEEP_BUDGET_S`` seconds the remaining shapes
time the default and its fused form only (said so). Without --quick, ``CANDIDATES`` tiles are also swept at
64 rows and more.
"""

from __future__ import annotations

import math
import time

import kernels as K
import torch
import torch.nn.functional as F

from dsv4.ops import fp8_gemm_triton as tri
from dsv4.ops.quant import dequantize_fp8_block, e8m0_to_float, quantize_fp8_block

# (name, K, N), most weight bytes per decode step first: past the budget the later shapes sweep less
SHAPES = (("wq_b", 1024, 64 * 512), ("wo_b", 8192, 4096), ("x_proj", 4096, 1536), ("idx_wq_b", 1024, 8192))
GROUPED = (8, 1024, 4096)  # wo_a: groups, outputs per group, inputs
MS = (1, 16, 64, 256, 4096)
DECODE_MS = (1, 16)
GROUPED_TS = (1, 4, 16, 64, 256, 4096)
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
TILES = tri.DECODE_CANDIDATES
CANDS = tri.CANDIDATES
SWEEP_BUDGET_S = 60.0
if K.SMOKE:
    SHAPES, GROUPED, MS = (("wq_a", 256, 128), ("wkv", 384, 64)), (2, 64, 256), (1, 2, 80)
    GROUPED_TS, SPLITS, TILES, CANDS = (1, 2, 20), (1, 2), tri.DECODE_CANDIDATES[:2], tri.CANDIDATES[1:2]
    DECODE_MS = (1, 2)
_START = [0.0]
PICKS: list[str] = []


def _weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = quantize_fp8_block(torch.randn(n, k, device=K.DEV) * k**-0.5)
    return q, e8m0_to_float(s)


def _tflops(m: int, n: int, k: int, t_ms: float) -> str:
    return f"{2 * m * n * k / t_ms / 1e9:.0f} TFLOP/s"


def _over() -> bool:
    return time.monotonic() - _START[0] > SWEEP_BUDGET_S


def _entry(cfg: dict) -> str:
    """A decode table entry: what DECODE / GROUPED_DECODE hold (block_m follows from the rows)."""
    keys = ("block_n", "num_warps", "num_stages", "splits", "fuse_sum")
    return "dict(" + ", ".join(f"{k}={cfg[k]!r}" for k in keys) + ")"


def _decode_sweep(label: str, key: str, ms: tuple[int, ...], default, splits_of, timer) -> dict[int, tuple]:
    """Sweep one shape at decode row counts; returns {m: (best ms, best name, default ms, default name)}.

    ``default(m)``: the default config; ``splits_of(m, cfg)``: the split count it resolves to;
    ``timer(m, cfg)``: (ms, row args) for one config. Every config is timed with an explicit ``splits`` (and
    ``fuse_sum`` only where it splits), so equal launches share a name and are timed once per m."""
    points: dict[int, dict[str, float]] = {m: {} for m in ms}
    cfgs: dict[str, dict] = {}

    def point(m: int, cfg: dict) -> str:
        c = dict(cfg, splits=splits_of(m, cfg))
        c["fuse_sum"] = bool(c.get("fuse_sum")) and c["splits"] > 1
        name = tri.config_name(c)
        if name not in points[m]:
            t, args = timer(m, c)
            K.SWEEP.append(K.row(*args[:2], m, None, t, *args[2:], sweep=True) | dict(config=name))
            points[m][name], cfgs[name] = t, c
        return name

    defaults = {m: point(m, default(m)) for m in ms}
    for m in ms:
        point(m, dict(default(m), fuse_sum=True))

    def geo(names: dict[int, str]) -> float:
        """The geometric mean over the row counts of time / that row count's best so far (``names``: per m)."""
        return math.prod(points[m][names[m]] / min(points[m].values()) for m in ms) ** (1 / len(ms))

    if _over():
        print(f"# fp8 sweep budget ({SWEEP_BUDGET_S:.0f} s) spent: {label} times its default and fuse_sum only")
    else:
        # each tile at each m's own generic split count; the split counts are swept on the best one
        tiles = [{m: point(m, dict(default(m), **t, fuse_sum=False)) for m in ms} for t in TILES]
        tile = TILES[min(range(len(TILES)), key=lambda i: geo(tiles[i]))]
        for m in ms:
            for s in SPLITS:
                for fuse in (False, True):
                    point(m, dict(default(m), **tile, splits=s, fuse_sum=fuse))
    pick = min((n for n in points[ms[0]] if all(n in points[m] for m in ms)), key=lambda n: geo(dict.fromkeys(ms, n)))
    per_m = ", ".join(f"M={m} {points[m][pick] * 1e3:.1f} us (default {points[m][defaults[m]] * 1e3:.1f}, best "
                      f"{min(points[m].values()) * 1e3:.1f})" for m in ms)
    PICKS.append(f"# {key} = {_entry(cfgs[pick])}  # {label}: {per_m}")
    out = {}
    for m in ms:
        b = min(points[m], key=points[m].get)
        out[m] = (points[m][b], b, points[m][defaults[m]], defaults[m])
    return out


def _linear(bw: float, quick: bool, name: str, k: int, n: int) -> list[dict]:
    w0, s0 = _weight(n, k)
    w_bytes = n * k + s0.numel() * 4
    # distinct weights per replay (the same values: copies cost no extra quantization time)
    ws = [(w0.clone(), s0.clone()) for _ in range(K.n_copies(w_bytes))]
    wd = [dequantize_fp8_block(w0, s0).bfloat16() for _ in range(K.n_copies(2 * n * k))]
    shape = f"{name} {k}->{n}"
    data = {}
    for m in MS:
        xs = [torch.randn(m, k, device=K.DEV).bfloat16() for _ in range(max(len(ws), len(wd)))]
        t_ref = K.timed(lambda a: F.linear(a[0], a[1]), list(zip(xs, wd, strict=False)))
        data[m] = (list(zip(xs, ws, strict=False)), w_bytes + m * k * 2 + m * n * 2, t_ref)

    def timer(m: int, c: dict) -> tuple[float, tuple]:
        fp8, nbytes, t_ref = data[m]
        t = K.timed(lambda a: tri.fp8_linear(a[0], *a[1], config=c), fp8)
        return t, ("fp8_linear", f"{shape} {tri.config_name(c)}", nbytes, bw, t_ref)

    def splits_of(m: int, c: dict) -> int:
        return tri._splits(m, n, k, tri.default_config(m, n, k) | c, torch.device(K.DEV))[0]

    ms = tuple(m for m in DECODE_MS if m in MS)
    best = _decode_sweep(shape, f"DECODE[({n}, {k})]", ms, lambda m: tri.default_config(m, n, k),
                         splits_of, timer)
    return _rows("fp8_linear", shape, MS, data, best, bw, n, k, lambda a: tri.fp8_linear(a[0], *a[1]),
                 lambda m: tri.default_config(m, n, k),
                 None if quick else lambda m, *rest: _prefill_sweep(m, shape, *rest, bw))


def _rows(kind: str, shape: str, ms: tuple[int, ...], data: dict, best: dict, bw: float, n: int, k: int,
          run_default, default, more=None) -> list[dict]:
    """Per row count: the default's row (its time from the decode sweep ``best`` where it ran, else timed here)
    and the best config's; ``more(m, copies, bytes, ref ms)``: (ms, name) of a further sweep where ``best`` has
    no entry."""
    rows = []
    for m in ms:
        fp8, nbytes, t_ref = data[m]
        if m in best:
            tb, cb, t, cfg = best[m]
        else:
            t = K.timed(run_default, fp8)
            cfg, tb, cb = tri.config_name(default(m)), None, None
        rows.append(K.row(kind, f"{shape} {cfg} ({_tflops(m, n, k, t)})", m, None, t, nbytes, bw, t_ref))
        if tb is None and more is not None:
            tb, cb = more(m, fp8, nbytes, t_ref)
        if tb is not None:
            rows.append(K.row(kind, f"{shape} best: {cb} ({_tflops(m, n, k, tb)})", m, None, tb, nbytes, bw, t_ref))
    return rows


def _prefill_sweep(m: int, shape: str, fp8: list, nbytes: int, t_ref: float, bw: float) -> tuple[float, str]:
    """64 rows and more: the tiles of 64 rows and up, activations quantized first (act_quant) and in the GEMM."""
    best = None
    for cfg in [c for c in CANDS if c["block_m"] >= 64] or CANDS[:1]:
        for quant_x in (False, True) if m <= tri.SMALL_M else (False,):
            c = dict(cfg, quant_x=quant_x)
            tc = K.timed(lambda a, c=c: tri.fp8_linear(a[0], *a[1], config=c), fp8)
            K.SWEEP.append(K.row("fp8_linear", f"{shape} {tri.config_name(c)}", m, None, tc, nbytes, bw, t_ref,
                                 sweep=True))
            if best is None or tc < best[0]:
                best = (tc, tri.config_name(c))
    return best


def _grouped(bw: float) -> list[dict]:
    g, r, k = GROUPED
    w0, s0 = _weight(g * r, k)
    w_bytes = g * r * k + s0.numel() * 4
    ws = [(w0.clone(), s0.clone()) for _ in range(K.n_copies(w_bytes))]
    wd = [dequantize_fp8_block(w0, s0).bfloat16().view(g, r, k) for _ in range(K.n_copies(2 * g * r * k))]
    shape = f"wo_a {g}x({k}->{r})"
    data = {}
    for t in GROUPED_TS:
        xs = [torch.randn(t, g, k, device=K.DEV).bfloat16() for _ in range(max(len(ws), len(wd)))]
        t_ref = K.timed(lambda a: torch.einsum("tgi,gri->tgr", a[0], a[1]), list(zip(xs, wd, strict=False)))
        data[t] = (list(zip(xs, ws, strict=False)), w_bytes + t * g * (k + r) * 2, t_ref)

    def timer(t: int, c: dict) -> tuple[float, tuple]:
        fp8, nbytes, t_ref = data[t]
        tt = K.timed(lambda a: tri.fp8_grouped_linear(a[0], *a[1], config=c), fp8)
        return tt, ("fp8_grouped", f"{shape} {tri.config_name(c)}", nbytes, bw, t_ref)

    def splits_of(t: int, c: dict) -> int:
        return tri._splits(t, g * r, k, tri.grouped_default_config(t) | c, torch.device(K.DEV))[0]

    ms = tuple(t for t in DECODE_MS if t in GROUPED_TS)
    best = _decode_sweep(shape, "GROUPED_DECODE", ms, tri.grouped_default_config, splits_of, timer)
    return _rows("fp8_grouped", shape, GROUPED_TS, data, best, bw, g * r, k,
                 lambda a: tri.fp8_grouped_linear(a[0], *a[1]), tri.grouped_default_config)


def run(bw: float, quick: bool) -> list[dict]:
    _START[0] = time.monotonic()
    PICKS.clear()
    rows = []
    for i, (name, k, n) in enumerate(SHAPES):
        rows += _linear(bw, quick, name, k, n)
        if i == 1:  # wo_a reads as many bytes per step as wq_b and wo_b: swept before the smaller shapes
            rows += _grouped(bw)
        if K.DEV == "cuda":
            torch.cuda.empty_cache()
    print("# fp8 decode picks (best geometric mean of time / best over M = "
          f"{', '.join(map(str, DECODE_MS))}; paste into fp8_gemm_triton):")
    for line in PICKS:
        print(line)
    print(f"# fp8_gemm bench: {time.monotonic() - _START[0]:.0f} s")
    return rows
