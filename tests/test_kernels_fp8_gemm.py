"""Block-scaled FP8 GEMM kernel against dsv4.ops.fp8_gemm.fp8_linear on fresh random inputs each run (Triton
interpreter on CPU): both forms (activations quantized in the GEMM, split-K or not; pre-quantized tiles), edge
tiles in M, N and K, e8m0 and float weight scales, fp32 and bf16 activations; the split-K partials summed by the
last program of each tile (``fuse_sum``) bit for bit as by the second launch, twice in a row (counters reset)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dsv4.ops import fp8_gemm as ref  # noqa: E402
from dsv4.ops import fp8_gemm_triton as tri  # noqa: E402
from dsv4.ops.quant import e8m0_to_float, quantize_fp8_block  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_weight(n: int, k: int, pow2: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A random FP8 weight [n, k] with fp32 block scales that differ from block to block by up to 2^+-6."""
    w = torch.randn(n, k) * k**-0.5
    w = w * torch.exp2(torch.randint(-6, 7, (-(-n // 128), -(-k // 128))).float()).repeat_interleave(
        128, 0).repeat_interleave(128, 1)[:n, :k]
    q, s = quantize_fp8_block(w, scale_fmt="ue8m0" if pow2 else None)
    return q.to(DEV), e8m0_to_float(s).to(DEV)


def make_input(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows whose 128-column groups span a wide dynamic range (every group gets its own scale), one all-zero row."""
    g = -(-k // 128)
    x = torch.randn(m, g, 128) * torch.exp2(torch.randint(-12, 12, (m, g, 1)).float())
    x = x.view(m, g * 128)[:, :k].contiguous()
    if m > 2:
        x[1] = 0
    return x.to(dtype).to(DEV)


def rel_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst per-row max error relative to the row's max (NaN fails)."""
    a, b = a.float().flatten(0, -2), b.float().flatten(0, -2)
    if torch.isnan(a).any():
        return float("inf")
    return ((a - b).abs().amax(-1) / b.abs().amax(-1).clamp_min(1e-30)).max().item()


@pytest.mark.parametrize(
    "m,n,k,config",
    [
        (1, 96, 256, None),  # decode: in-GEMM quant, split-K (2 column tiles)
        (5, 200, 384, None),  # partial column tile
        (33, 64, 256, None),  # BLOCK_M 64
        (3, 64, 384, {"splits": 3}),  # one K block per split
        (4, 130, 160, None),  # K not a multiple of 128: short last group
        (70, 130, 256, None),  # prefill: act_quant first, 128x128 tiles, partial edges
        (70, 130, 256, {"quant_x": True}),  # prefill shape through the in-GEMM quant
        (150, 40, 160, None),  # prefill shape with a short K group (in-GEMM quant)
        (20, 300, 256, {"block_m": 16, "block_n": 32, "splits": 2}),
    ],
)
def test_fp8_linear_fp32(m, n, k, config):
    x = make_input(m, k, torch.float32)
    w, s = make_weight(n, k)
    got = tri.fp8_linear(x, w, s, config)
    want = ref.fp8_linear(x, w, s)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_rows(got, want) <= 1e-5


def test_fp8_linear_float_scales_and_batch_dims():
    # checkpoints written with scale_fmt None carry amax/448 scales: any positive fp32 works
    x = make_input(6, 256, torch.float32).view(2, 3, 256)
    w, s = make_weight(72, 256, pow2=False)
    got = tri.fp8_linear(x, w, s)
    assert got.shape == (2, 3, 72)
    assert rel_rows(got, ref.fp8_linear(x, w, s)) <= 1e-5


@pytest.mark.parametrize("m", [2, 80])
def test_fp8_linear_bf16(m):
    x = make_input(m, 256, torch.bfloat16)
    w, s = make_weight(48, 256)
    got = tri.fp8_linear(x, w, s)
    want = ref.fp8_linear(x, w, s)
    assert got.dtype == torch.bfloat16
    # one fp32 sum in another order, rounded once to bf16: at most one bf16 step apart
    assert rel_rows(got, want) <= 2**-7


def test_fp8_linear_quantizes_like_act_quant():
    # one-hot weight columns pick single activations: y equals act_quant's rounding of x, bit for bit
    k = 256
    eye = torch.eye(k)[:64]
    w, s = quantize_fp8_block(eye)
    w, s = w.to(DEV), e8m0_to_float(s).to(DEV)
    x = make_input(3, k, torch.float32)
    for config in (None, {"quant_x": False, "block_m": 16, "block_n": 32}):
        assert torch.equal(tri.fp8_linear(x, w, s, config), ref.fp8_linear(x, w, s))


def test_fp8_linear_empty_and_errors():
    w, s = make_weight(32, 128)
    assert tri.fp8_linear(torch.empty(0, 128, device=DEV), w, s).shape == (0, 32)
    with pytest.raises(ValueError, match="features"):
        tri.fp8_linear(torch.randn(2, 64, device=DEV), w, s)


@pytest.mark.parametrize(
    "t,g,r,k,dtype,config",
    [
        (1, 4, 96, 256, torch.float32, None),  # decode: split-K, R not a multiple of 128 (scale rows cross groups)
        (3, 2, 128, 384, torch.float32, {"splits": 3}),
        (5, 2, 64, 160, torch.float32, None),  # K not a multiple of 128
        (70, 2, 130, 256, torch.float32, {"block_m": 64, "block_n": 128}),  # prefill tiles, partial edges
        (70, 2, 130, 256, torch.float32, None),  # past GROUPED_KERNEL_MAX_T: dequantize once, then the einsum
        (2, 4, 64, 256, torch.bfloat16, None),
        (20, 2, 96, 256, torch.bfloat16, {"block_m": 16, "block_n": 32, "splits": 2}),
    ],
)
def test_fp8_grouped_linear(t, g, r, k, dtype, config):
    """The weight-only grouped projection (wo_a) against the dequantize-then-einsum reference."""
    w, s = make_weight(g * r, k)
    x = (torch.randn(t, g, k) * k**-0.5).to(dtype).to(DEV)
    want = ref.fp8_grouped_linear(x, w, s)
    got = tri.fp8_grouped_linear(x, w, s, config)
    assert got.shape == (t, g, r) and got.dtype == dtype
    assert rel_rows(got, want) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_fp8_grouped_linear_rejects_bad_shapes():
    w, s = make_weight(96, 256)
    with pytest.raises(ValueError, match="groups"):
        tri.fp8_grouped_linear(torch.zeros(1, 5, 256, device=DEV), w, s)
    with pytest.raises(ValueError, match="groups"):
        ref.fp8_grouped_linear(torch.zeros(1, 4, 128, device=DEV), w, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_weight_bit_exact(dtype):
    from dsv4.ops.quant import dequantize_fp8_block

    w, s = make_weight(200, 300)
    assert torch.equal(tri.dequantize_weight(w, s, dtype), dequantize_fp8_block(w, s).to(dtype))


def _no_second_launch(monkeypatch) -> None:
    """Make the split-sum launch fail: the fused form must not use it."""
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("fuse_sum launched the split-sum kernel")

    monkeypatch.setattr(tri, "_split_sum_kernel", NoLaunch())


def _counters_zero() -> bool:
    return all(int(c.abs().sum()) == 0 for held in tri._COUNTERS.values() for c in held)


@pytest.mark.parametrize(
    "m,n,k,config",
    [
        (1, 96, 256, {"splits": 2}),  # decode, two column tiles
        (5, 200, 384, {"splits": 3}),  # partial column tile, one K block per split
        (3, 130, 160, {"splits": 2}),  # ragged N and K (short last group)
        (16, 72, 640, {"splits": 5, "block_n": 32}),
        (16, 72, 640, {"splits": 2}),  # uneven K blocks per split (3 + 2)
        (20, 300, 256, {"block_m": 16, "block_n": 32, "splits": 2}),  # two row tiles
        (2, 64, 512, {"splits": 4, "quant_x": False}),  # pre-quantized activations
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_fuse_sum_bitwise(m, n, k, config, dtype, monkeypatch):
    """The last-arriver sum (fuse_sum) gives the bits of the two-launch form, twice in a row (its counters are
    zero again after each call), and matches the reference."""
    x = make_input(m, k, dtype)
    w, s = make_weight(n, k)
    two = tri.fp8_linear(x, w, s, config)
    _no_second_launch(monkeypatch)
    fused = [tri.fp8_linear(x, w, s, dict(config, fuse_sum=True)) for _ in range(2)]
    assert _counters_zero()
    assert torch.equal(fused[0], two) and torch.equal(fused[1], two)
    assert rel_rows(fused[0], ref.fp8_linear(x, w, s)) <= (1e-5 if dtype == torch.float32 else 2**-7)


def test_fp8_linear_fuse_sum_without_split():
    # one split: no partials, no counters; the flag changes nothing
    x = make_input(4, 256, torch.float32)
    w, s = make_weight(64, 256)
    assert torch.equal(tri.fp8_linear(x, w, s, {"splits": 1, "fuse_sum": True}), tri.fp8_linear(x, w, s, {"splits": 1}))


@pytest.mark.parametrize(
    "t,g,r,k,config",
    [
        (1, 4, 96, 256, {"splits": 2}),  # R not a multiple of 128
        (3, 2, 128, 384, {"splits": 3}),
        (5, 2, 64, 160, {"splits": 2}),  # ragged K
        (16, 3, 72, 640, {"splits": 5, "block_n": 32}),  # ragged R, three groups
        (20, 2, 96, 256, {"block_m": 16, "block_n": 32, "splits": 2}),  # two row tiles
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_grouped_linear_fuse_sum_bitwise(t, g, r, k, config, dtype, monkeypatch):
    w, s = make_weight(g * r, k)
    x = (torch.randn(t, g, k) * k**-0.5).to(dtype).to(DEV)
    two = tri.fp8_grouped_linear(x, w, s, config)
    _no_second_launch(monkeypatch)
    fused = [tri.fp8_grouped_linear(x, w, s, dict(config, fuse_sum=True)) for _ in range(2)]
    assert _counters_zero()
    assert torch.equal(fused[0], two) and torch.equal(fused[1], two)
    assert rel_rows(fused[0], ref.fp8_grouped_linear(x, w, s)) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_decode_table_overrides_the_generic_rule(monkeypatch):
    monkeypatch.setitem(tri.DECODE, (96, 256), dict(block_n=32, splits=2, fuse_sum=True))
    assert tri.default_config(1, 96, 256)["fuse_sum"] and tri.default_config(16, 96, 256)["block_n"] == 32
    assert not tri.default_config(17, 96, 256)["fuse_sum"]  # past DECODE_M: the generic rule
    assert not tri.default_config(1, 128, 256)["fuse_sum"]
    x = make_input(1, 256, torch.float32)
    w, s = make_weight(96, 256)
    _no_second_launch(monkeypatch)
    assert rel_rows(tri.fp8_linear(x, w, s), ref.fp8_linear(x, w, s)) <= 1e-5
