"""Block-scaled FP8 GEMM (native FP8 linears) at V4-Flash shapes (run by benchmarks/kernels.py).

Shapes: wq_a 4096 -> 1024, wq_b 1024 -> 64*512, wkv 4096 -> 512, wo_b 8192 -> 4096, at M = 1, 16, 64, 256, 4096
rows. bytes: the FP8 weight and its fp32 block scales read once, the bf16 activations read once, the bf16
output written once (the floor of a memory-bound GEMM; at large M the GEMM is compute-bound and the variant
column adds the achieved FP8 TFLOP/s). Each timed replay rotates over enough weight copies that the weights
come from HBM, not L2. ``ref_us`` is ``F.linear`` in bf16 on the dequantized weight (what weight format
"dequant" runs), timed the same way over bf16 weight copies. Without --quick, ``fp8_gemm_triton.CANDIDATES`` tiles
are swept per shape (printed as sweep lines; the best one is a table row beside the default).
"""

from __future__ import annotations

import kernels as K
import torch
import torch.nn.functional as F

from dsv4.ops import fp8_gemm_triton as tri
from dsv4.ops.quant import dequantize_fp8_block, e8m0_to_float, quantize_fp8_block

SHAPES = (("wq_a", 4096, 1024), ("wq_b", 1024, 64 * 512), ("wkv", 4096, 512), ("wo_b", 8192, 4096))
MS = (1, 16, 64, 256, 4096)
CANDS = tri.CANDIDATES
if K.SMOKE:
    SHAPES, MS, CANDS = (("wq_a", 256, 128), ("wkv", 384, 64)), (1, 80), tri.CANDIDATES[1:2]


def _weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = quantize_fp8_block(torch.randn(n, k, device=K.DEV) * k**-0.5)
    return q, e8m0_to_float(s)


def _tflops(m: int, n: int, k: int, t_ms: float) -> str:
    return f"{2 * m * n * k / t_ms / 1e9:.0f} TFLOP/s"


def run(bw: float, quick: bool) -> list[dict]:
    rows = []
    for name, k, n in SHAPES:
        w0, s0 = _weight(n, k)
        w_bytes = n * k + s0.numel() * 4
        # distinct weights per replay (the same values: copies cost no extra quantization time)
        ws = [(w0.clone(), s0.clone()) for _ in range(K.n_copies(w_bytes))]
        wd = [dequantize_fp8_block(w0, s0).bfloat16() for _ in range(K.n_copies(2 * n * k))]
        for m in MS:
            nbytes = w_bytes + m * k * 2 + m * n * 2
            xs = [torch.randn(m, k, device=K.DEV).bfloat16() for _ in range(max(len(ws), len(wd)))]
            fp8 = list(zip(xs, ws, strict=False))
            bf16 = list(zip(xs, wd, strict=False))
            t_ref = K.timed(lambda a: F.linear(a[0], a[1]), bf16)
            shape = f"{name} {k}->{n}"
            t = K.timed(lambda a: tri.fp8_linear(a[0], *a[1]), fp8)
            cfg = tri.config_name(tri.default_config(m, n, k))
            rows.append(K.row("fp8_linear", f"{shape} {cfg} ({_tflops(m, n, k, t)})", m, None, t, nbytes, bw, t_ref))
            if quick:
                continue
            # few rows: the candidates of the default BLOCK_M, both quantization placements; many rows: the
            # tiles of 64 rows and more, activations quantized first. Printed as sweep lines; the best joins the table.
            bm = tri.default_config(m, n, k)["block_m"]
            small = m <= tri.SMALL_M
            cands = [c for c in CANDS if (c["block_m"] == bm if small else c["block_m"] >= 64)] or CANDS[:1]
            best = None
            for cfg in cands:
                for quant_x in (True, False) if small else (False,):
                    c = dict(cfg, quant_x=quant_x)
                    tc = K.timed(lambda a, c=c: tri.fp8_linear(a[0], *a[1], config=c), fp8)
                    K.row("fp8_linear", f"{shape} {tri.config_name(c)}", m, None, tc, nbytes, bw, t_ref, sweep=True)
                    if best is None or tc < best[0]:
                        best = (tc, tri.config_name(c))
            rows.append(K.row("fp8_linear", f"{shape} best: {best[1]} ({_tflops(m, n, k, best[0])})", m, None,
                              best[0], nbytes, bw, t_ref))
    return rows + _grouped(bw)


# wo_a: 8 groups of 4096 inputs -> 1024 (weight-only FP8, the einsum's bf16 activations); ref: the bf16 einsum on
# the dequantized weight (what weight format "dequant" runs, and "native" ran before this kernel)
GROUPED = (8, 1024, 4096) if not K.SMOKE else (2, 64, 256)
GROUPED_TS = (1, 4, 16, 64, 256, 4096) if not K.SMOKE else (1, 20)
_TILES = ((16, 32, 4, 4), (16, 64, 4, 4), (16, 64, 4, 6), (16, 128, 4, 3))


def _grouped(bw: float) -> list[dict]:
    g, r, k = GROUPED
    w0, s0 = _weight(g * r, k)
    w_bytes = g * r * k + s0.numel() * 4
    ws = [(w0.clone(), s0.clone()) for _ in range(K.n_copies(w_bytes))]
    wd = [dequantize_fp8_block(w0, s0).bfloat16().view(g, r, k) for _ in range(K.n_copies(2 * g * r * k))]
    rows = []
    for t in GROUPED_TS:
        nbytes = w_bytes + t * g * (k + r) * 2
        xs = [torch.randn(t, g, k, device=K.DEV).bfloat16() for _ in range(max(len(ws), len(wd)))]
        t_ref = K.timed(lambda a: torch.einsum("tgi,gri->tgr", a[0], a[1]), list(zip(xs, wd, strict=False)))
        fp8 = list(zip(xs, ws, strict=False))
        shape = f"wo_a {g}x({k}->{r})"
        cfg = tri.grouped_default_config(t)
        tt = K.timed(lambda a: tri.fp8_grouped_linear(a[0], *a[1]), fp8)
        rows.append(K.row("fp8_grouped", f"{shape} {tri.config_name(cfg)} ({_tflops(t, g * r, k, tt)})", t, None,
                          tt, nbytes, bw, t_ref))
        if t <= tri.SMALL_M and not K.SMOKE:  # decode tiles
            for bm_, bn, nw, st in _TILES:
                c = dict(block_m=max(bm_, cfg["block_m"]), block_n=bn, num_warps=nw, num_stages=st)
                tc = K.timed(lambda a, c=c: tri.fp8_grouped_linear(a[0], *a[1], config=c), fp8)
                K.row("fp8_grouped", f"{shape} {tri.config_name(c)}", t, None, tc, nbytes, bw, t_ref, sweep=True)
    return rows
