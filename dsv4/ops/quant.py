"""Plain-PyTorch references for DeepSeek-V4's block quantisation formats (DSV4_SPEC 3.3, 3.4, 3.7, 7.3, 7.4).

Everything here runs on CPU and GPU and is meant to be the bit-exact oracle for fused kernels:

* FP8 e4m3 with power-of-two ("ue8m0") block scales: weights in 128x128 blocks, activations in 1xblock
  groups along the last dim;
* FP4 e2m1 with ue8m0 scales per 32 consecutive inputs, two codes per byte (low nibble = even column);
* the normalised Sylvester Walsh-Hadamard transform used by the indexer.

Scales follow the official kernel bit for bit: ``s = 2^ceil(log2(amax * fp32(1/max)))`` where the
ceil-log2 is read off the fp32 bit pattern (exponent - 127 + (mantissa != 0)) and 2^e is built from bits,
so no transcendental rounding can creep in.
"""

from __future__ import annotations

import struct

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
# e2m1 magnitudes indexed by the low three bits of a code; bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E8M0 = torch.float8_e8m0fnu


# ---- ue8m0 scales -------------------------------------------------------------------------------------
def _ceil_log2_bits(x: torch.Tensor) -> torch.Tensor:
    """ceil(log2(x)) for positive fp32 ``x`` via the official bit rule; int32, same shape."""
    bits = x.float().contiguous().view(torch.int32)
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    return exp - 127 + (mant != 0).to(torch.int32)


def _pow2_bits(e: torch.Tensor) -> torch.Tensor:
    """2^e as fp32 built from bits; ``e`` int32 in [-126, 127]."""
    return ((e + 127) << 23).to(torch.int32).view(torch.float32)


def _fp32_reciprocal(q: float) -> float:
    """1/q rounded to fp32, as a Python float: a scalar operand is cast to the tensor's fp32 exactly, and no
    device tensor is built per call (a host-to-device copy would break CUDA-graph capture)."""
    return struct.unpack("f", struct.pack("f", 1.0 / q))[0]


def _pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Power-of-two scale 2^ceil(log2(amax * fp32(1/qmax))); fp32, same shape as ``amax``."""
    # The kernel multiplies by an fp32 reciprocal (not a division): keep that exact rounding.
    return _pow2_bits(_ceil_log2_bits(amax.float() * _fp32_reciprocal(qmax)))


def e8m0_to_float(t: torch.Tensor) -> torch.Tensor:
    """Decode ue8m0 scales (float8_e8m0fnu or raw uint8 bytes) to fp32: byte b -> 2^(b-127), 255 -> NaN.

    Other float dtypes are taken to hold the scale values already and are just upcast to fp32.
    """
    if t.dtype == _E8M0:
        t = t.view(torch.uint8)
    elif t.dtype != torch.uint8:
        if not t.is_floating_point():
            raise TypeError(f"e8m0_to_float: expected float8_e8m0fnu, uint8 or a float tensor, got {t.dtype}")
        return t.float()
    b = t.to(torch.int32)
    bits = b << 23
    # b == 0 is 2^-127, a subnormal fp32: mantissa bit 22 alone.
    bits = torch.where(b == 0, torch.full_like(bits, 1 << 22), bits)
    bits = torch.where(b == 255, torch.full_like(bits, 0x7FC00000), bits)
    return bits.view(torch.float32)


def float_to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Encode exact powers of two in [2^-127, 2^127] as float8_e8m0fnu (same shape).

    Raises ValueError for anything that is not such a power of two (this is a lossless encoder; round
    first with the quantisers below).
    """
    bits = scale.float().contiguous().view(torch.int32)
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    normal = (bits > 0) & (mant == 0) & (exp >= 1) & (exp <= 254)
    tiny = bits == (1 << 22)  # 2^-127, the only subnormal e8m0 can express
    if not bool((normal | tiny).all()):
        raise ValueError("float_to_e8m0: every scale must be a positive power of two in [2^-127, 2^127]")
    return torch.where(tiny, torch.zeros_like(exp), exp).to(torch.uint8).view(_E8M0)


# ---- FP8 e4m3 -----------------------------------------------------------------------------------------
def _scale_for(amax: torch.Tensor, qmax: float, scale_fmt: str | None) -> torch.Tensor:
    if scale_fmt == "ue8m0":
        return _pow2_scale(amax, qmax)
    if scale_fmt is None:
        return amax.float() * _fp32_reciprocal(qmax)
    raise ValueError(f"scale_fmt must be 'ue8m0' or None, got {scale_fmt!r}")


def _store_scale(s: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:
    return float_to_e8m0(s) if scale_fmt == "ue8m0" else s


def _to_e4m3(y: torch.Tensor) -> torch.Tensor:
    # The explicit clamp makes torch's RNE cast agree with the GPU's saturating cvt.rn.satfinite.
    return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_fp8_block(
    w: torch.Tensor, block: tuple[int, int] = (128, 128), scale_fmt: str | None = "ue8m0",
    amax_floor: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantise a weight ``w [N, K]`` (any float dtype) to FP8 e4m3 with one scale per block.

    Returns ``(q [N, K] float8_e4m3fn, scale [ceil(N/bn), ceil(K/bk)])``; the scale is float8_e8m0fnu
    for ``scale_fmt="ue8m0"`` and fp32 amax/448 otherwise. Partial edge blocks use the amax of their
    real elements. ``amax_floor`` (the activation kernel's 1e-4) keeps all-zero blocks finite.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_fp8_block expects a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    bn, bk = block
    nb, kb = -(-n // bn), -(-k // bk)
    x = w.float()
    # Zero padding cannot raise a block's amax, so edge blocks are exact.
    xp = torch.nn.functional.pad(x, (0, kb * bk - k, 0, nb * bn - n))
    amax = xp.view(nb, bn, kb, bk).abs().amax(dim=(1, 3)).clamp_min(amax_floor)
    s = _scale_for(amax, FP8_MAX, scale_fmt)
    s_full = s.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    return _to_e4m3(x / s_full), _store_scale(s, scale_fmt)


def dequantize_fp8_block(w_fp8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_block`: ``fp32(q[r, c]) * scale[r // bn, c // bk]`` as fp32 ``[N, K]``.

    ``scale`` may be float8_e8m0fnu, raw uint8 e8m0 bytes, or any float dtype holding the values.
    """
    n, k = w_fp8.shape
    bn, bk = block
    s = e8m0_to_float(scale)
    if s.shape != (-(-n // bn), -(-k // bk)):
        raise ValueError(f"scale shape {tuple(s.shape)} does not match weight {n}x{k} in {bn}x{bk} blocks")
    s_full = s.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    return w_fp8.float() * s_full


def act_quant(x: torch.Tensor, block: int = 128, scale_fmt: str | None = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic FP8 activation quantisation in groups of ``block`` along the last dim (spec 3.3).

    ``x [..., K]`` (K % block == 0, any float dtype) -> ``(q [..., K] float8_e4m3fn, s [..., K/block])``
    with ``s`` float8_e8m0fnu for ue8m0 and fp32 otherwise. amax is floored at 1e-4.
    """
    q, s = _act_quant_fp32(x, block, scale_fmt)
    return q, _store_scale(s, scale_fmt)


def act_quant_sim(x: torch.Tensor, block: int = 128, scale_fmt: str | None = "ue8m0") -> torch.Tensor:
    """The kernel's in-place "QAT simulation": ``(fp32(q) * s).to(x.dtype)``, same shape as ``x``.

    A last dim that is not a multiple of ``block`` (only tiny test models) gets a short last group, as if
    zero-padded.
    """
    k = x.shape[-1]
    pad = -k % block
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    q, s = _act_quant_fp32(xp, block, scale_fmt)
    y = q.float().view(*xp.shape[:-1], (k + pad) // block, block) * s.unsqueeze(-1)
    return y.view(xp.shape)[..., :k].to(x.dtype)


def act_dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`act_quant`: ``q [..., K]`` e4m3 and ``s [..., K/block]`` (float8_e8m0fnu, or fp32 for
    float scales) -> ``fp32(q) * s`` per group, returned in ``dtype``."""
    k, g = q.shape[-1], s.shape[-1]
    if g == 0 or k % g or s.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"scale shape {tuple(s.shape)} does not fit activations {tuple(q.shape)}")
    sf = e8m0_to_float(s).repeat_interleave(k // g, dim=-1)
    return (q.float() * sf).to(dtype)


def _act_quant_fp32(x: torch.Tensor, block: int, scale_fmt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"last dim {k} is not a multiple of the quantisation block {block}")
    g = x.float().reshape(*x.shape[:-1], k // block, block)
    amax = g.abs().amax(dim=-1).clamp_min(1e-4)
    s = _scale_for(amax, FP8_MAX, scale_fmt)
    q = _to_e4m3(g / s.unsqueeze(-1)).view(x.shape)
    return q, s


# ---- FP4 e2m1 -----------------------------------------------------------------------------------------
def _e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``y`` (already clamped to [-6, 6]) to e2m1 codes (uint8 0..15), ties to even code."""
    mag = y.abs()
    code = torch.zeros(y.shape, dtype=torch.uint8, device=y.device)
    for k in range(7):
        mid = (E2M1_VALUES[k] + E2M1_VALUES[k + 1]) / 2  # exact in fp32
        # Codes are monotone in magnitude, so counting thresholds passed gives the code; at an exact
        # midpoint we move up only when the upper code is even (its mantissa bit is 0).
        up = (mag > mid) | ((mag == mid) & ((k + 1) % 2 == 0))
        code += up.to(torch.uint8)
    # Negative inputs keep their sign even when they round to zero (code 8 = -0), like the hardware cast.
    return code | (torch.signbit(y).to(torch.uint8) << 3)


_E2M1_LUT: dict[torch.device, torch.Tensor] = {}


def _e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    # one table per device, built on first use (eagerly, before any CUDA-graph capture reads it)
    lut = _E2M1_LUT.get(code.device)
    if lut is None:
        lut = _E2M1_LUT[code.device] = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES),
                                                     dtype=torch.float32, device=code.device)
    return lut[code.long()]


def _fp4_groups(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 groups ``[..., K/block, block]`` of rounded e2m1 codes plus their fp32 scales ``[..., K/block]``."""
    k = x.shape[-1]
    if k % block or block % 2:
        raise ValueError(f"last dim {k} must be a multiple of the FP4 block {block} (and the block even)")
    g = x.float().reshape(*x.shape[:-1], k // block, block)
    amax = g.abs().amax(dim=-1).clamp_min(FP4_MAX * 2.0**-126)
    s = _pow2_scale(amax, FP4_MAX)
    codes = _e2m1_codes((g / s.unsqueeze(-1)).clamp(-FP4_MAX, FP4_MAX))
    return codes, s


def quantize_fp4_block(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``w [..., N, K]`` to packed FP4 e2m1 with ue8m0 scales per ``block`` inputs (spec 7.4).

    Returns ``(packed [..., N, K/2] int8, scale [..., N, K/block] float8_e8m0fnu)``; byte j of a row holds
    column 2j in its low nibble and column 2j+1 in its high nibble. Scale = 2^ceil(log2(amax/6)).
    """
    codes, s = _fp4_groups(w, block)
    codes = codes.reshape(w.shape)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.view(torch.int8), float_to_e8m0(s)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Decode packed e2m1 bytes ``[..., K/2]`` (int8 or uint8) to fp32 code values ``[..., K]`` (unscaled)."""
    u = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed
    codes = torch.stack((u & 0xF, u >> 4), dim=-1).flatten(-2)
    return _e2m1_decode(codes)


def dequantize_fp4_block(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_fp4_block`: packed ``[..., N, K/2]`` and scale ``[..., N, K/b]`` -> fp32 ``[..., N, K]``.

    The block b is inferred as K / scale.shape[-1].
    """
    v = unpack_fp4(packed)
    k = v.shape[-1]
    s = e8m0_to_float(scale)
    if s.shape[:-1] != v.shape[:-1] or s.shape[-1] == 0 or k % s.shape[-1]:
        raise ValueError(f"FP4 scale shape {tuple(s.shape)} does not fit packed weight {tuple(packed.shape)}")
    return v * s.repeat_interleave(k // s.shape[-1], dim=-1)


def fp4_act_quant_sim(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """FP4 "QAT simulation" (spec 3.4): ``(e2m1(x/s) * s).to(x.dtype)`` per ``block`` along the last dim."""
    codes, s = _fp4_groups(x, block)
    return (_e2m1_decode(codes) * s.unsqueeze(-1)).view(x.shape).to(x.dtype)


# ---- Hadamard -----------------------------------------------------------------------------------------
def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Normalised Sylvester Walsh-Hadamard transform over the last dim d (a power of two): ``x @ H_d / sqrt(d)``.

    Computed in fp32 with the O(d log d) butterfly, returned in ``x.dtype``. H is symmetric, so this is
    also ``H_d @ x`` per vector, and applying it twice gives ``x`` back (up to rounding).
    """
    d = x.shape[-1]
    if d <= 0 or d & (d - 1):
        raise ValueError(f"hadamard_transform needs a power-of-two last dim, got {d}")
    y = x.float().reshape(-1, d)
    h = 1
    while h < d:
        # Sylvester order: H_2n = [[H, H], [H, -H]], i.e. pair element i with i + h inside each 2h chunk.
        y = y.view(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(x.shape) * d**-0.5).to(x.dtype)
