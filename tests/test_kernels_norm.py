"""RMSNorm kernels against dsv4.ops.norm (fresh random inputs each run).

The norm: fp32 rel err <= 1e-5, bf16 within one bf16 ulp. The fused FP8 forms: bit-exact with ``act_quant`` of
the kernel's own norm output (the fusion adds no rounding of its own), and equal to ``act_quant(rms_norm(x))``
of the reference except where the two norms' last-bit difference crosses an FP8 rounding boundary.
"""

from __future__ import annotations

import pytest
import torch
from harness import rel_err

pytest.importorskip("triton")

from dsv4.ops import norm as ref  # noqa: E402
from dsv4.ops import norm_triton as tri  # noqa: E402
from dsv4.ops import quant  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _x(m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of very different magnitudes, one all-zero row (eps path), one row with a single large value."""
    x = torch.randn(m, n) * torch.exp2(torch.randint(-10, 10, (m, 1)).float())
    x[0] = 0
    if m > 2:
        x[1, 5] = 1e4
    return x.to(DEV, dtype)


def _w(n: int) -> torch.Tensor:
    return (1 + 0.1 * torch.randn(n)).to(DEV)


@pytest.mark.parametrize("n", [48, 64, 1000, 1024])
def test_rms_norm_fp32(n):
    x, w = _x(19, n, torch.float32), _w(n)
    want = ref.rms_norm(x, w, 1e-6)
    got = tri.rms_norm(x, w, 1e-6)
    assert got.dtype == want.dtype and rel_err(got[1:], want[1:]).max() <= 1e-5
    assert torch.equal(got[0], want[0])  # zeros stay exactly zero


def test_rms_norm_bf16_and_batched_shape():
    x, w = _x(24, 512, torch.bfloat16).view(2, 12, 512), _w(512)
    want = ref.rms_norm(x, w, 1e-6).float()
    got = tri.rms_norm(x, w, 1e-6)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    # at most one bf16 rounding step apart (2^-8 relative)
    assert ((got.float() - want).abs() <= want.abs() * 2.0**-8).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_fmt", ["ue8m0", None])
@pytest.mark.parametrize("n,block", [(512, 128), (384, 64)])
def test_rms_norm_quant(dtype, scale_fmt, n, block):
    x, w = _x(21, n, dtype), _w(n)
    q, s = tri.rms_norm_quant(x, w, 1e-6, block, scale_fmt)
    # bit-exact against act_quant of the kernel's own norm (block 128 tiles the row as the plain norm does, so
    # the sum of squares runs in the same order)
    q_own, s_own = quant.act_quant(tri.rms_norm(x, w, 1e-6), block, scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == s_own.dtype and s.shape == s_own.shape
    if block == 128:
        assert torch.equal(q.view(torch.uint8), q_own.view(torch.uint8))
        assert torch.equal(s.float(), s_own.float())
    # against the reference: the same codes except at the rare last-bit boundary crossings
    q_ref, s_ref = ref.rms_norm_quant(x, w, 1e-6, block, scale_fmt)
    same = q.view(torch.uint8) == q_ref.view(torch.uint8)
    assert same.float().mean() >= 0.995
    assert rel_err(quant.act_dequant(q, s).view(21, n), quant.act_dequant(q_ref, s_ref).view(21, n))[1:].max() <= 0.13  # one e4m3 step
    if scale_fmt == "ue8m0":
        assert (s.float() == s_ref.float()).float().mean() >= 0.98
    else:  # amax / 448 carries the norm's last-bit difference
        assert rel_err(s, s_ref).max() <= (1e-5 if dtype == torch.float32 else 2.0**-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,block", [(512, 128), (200, 64), (1000, 128)])
def test_rms_norm_quant_sim(dtype, n, block):
    """n 200 with block 64: a short last group, as act_quant_sim pads it."""
    x, w = _x(13, n, dtype), _w(n)
    got = tri.rms_norm_quant_sim(x, w, 1e-6, block)
    assert got.dtype == dtype
    if block == 128:
        assert torch.equal(got, quant.act_quant_sim(tri.rms_norm(x, w, 1e-6), block))
    want = ref.rms_norm_quant_sim(x, w, 1e-6, block)
    assert (got == want).float().mean() >= 0.995


def test_rmsnorm_layer_uses_the_kernel():
    from dsv4.model.layers import RMSNorm

    layers = [RMSNorm(96, 1e-6, ops).to(DEV) for ops in ("ref", "triton")]
    w = _w(96)
    for layer in layers:
        layer.weight.copy_(w)
    x = torch.randn(7, 96, device=DEV)
    assert rel_err(layers[1](x), layers[0](x)).max() <= 1e-5


@pytest.mark.parametrize("n", [64, 1000])
def test_rms_norm_fp32_input_rounds_as_it_loads(n):
    """An fp32 GEMM accumulation read in place (a strided column view) with ``dtype=bf16``: bit for bit the kernel
    on the pre-rounded bf16 input (the reference likewise), no copy or cast of its own."""
    fused = torch.randn(7, n + 40, device=DEV) * 3
    x = fused[:, 8: 8 + n]  # rows n + 40 apart, as a part of the fused x projection
    w = _w(n)
    pre = x.to(torch.bfloat16)
    got = tri.rms_norm(x, w, 1e-6, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, tri.rms_norm(pre, w, 1e-6))
    assert torch.equal(ref.rms_norm(x, w, 1e-6, dtype=torch.bfloat16), ref.rms_norm(pre, w, 1e-6))
