"""Triton block-scaled FP8 GEMM (reference: :func:`dsv4.ops.fp8_gemm.fp8_linear`).

``y[m, n] = sum_kb (qa[m, kb] . qw[n, kb])_fp32 * sa[m, kb] * sw[n // 128, kb]``: e4m3 x e4m3 ``tl.dot`` per
128-wide K block with fp32 accumulation, both scales applied per block, one rounding to the output dtype at the
end. The activations are quantised exactly as :func:`dsv4.ops.quant.act_quant` does (per token per 128 columns,
power-of-two scales built from the fp32 bits, shared with :mod:`dsv4.ops.quant_triton`).

Two forms, chosen from the shapes alone (no host sync: decode runs inside CUDA graphs):

* few rows (decode, M <= ``SMALL_M``): the activations are quantised inside the GEMM (each program quantises
  the few rows of its K range; a separate launch would cost more than the work), tiles of ``BLOCK_N`` output
  columns, and split-K when the column tiles alone cannot fill the GPU. The weight is read once; each split
  writes an fp32 partial and a small kernel sums them in a fixed order (deterministic, no atomics).
* many rows (prefill): :func:`dsv4.ops.quant_triton.act_quant` quantises the input once, then 128x128 output
  tiles walk K in 128-wide steps (wgmma-sized fp8 dots), grouped along M so that the programs running together
  share weight tiles in L2.

The grouped output projection ``wo_a`` (:func:`fp8_grouped_linear`) is weight-only: its activations stay in their
dtype (the official einsum runs on a bf16 dequantized copy), each e4m3 tile is dequantized in registers as the
loader would and multiplied on the tensor cores in that dtype, one group per ``program_id(1)``; split-K and the
fixed-order partial sum as above. Prefill-sized inputs dequantize the weight once and run the einsum instead.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dsv4.ops.quant_triton import act_quant, pow2_scale

BLOCK_K = 128  # = the activation group and the weight scale block: one scale pair per dot
_BK = tl.constexpr(BLOCK_K)  # what the kernels see: a jitted function may read only constexpr globals
SMALL_M = 64


@triton.jit
def _fp8_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K, KB, KB_PER_SPLIT,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                     QUANT_X: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr):
    """x [M, K]: QUANT_X: the raw activations (any float dtype), else e4m3 codes with xs [M, KB] e8m0 bytes.
    w [N, K] e4m3, ws [ceil(N/128), KB] fp32. y: [M, N] in its dtype, or (SPLIT) fp32 partials [splits, M, N]
    of K blocks ``pid_s * KB_PER_SPLIT ..`` ."""
    pid, pid_s = tl.program_id(0), tl.program_id(1)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # GROUP_M row tiles advance together across the column tiles: a weight tile is fetched once per group
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < M, cols < N
    x_row = x_ptr + rows.to(tl.int64)[:, None] * K
    w_col = w_ptr + cols.to(tl.int64)[None, :] * K
    ws_col = ws_ptr + (cols // _BK) * KB
    kk = tl.arange(0, _BK)

    kb0 = pid_s * KB_PER_SPLIT
    kb1 = tl.minimum(kb0 + KB_PER_SPLIT, KB)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(kb0, kb1):
        ks = kb * _BK + kk
        if EVEN_K:
            amask, bmask = rmask[:, None], cmask[None, :]
        else:
            amask, bmask = rmask[:, None] & (ks < K)[None, :], cmask[None, :] & (ks < K)[:, None]
        if QUANT_X:
            xv = tl.load(x_row + ks[None, :], mask=amask, other=0.0).to(tl.float32)
            # zero padding (rows past M, columns past K) cannot raise a group's amax: the codes match act_quant
            sa, inv, _ = pow2_scale(tl.maximum(tl.max(tl.abs(xv), axis=1), 1e-4))
            a = tl.minimum(tl.maximum(xv * inv[:, None], -448.0), 448.0).to(tl.float8e4nv)
        else:
            a = tl.load(x_row + ks[None, :], mask=amask, other=0.0)
            # act_quant's amax floor keeps every byte >= 1, so byte << 23 is the fp32 power of two
            sbyte = tl.load(xs_ptr + rows * KB + kb, mask=rmask, other=127).to(tl.int32)
            sa = (sbyte << 23).to(tl.float32, bitcast=True)
        b = tl.load(w_col + ks[:, None], mask=bmask, other=0.0)
        sw = tl.load(ws_col + kb, mask=cmask, other=0.0)
        acc += tl.dot(a, b) * (sa[:, None] * sw[None, :])

    out = rows.to(tl.int64)[:, None] * N + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    if SPLIT:
        tl.store(y_ptr + pid_s.to(tl.int64) * M * N + out, acc, mask=omask)
    else:
        tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _split_sum_kernel(p_ptr, y_ptr, MN, SPLITS, BLOCK: tl.constexpr):
    """y[i] = sum over s (in order) of p[s, i]; p [SPLITS, MN] fp32, y [MN] in its dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: small grids that still split


# The configurations benchmarks/bench_fp8_gemm.py sweeps (split-K is chosen from the shape either way). Each
# K step holds the running accumulator and the fresh block product (scaled before it is added): two fp32
# BLOCK_M x BLOCK_N tiles in registers, so 128x128 tiles take 8 warps.
CANDIDATES = (
    dict(block_m=16, block_n=32, num_warps=4, num_stages=4),
    dict(block_m=16, block_n=64, num_warps=4, num_stages=4),
    dict(block_m=16, block_n=128, num_warps=4, num_stages=3),
    dict(block_m=32, block_n=64, num_warps=4, num_stages=4),
    dict(block_m=64, block_n=64, num_warps=4, num_stages=4),
    dict(block_m=64, block_n=128, num_warps=4, num_stages=3),
    dict(block_m=128, block_n=64, num_warps=4, num_stages=4),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=3),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=4),
)


def config_name(cfg: dict) -> str:
    return f"m{cfg['block_m']}n{cfg['block_n']}w{cfg['num_warps']}s{cfg['num_stages']}" + \
        ("q" if cfg.get("quant_x") else "")


def default_config(m: int, n: int, k: int) -> dict:
    """Tile shape for an [m, k] x [n, k]^T product. ``quant_x``: quantise the activations inside the GEMM
    (few rows) rather than in one act_quant launch first (which also needs k % 128 == 0)."""
    if m <= SMALL_M:
        return dict(block_m=max(16, triton.next_power_of_2(m)), block_n=64, num_warps=4, num_stages=4, quant_x=True)
    return dict(block_m=128, block_n=128, num_warps=8, num_stages=3, quant_x=k % BLOCK_K != 0)


def _splits(m: int, n: int, k: int, cfg: dict, device: torch.device) -> tuple[int, int]:
    """(splits, K blocks per split): enough programs for two per SM, while the fp32 partials (splits x m x n x 4
    bytes) stay below the weight's own bytes (n x k)."""
    kb = triton.cdiv(k, BLOCK_K)
    tiles = triton.cdiv(m, cfg["block_m"]) * triton.cdiv(n, cfg["block_n"])
    want = min(triton.cdiv(2 * _num_sms(device), tiles), kb, max(1, k // (4 * m)))
    if cfg.get("splits"):
        want = min(cfg["splits"], kb)
    per = triton.cdiv(kb, max(1, want))
    return triton.cdiv(kb, per), per


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.fp8_gemm.fp8_linear` (same arguments; ``config`` overrides
    :func:`default_config`, for benchmarks and tests; ``splits`` forces a split-K count).

    x: [..., K] float; weight: [N, K] float8_e4m3fn; scale: [ceil(N/128), ceil(K/128)] fp32. -> [..., N] x.dtype.
    """
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"fp8_linear: input has {x.shape[-1]} features, the weight {k}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*x.shape[:-1], n)
    cfg = default_config(m, n, k) | (config or {})
    quant_x = cfg["quant_x"] or k % BLOCK_K != 0
    kb = triton.cdiv(k, BLOCK_K)
    if quant_x:
        a, sa = x2.contiguous(), x2  # sa unused
    else:
        a, sa = act_quant(x2, BLOCK_K)
        sa = sa.view(torch.uint8)
    splits, per = _splits(m, n, k, cfg, x.device)
    out = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else y
    grid = (triton.cdiv(m, cfg["block_m"]) * triton.cdiv(n, cfg["block_n"]), splits)
    _fp8_gemm_kernel[grid](a, sa, weight, scale, out, m, n, k, kb, per, BLOCK_M=cfg["block_m"],
                           BLOCK_N=cfg["block_n"], GROUP_M=8, QUANT_X=quant_x, EVEN_K=k % BLOCK_K == 0,
                           SPLIT=splits > 1, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if splits > 1:
        _split_sum_kernel[(triton.cdiv(m * n, 1024),)](out, y, m * n, splits, BLOCK=1024)
    return y.view(*x.shape[:-1], n)


@triton.jit
def _fp8_grouped_kernel(x_ptr, w_ptr, ws_ptr, y_ptr, T, G, R, K, KB, KB_PER_SPLIT,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DT: tl.constexpr,
                        PREC: tl.constexpr):
    """Group ``program_id(1)`` of the weight-only FP8 grouped projection: x [T, G, K] (the activation dtype),
    w [G*R, K] e4m3 with ws [ceil(G*R/128), KB] fp32; y [T, G, R], or (SPLIT) fp32 partials [splits, T, G, R].
    Each weight tile is dequantized as the loader does (fp32 product, one rounding to DT) before the MMA."""
    pid, g, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_n = tl.cdiv(R, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < T, cols < R
    w_rows = g * R + cols  # this group's rows of the stacked weight
    x_row = x_ptr + rows.to(tl.int64)[:, None] * (G * K) + g * K
    w_col = w_ptr + w_rows.to(tl.int64)[None, :] * K
    ws_col = ws_ptr + (w_rows // _BK) * KB  # per column: R need not be a multiple of the 128-row block
    kk = tl.arange(0, _BK)
    kb0 = pid_s * KB_PER_SPLIT
    kb1 = tl.minimum(kb0 + KB_PER_SPLIT, KB)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(kb0, kb1):
        ks = kb * _BK + kk
        kmask = ks < K
        a = tl.load(x_row + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_col + ks[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
        sw = tl.load(ws_col + kb, mask=cmask, other=0.0)
        b = (b.to(tl.float32) * sw[None, :]).to(DT)
        acc = tl.dot(a.to(DT), b, acc, input_precision=PREC)
    out = rows.to(tl.int64)[:, None] * (G * R) + g * R + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    if SPLIT:
        tl.store(y_ptr + pid_s.to(tl.int64) * T * G * R + out, acc, mask=omask)
    else:
        tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _dequant_kernel(w_ptr, ws_ptr, y_ptr, N, K, KB, BN: tl.constexpr, BK: tl.constexpr):
    """y [N, K] = fp32(w) * ws[n // 128, k // 128], rounded once to y's dtype (the loader's dequantization)."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rn < N)[:, None] & (rk < K)[None, :]
    off = rn.to(tl.int64)[:, None] * K + rk[None, :]
    s = tl.load(ws_ptr + (rn // _BK)[:, None] * KB + (rk // _BK)[None, :], mask=mask, other=0.0)
    w = tl.load(w_ptr + off, mask=mask, other=0.0).to(tl.float32) * s
    tl.store(y_ptr + off, w.to(y_ptr.dtype.element_ty), mask=mask)


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# Above this many tokens the grouped projection dequantizes the weight once (~23 us at Flash's 32 MB) and runs
# the einsum: the per-tile dequantization costs more than that once the MMAs dominate (H200, 2026-12-04: the
# kernel 15.1 us against the einsum's 18.6 at 1-16 tokens, 30.5 / 20.9 at 64, 73.6 / 30.2 at 256, 1001 / 398 at
# 4096; docs/benchmarks.md session 8)
GROUPED_KERNEL_MAX_T = 64


def grouped_default_config(t: int) -> dict:
    """Tiles for the grouped projection of ``t`` tokens (at most :data:`GROUPED_KERNEL_MAX_T` by default):
    GEMV-shaped with split-K (the weight read once by ~2 programs per SM)."""
    if t <= SMALL_M:
        return dict(block_m=max(16, triton.next_power_of_2(t)), block_n=64, num_warps=4, num_stages=4)
    return dict(block_m=64, block_n=128, num_warps=8, num_stages=3)


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.quant.dequantize_fp8_block` followed by the cast to ``dtype`` (one rounding)."""
    n, k = weight.shape
    y = torch.empty(n, k, dtype=dtype, device=weight.device)
    _dequant_kernel[(triton.cdiv(n, 64), triton.cdiv(k, 128))](weight, scale, y, n, k, triton.cdiv(k, BLOCK_K),
                                                              BN=64, BK=128, num_warps=4)
    return y


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       config: dict | None = None) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.fp8_gemm.fp8_grouped_linear` (same arguments; ``config`` overrides
    :func:`grouped_default_config`; ``splits`` forces a split-K count). x [T, G, K] -> [T, G, R]."""
    t, g, k = x.shape
    if weight.shape[0] % g or weight.shape[1] != k:
        raise ValueError(f"fp8_grouped_linear: weight {tuple(weight.shape)} does not fit {g} groups of {k} inputs")
    r = weight.shape[0] // g
    y = torch.empty((t, g, r), dtype=x.dtype, device=x.device)
    if t == 0:
        return y
    if t > GROUPED_KERNEL_MAX_T and not config:
        return torch.einsum("tgi,gri->tgr", x, dequantize_weight(weight, scale, x.dtype).view(g, r, k))
    cfg = grouped_default_config(t) | (config or {})
    kb = triton.cdiv(k, BLOCK_K)
    # _splits sizes split-K for one [t, r] product per group: g times the tiles share the GPU
    splits, per = _splits(t, g * r, k, cfg, x.device)
    out = torch.empty((splits, t, g, r), dtype=torch.float32, device=x.device) if splits > 1 else y
    grid = (triton.cdiv(t, cfg["block_m"]) * triton.cdiv(r, cfg["block_n"]), g, splits)
    _fp8_grouped_kernel[grid](x.contiguous(), weight, scale, out, t, g, r, k, kb, per, BLOCK_M=cfg["block_m"],
                              BLOCK_N=cfg["block_n"], SPLIT=splits > 1, DT=_TL[x.dtype],
                              PREC="ieee" if x.dtype == torch.float32 else "tf32",
                              num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if splits > 1:
        _split_sum_kernel[(triton.cdiv(t * g * r, 1024),)](out, y, t * g * r, splits, BLOCK=1024)
    return y
