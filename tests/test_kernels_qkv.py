"""q / kv preparation kernels against dsv4.ops.qkv on fresh random inputs each run."""

from __future__ import annotations

import pytest
import torch
from harness import rel_err

pytest.importorskip("triton")

from dsv4.ops import qkv as ref  # noqa: E402
from dsv4.ops import qkv_triton as tri  # noqa: E402
from dsv4.ops.kv_fp8 import Fp8KV, alloc_fp8_kv, gather_rows, scatter_rows  # noqa: E402
from dsv4.ops.quant import act_quant_sim  # noqa: E402
from dsv4.ops.rope import rope_cos_sin, rope_inv_freq  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rope(t: int, rd: int) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.randint(0, 5000, (t,), device=DEV)
    return rope_cos_sin(pos, rope_inv_freq(rd, 10000.0, None).to(DEV))


@pytest.mark.parametrize("h,hd,rd", [(4, 32, 8), (6, 72, 8), (3, 512, 64)])
def test_q_norm_rope_fp32(h, hd, rd):
    t = 5
    q = torch.randn(t, h, hd, device=DEV) * 3
    cos, sin = _rope(t, rd)
    want = ref.q_norm_rope(q, 1e-6, cos, sin)
    got = tri.q_norm_rope(q, 1e-6, cos, sin)
    assert rel_err(got.flatten(1), want.flatten(1)).max() <= 1e-5


def test_q_norm_rope_bf16():
    t, h, hd, rd = 4, 4, 64, 16
    q = (torch.randn(t, h, hd, device=DEV) * 2).to(torch.bfloat16)
    cos, sin = _rope(t, rd)
    want = ref.q_norm_rope(q, 1e-6, cos, sin).float()
    got = tri.q_norm_rope(q, 1e-6, cos, sin).float()
    # The kernel rounds where torch does on CUDA (square, mean, +eps, rsqrt, product); torch's CPU bf16
    # rsqrt rounds twice (sqrt, then 1/x), so a head's norm factor can differ by one bf16 step here (on the
    # GPU all but < 0.01% of the elements agreed bit for bit: tests/gpu). Norm-wise well inside bf16's 1e-2.
    assert (got - want).norm() / want.norm() <= 1e-2


def _ring_case(t: int, hd: int, dtype: torch.dtype):
    slots, r = 3, 8
    ring = torch.randn(slots, r, hd, device=DEV).to(dtype)
    rows = torch.randperm(slots * r, device=DEV)[:t]
    dest = torch.where(torch.rand(t, device=DEV) < 0.7, rows, -1)
    return ring, dest


@pytest.mark.parametrize("hd,rd", [(32, 8), (72, 8), (512, 64)])
def test_kv_norm_rope_store_fp32(hd, rd):
    t = 6
    kv = torch.randn(t, hd, device=DEV) * 5
    w = 1 + 0.1 * torch.randn(hd, device=DEV)
    cos, sin = _rope(t, rd)
    ring, dest = _ring_case(t, hd, torch.float32)
    ring_ref = ring.clone()
    want = ref.kv_norm_rope_store(kv, w, 1e-6, cos, sin, False, ring_ref, dest)
    got_plain = tri.kv_norm_rope_store(kv, w, 1e-6, cos, sin, False, ring, dest)
    assert rel_err(got_plain, want).max() <= 1e-5
    keep = dest >= 0
    flat = ring.view(-1, hd)
    assert torch.equal(flat[dest[keep]], got_plain[keep])
    untouched = torch.ones(flat.shape[0], dtype=torch.bool, device=DEV)
    untouched[dest[keep]] = False
    assert torch.equal(flat[untouched], ring_ref.view(-1, hd)[untouched])
    # the FP8 simulation of the nope dims is exactly the reference's, applied to the kernel's own values
    got = tri.kv_norm_rope_store(kv, w, 1e-6, cos, sin, True, ring, dest)
    nope = hd - rd
    want_q = torch.cat((act_quant_sim(got_plain[:, :nope], 64), got_plain[:, nope:]), dim=-1)
    assert torch.equal(got, want_q)
    assert torch.equal(flat[dest[keep]], got[keep])


def test_kv_norm_rope_store_bf16_ring():
    t, hd, rd = 5, 128, 32
    kv = (torch.randn(t, hd, device=DEV) * 5).to(torch.bfloat16)
    w = 1 + 0.1 * torch.randn(hd, device=DEV)
    cos, sin = _rope(t, rd)
    ring, dest = _ring_case(t, hd, torch.bfloat16)
    ring_ref = ring.clone()
    want = ref.kv_norm_rope_store(kv, w, 1e-6, cos, sin, True, ring_ref, dest).float()
    got = tri.kv_norm_rope_store(kv, w, 1e-6, cos, sin, True, ring, dest).float()
    # one bf16 step where the fp32 sums round differently, and then possibly one FP8 step in the nope dims
    assert rel_err(got, want).max() <= 0.07
    assert (got != want).float().mean() < 0.02
    keep = dest >= 0
    assert torch.equal(ring.view(-1, hd)[dest[keep]].float(), got[keep])


def test_store_ring():
    t, hd = 7, 48
    kv = torch.randn(t, hd, device=DEV)
    ring, dest = _ring_case(t, hd, torch.float32)
    ring_ref = ring.clone()
    ref.store_ring(kv, ring_ref, dest)
    tri.store_ring(kv, ring, dest)
    assert torch.equal(ring, ring_ref)


def _fp8_ring(slots: int, r: int, hd: int, rd: int, dtype: torch.dtype) -> Fp8KV:
    ring = alloc_fp8_kv((slots, r), hd, rd, dtype, DEV)
    scatter_rows(ring, torch.arange(slots * r, device=DEV), torch.randn(slots * r, hd, device=DEV).to(dtype))
    return ring


@pytest.mark.parametrize("hd,rd", [(72, 8), (32, 8)])
def test_kv_norm_rope_store_fp8_ring(hd, rd):
    """An FP8 ring: the kernel returns the FP8-simulated rows (as with nope_quant) and stores them exactly (they
    dequantise bit for bit to the returned rows, as the reference's store of the same rows); others untouched."""
    t = 6
    kv = torch.randn(t, hd, device=DEV) * 5
    w = 1 + 0.1 * torch.randn(hd, device=DEV)
    cos, sin = _rope(t, rd)
    plain, dest = _ring_case(t, hd, torch.float32)
    ring = _fp8_ring(plain.shape[0], plain.shape[1], hd, rd, torch.float32)
    before = [x.clone() for x in ring]
    want_out = tri.kv_norm_rope_store(kv, w, 1e-6, cos, sin, True, plain, dest)
    got = tri.kv_norm_rope_store(kv, w, 1e-6, cos, sin, False, ring, dest)
    assert torch.equal(got, want_out)
    # the reference re-quantises the rounded rows: a block whose largest code rounded down to 224 then gets half
    # the scale and twice the codes, so compare what the stores hold, not their bytes
    want_ring = Fp8KV(*before)
    ref.store_ring(got, want_ring, dest)
    every = torch.arange(ring.nope.shape[0] * ring.nope.shape[1], device=DEV)
    assert torch.equal(gather_rows(ring, every), gather_rows(want_ring, every))
    keep = dest >= 0
    assert torch.equal(gather_rows(ring, dest[keep]), got[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_ring_fp8(dtype):
    t, hd, rd = 7, 136, 8
    kv = (torch.randn(t, hd, device=DEV) * torch.exp2(torch.randint(-12, 12, (t, 1), device=DEV).float())).to(dtype)
    _, dest = _ring_case(t, hd, torch.float32)
    ring = _fp8_ring(3, 8, hd, rd, dtype)
    ring_ref = Fp8KV(*(x.clone() for x in ring))
    ref.store_ring(kv, ring_ref, dest)
    tri.store_ring(kv, ring, dest)
    assert torch.equal(ring.nope.view(torch.uint8), ring_ref.nope.view(torch.uint8))
    assert torch.equal(ring.scale, ring_ref.scale) and torch.equal(ring.rope, ring_ref.rope)


@pytest.mark.parametrize("quant,fp8", [(False, False), (True, False), (True, True)])
def test_kv_norm_rope_store_fp32_input_rounds_as_it_loads(quant, fp8):
    """The wkv part of the fused projection's fp32 accumulation read in place (strided rows) with
    ``dtype=bf16``: output and stored rows bit for bit those of the kernel on the pre-rounded bf16 input."""
    t, hd, rd = 5, 72, 8
    fused = torch.randn(t, hd + 24, device=DEV) * 5
    kv = fused[:, 16: 16 + hd]
    w = 1 + 0.1 * torch.randn(hd, device=DEV)
    cos, sin = _rope(t, rd)
    plain, dest = _ring_case(t, hd, torch.bfloat16)
    base = _fp8_ring(3, 8, hd, rd, torch.bfloat16) if fp8 else plain

    def run(impl, x: torch.Tensor, **kw) -> tuple[torch.Tensor, list[torch.Tensor]]:
        ring = Fp8KV(*(r.clone() for r in base)) if fp8 else base.clone()
        out = impl.kv_norm_rope_store(x, w, 1e-6, cos, sin, quant, ring, dest, **kw)
        return out, list(ring) if fp8 else [ring]

    for impl in (tri, ref) if not fp8 else (tri,):
        (got, got_ring), (want, want_ring) = run(impl, kv, dtype=torch.bfloat16), run(impl, kv.to(torch.bfloat16))
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), impl.__name__
        assert all(torch.equal(a, b) for a, b in zip(got_ring, want_ring, strict=True)), impl.__name__
