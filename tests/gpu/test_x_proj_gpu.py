"""The fused x projection on the GPU at V4-Flash shapes (skipped without CUDA): the bf16 GEMM with an fp32 output
against the fp32 GEMM the compressors ran, the activation-dtype parts against their own bf16 GEMMs, native FP8
parts fused against separate, and CUDA-graph capture.

    pytest -q tests/gpu/test_x_proj_gpu.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv4.config import CSA, HCA, SLIDING, flash_config
from dsv4.model.layers import Linear
from dsv4.model.x_proj import XProjection, mm_fp32, x_parts
from dsv4.ops.dispatch import get_ops
from dsv4.ops.quant import quantize_fp8_block

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CFG = flash_config()


def _layer(kind: str) -> int:
    return CFG.layer_kinds.index(kind)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("t", [1, 7, 64, 300])
def test_mm_fp32_is_the_fp32_gemm(t: int) -> None:
    g = torch.Generator("cuda").manual_seed(t)
    x = torch.randn(t, 4096, device="cuda", generator=g).bfloat16()
    w = (torch.randn(4160, 4096, device="cuda", generator=g) * 0.02).bfloat16()
    got = mm_fp32(x, w)
    want = F.linear(x.double(), w.double())
    assert got.dtype == torch.float32 and not got.isnan().any()
    assert _rel(got, want) <= 1e-5
    assert _rel(F.linear(x.float(), w.float()), want) <= 1e-5  # the old fp32 path: the same accuracy


@pytest.mark.parametrize("kind", [SLIDING, CSA, HCA])
@pytest.mark.parametrize("t", [1, 64])
def test_parts_match_their_own_gemms(kind: str, t: int) -> None:
    parts = x_parts(CFG, _layer(kind))
    with torch.device("cuda"):
        xp = XProjection(parts, CFG.hidden_size, torch.bfloat16, act_quant=False)
        xp.weight.copy_(torch.randn(xp.weight.shape) * 0.02)
        x = torch.randn(t, CFG.hidden_size).bfloat16()
    out, row = xp(x), 0
    for p in parts:
        w = xp.weight[row: row + p.rows]
        row += p.rows
        if p.fp32:  # the old module: an fp32 weight, the input upcast
            want = F.linear(x.float(), w.float())
            assert out[p.name].dtype == torch.float32 and _rel(out[p.name], want) <= 1e-5, p.name
        else:
            want = F.linear(x, w)
            assert out[p.name].dtype == torch.bfloat16 and _rel(out[p.name], want) <= 1e-2, p.name


def test_native_fp8_parts_fused_equal_separate() -> None:
    parts = x_parts(CFG, _layer(CSA))
    fp8_parts = [p for p in parts if p.fp8]
    ops = get_ops("triton")
    with torch.device("cuda"):
        sep = {p.name: Linear(CFG.hidden_size, p.rows, torch.bfloat16, fp8_ops=ops) for p in fp8_parts}
        for lin in sep.values():
            q, s = quantize_fp8_block(torch.randn(lin.weight.shape) * 0.02, (128, 128), None)
            lin.weight.copy_(q)
            lin.scale.copy_(s)
        fused = Linear(CFG.hidden_size, sum(p.rows for p in fp8_parts), torch.bfloat16, fp8_ops=ops)
        fused.weight.copy_(torch.cat([lin.weight for lin in sep.values()]))
        fused.scale.copy_(torch.cat([lin.scale for lin in sep.values()]))
        xp = XProjection(parts, CFG.hidden_size, torch.bfloat16, act_quant=True, fp8=fused)
        xp.weight.copy_(torch.randn(xp.weight.shape) * 0.02)
        x = torch.randn(16, CFG.hidden_size).bfloat16()
    out = xp(x)
    for name, lin in sep.items():
        assert _rel(out[name], lin(x)) <= 1e-2, name


def test_cuda_graph_replay() -> None:
    parts = x_parts(CFG, _layer(CSA))
    with torch.device("cuda"):
        xp = XProjection(parts, CFG.hidden_size, torch.bfloat16, act_quant=False)
        xp.weight.copy_(torch.randn(xp.weight.shape) * 0.02)
        x = torch.randn(4, CFG.hidden_size).bfloat16()
    eager = {k: v.clone() for k, v in xp(x).items()}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        xp(x)  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = xp(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    fresh = xp(x)
    for k in eager:
        assert torch.equal(out[k], fresh[k]), k
