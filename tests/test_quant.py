"""dsv4.ops.quant against scalar formula references written independently of the tensor code."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from dsv4.ops.quant import (
    E2M1_VALUES,
    act_quant,
    act_quant_sim,
    dequantize_fp4_block,
    dequantize_fp8_block,
    e8m0_to_float,
    float_to_e8m0,
    fp4_act_quant_sim,
    hadamard_transform,
    quantize_fp4_block,
    quantize_fp8_block,
    unpack_fp4,
)


# ---- scalar references --------------------------------------------------------------------------------
def f32(x: float) -> float:
    """Round a Python float to the nearest fp32 (RNE)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def ref_pow2_scale(amax: float, qmax: float) -> float:
    """2^ceil(log2(fp32(amax * fp32(1/qmax)))) computed with frexp instead of bit tricks."""
    v = f32(amax * f32(1.0 / qmax))  # the product of two fp32 values is exact in double
    m, e = math.frexp(v)  # v = m * 2^e, m in [0.5, 1)
    return 2.0 ** (e - 1 if m == 0.5 else e)


def _e4m3_values() -> list[tuple[float, int]]:
    """(value, code) for every non-negative finite e4m3fn code, decoded from the format definition."""
    out = []
    for code in range(0x7F):  # 0x7F is NaN
        exp, man = code >> 3, code & 7
        v = man / 8 * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
        out.append((v, code))
    return out


_E4M3 = _e4m3_values()


def ref_e4m3(x: float) -> float:
    """Round to e4m3fn: nearest value, ties to the even code, saturating at 448."""
    mag = min(abs(x), 448.0)
    best = min(_E4M3, key=lambda vc: (abs(vc[0] - mag), vc[1] & 1))
    return math.copysign(best[0], x)


def ref_e2m1(x: float) -> float:
    mag = min(abs(x), 6.0)
    best = min(range(8), key=lambda c: (abs(E2M1_VALUES[c] - mag), c & 1))
    return math.copysign(E2M1_VALUES[best], x)


# ---- ue8m0 --------------------------------------------------------------------------------------------
def test_e8m0_all_bytes() -> None:
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    f = e8m0_to_float(b)
    for i in range(255):
        assert f[i].item() == 2.0 ** (i - 127)
    assert math.isnan(f[255].item())
    assert torch.equal(e8m0_to_float(b.view(torch.float8_e8m0fnu)).view(torch.int32), f.view(torch.int32))
    # torch's own decoding agrees (NaN aside)
    assert torch.equal(b[:255].view(torch.float8_e8m0fnu).float(), f[:255])
    enc = float_to_e8m0(f[:255])
    assert enc.dtype == torch.float8_e8m0fnu and torch.equal(enc.view(torch.uint8), b[:255])


def test_float_to_e8m0_rejects_non_powers() -> None:
    for bad in (3.0, 0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            float_to_e8m0(torch.tensor([bad]))


def test_ue8m0_rule_edges() -> None:
    cases = [(448.0, 1.0), (224.0, 0.5), (448.0 * (1 + 2**-20), 2.0), (449.0, 2.0), (1.0, 2.0**-8), (0.0, 2.0**-22)]
    for amax, want in cases:
        x = torch.zeros(1, 128)
        x[0, 5] = amax
        _, s = act_quant(x)
        assert e8m0_to_float(s).item() == want == ref_pow2_scale(max(amax, 1e-4), 448.0), amax


# ---- FP8 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(130, 260), (64, 96)])
def test_fp8_block_matches_formula(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[1])  # varied block magnitudes
    w[:, :3] = 0.0
    q, s = quantize_fp8_block(w)
    n, k = shape
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    assert s.shape == (-(-n // 128), -(-k // 128))
    wl, ql, sl = w.tolist(), q.float().tolist(), e8m0_to_float(s).tolist()
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            rows, cols = range(bi * 128, min(n, bi * 128 + 128)), range(bj * 128, min(k, bj * 128 + 128))
            amax = max(abs(wl[r][c]) for r in rows for c in cols)
            scale = ref_pow2_scale(max(amax, f32(1e-4)), 448.0)
            assert sl[bi][bj] == scale
            for r in rows:
                for c in cols:
                    assert ql[r][c] == ref_e4m3(wl[r][c] / scale), (r, c)
    deq = dequantize_fp8_block(q, s)
    assert torch.equal(deq, q.float() * e8m0_to_float(s).repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k])


def test_fp8_rne_and_saturation() -> None:
    # Scale 1 (amax 448): the other entries sit exactly between e4m3 neighbours.
    vals = [448.0, 1.0625, 1.1875, 17.0, 19.0, -17.0, 0.0009765625 * 1.5]
    x = torch.zeros(1, 128)
    x[0, : len(vals)] = torch.tensor(vals)
    q, s = act_quant(x)
    assert e8m0_to_float(s).item() == 1.0
    assert q.float()[0, : len(vals)].tolist() == [448.0, 1.0, 1.25, 16.0, 20.0, -16.0, 0.001953125]
    # Without a pow2 scale x/s can round past 448: the clamp saturates instead of overflowing to NaN.
    y = torch.full((1, 128), 1.0)
    y[0, 0] = 1000.3
    q, s = act_quant(y, scale_fmt=None)
    assert s.dtype == torch.float32 and q.float().abs().max().item() == 448.0
    assert not torch.isnan(q.float()).any()


def test_act_quant_sim_and_dtype() -> None:
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    q, s = act_quant(x, 128)
    assert q.shape == x.shape and s.shape == (3, 5, 2)
    sim = act_quant_sim(x, 128)
    ref = (q.float().view(3, 5, 2, 128) * e8m0_to_float(s)[..., None]).view(x.shape).to(torch.bfloat16)
    assert sim.dtype == torch.bfloat16 and torch.equal(sim, ref)
    z = act_quant_sim(torch.zeros(2, 64), 64)
    assert torch.equal(z, torch.zeros(2, 64))
    with pytest.raises(ValueError):
        act_quant(torch.randn(2, 100), 64)


# ---- FP4 ----------------------------------------------------------------------------------------------
def test_fp4_grid_and_ties() -> None:
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    row = [6.0] + mids + [-m for m in mids] + [0.26, 2.51, -0.1] + [0.0] * 14
    w = torch.tensor([row])
    packed, s = quantize_fp4_block(w)
    assert packed.dtype == torch.int8 and packed.shape == (1, 16) and s.shape == (1, 1)
    assert e8m0_to_float(s).item() == 1.0
    got = dequantize_fp4_block(packed, s)[0].tolist()
    assert got[:18] == [6.0] + want + [-v for v in want] + [0.5, 3.0, -0.0]
    assert torch.signbit(dequantize_fp4_block(packed, s)[0, 17])  # -0.1 keeps its sign (code 8)
    for c, v in enumerate(row):
        assert got[c] == ref_e2m1(v)


def test_fp4_packing_layout() -> None:
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 2], w[0, 3] = 6.0, -0.5, 1.5, -3.0  # codes 7, 9, 3, 13
    packed, _ = quantize_fp4_block(w)
    u = packed.view(torch.uint8)[0].tolist()
    assert u[0] == 7 | (9 << 4) and u[1] == 3 | (13 << 4)
    assert unpack_fp4(packed)[0, :4].tolist() == [6.0, -0.5, 1.5, -3.0]


def test_fp4_matches_formula_and_round_trips() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 128, generator=g) * torch.logspace(-4, 3, 128)
    packed, s = quantize_fp4_block(w)
    deq = dequantize_fp4_block(packed, s)
    sl = e8m0_to_float(s).tolist()
    for r in range(8):
        for b in range(4):
            grp = w[r, b * 32:(b + 1) * 32].tolist()
            scale = ref_pow2_scale(max(max(abs(v) for v in grp), 6 * 2.0**-126), 6.0)
            assert sl[r][b] == scale
            for c, v in enumerate(grp):
                assert deq[r, b * 32 + c].item() == ref_e2m1(v / scale) * scale
    # Re-quantising a dequantised tensor whose groups reach code 7 reproduces it bit for bit.
    codes = torch.randint(0, 16, (4, 64), generator=g, dtype=torch.uint8)
    codes[:, 0] = 7
    codes[:, 32] = 15
    p0 = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
    s0 = torch.randint(100, 140, (4, 2), generator=g).to(torch.uint8).view(torch.float8_e8m0fnu)
    p1, s1 = quantize_fp4_block(dequantize_fp4_block(p0, s0))
    assert torch.equal(p1, p0) and torch.equal(s1.view(torch.uint8), s0.view(torch.uint8))


def test_fp4_act_quant_sim() -> None:
    x = torch.randn(2, 3, 64)
    sim = fp4_act_quant_sim(x)
    p, s = quantize_fp4_block(x)
    assert torch.equal(sim, dequantize_fp4_block(p, s))
    assert torch.equal(fp4_act_quant_sim(torch.zeros(64)), torch.zeros(64))
    assert fp4_act_quant_sim(x.bfloat16()).dtype == torch.bfloat16


# ---- Hadamard -----------------------------------------------------------------------------------------
def _sylvester(d: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("d", [1, 2, 8, 128, 512])
def test_hadamard(d: int) -> None:
    m = hadamard_transform(torch.eye(d))
    torch.testing.assert_close(m, _sylvester(d) * d**-0.5, rtol=0, atol=1e-6)
    torch.testing.assert_close(m @ m, torch.eye(d), rtol=0, atol=1e-5)
    x = torch.randn(3, 2, d, dtype=torch.float64).float()
    torch.testing.assert_close(hadamard_transform(x), x @ _sylvester(d) * d**-0.5, rtol=1e-5, atol=1e-5)
    assert hadamard_transform(x.bfloat16()).dtype == torch.bfloat16


def test_hadamard_rejects_non_power_of_two() -> None:
    with pytest.raises(ValueError):
        hadamard_transform(torch.randn(4, 96))
