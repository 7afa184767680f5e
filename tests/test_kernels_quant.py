"""FP8 activation quantisation kernels against dsv4.ops.quant, bit for bit, on fresh random inputs each run."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dsv4.ops import quant as ref  # noqa: E402
from dsv4.ops import quant_triton as tri  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(m: int, k: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Random rows with a wide per-group dynamic range, plus groups built to hit e4m3 rounding ties exactly,
    an all-zero group (amax floor) and tiny values (subnormal e4m3 codes)."""
    x = torch.randn(m, k // block, block) * torch.exp2(torch.randint(-20, 20, (m, k // block, 1)).float())
    x = x.view(m, k)
    if m >= 4:
        # group 0 of row 0: amax 448 * 2^3 -> scale 2^3; the rest are e4m3 midpoints times the scale
        mids = torch.tensor([1.0625, 1.1875, 1.3125, 3.25 * 1.0, 9.5, 17.0, 0.0029296875, 0.005859375])
        row = mids.repeat(block // len(mids) + 1)[:block] * 8
        row[0] = 448 * 8
        x[0, :block] = row * torch.where(torch.rand(block) < 0.5, -1.0, 1.0)
        x[1, :block] = 0
        x[2, :block] = torch.randn(block) * 1e-6
        x[3] = torch.randn(k) * 1e4
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [128, 64, 32])
@pytest.mark.parametrize("scale_fmt", ["ue8m0", None])
def test_act_quant_bit_exact(dtype, block, scale_fmt):
    x = _inputs(37, 256, block, dtype).to(DEV)
    q_ref, s_ref = ref.act_quant(x, block, scale_fmt)
    q, s = tri.act_quant(x, block, scale_fmt)
    assert q.dtype == q_ref.dtype and s.dtype == s_ref.dtype and s.shape == s_ref.shape
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s.view(torch.uint8) if scale_fmt else s, s_ref.view(torch.uint8) if scale_fmt else s_ref)
    # and back: the dequantised values are exact too
    y_ref = ref.act_dequant(q_ref, s_ref, dtype)
    y = tri.act_dequant(q, s, dtype)
    assert torch.equal(y, y_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,block", [(256, 128), (448, 64), (24, 64)])
def test_act_quant_sim_bit_exact(dtype, k, block):
    x = _inputs(21, k, min(block, k), dtype).to(DEV) if k % block == 0 else torch.randn(21, k, dtype=dtype, device=DEV)
    y_ref = ref.act_quant_sim(x, block)
    y = tri.act_quant_sim(x, block)
    assert y.dtype == x.dtype
    assert torch.equal(y, y_ref)


def test_act_quant_batched_shape():
    x = torch.randn(2, 3, 5, 128, device=DEV)
    q, s = tri.act_quant(x, 64)
    assert q.shape == x.shape and s.shape == (2, 3, 5, 2)
    q_ref, s_ref = ref.act_quant(x, 64)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
