"""Triton block-scaled FP8 GEMM (reference: :func:`dsv4.ops.fp8_gemm.fp8_linear`).

``y[m, n] = sum_kb (qa[m, kb] . qw[n, kb])_fp32 * sa[m, kb] * sw[n // 128, kb]``: e4m3 x e4m3 ``tl.dot`` per
128-wide K block with fp32 accumulation, both scales applied per block, one rounding to the output dtype at the
end. The activations are quantised exactly as :func:`dsv4.ops.quant.act_quant` does (per token per 128 columns,
power-of-two scales built from the fp32 bits, shared with :mod:`dsv4.ops.quant_triton`).

Two forms, chosen from the shapes alone (no host sync: decode runs inside CUDA graphs):

* few rows (decode, M <= ``SMALL_M``): the activations are quantised inside the GEMM (each program quantises
  the few rows of its K range; a separate launch would cost more than the work), tiles of ``BLOCK_N`` output
  columns, and split-K when the column tiles alone cannot fill the GPU. The weight is read once; each split
  writes an fp32 partial, summed in split order (deterministic, no fp32 atomics) by a small second launch or,
  with ``fuse_sum``, by the last split program of each output tile to finish (:func:`_sum_tail`: no launch).
* many rows (prefill): :func:`dsv4.ops.quant_triton.act_quant` quantises the input once, then 128x128 output
  tiles walk K in 128-wide steps (wgmma-sized fp8 dots), grouped along M so that the programs running together
  share weight tiles in L2.

The grouped output projection ``wo_a`` (:func:`fp8_grouped_linear`) is weight-only: its activations stay in their
dtype (the official einsum runs on a bf16 dequantized copy), each e4m3 tile is dequantized in registers as the
loader would and multiplied on the tensor cores in that dtype, one group per ``program_id(1)``; split-K and the
fixed-order partial sum as above. Prefill-sized inputs dequantize the weight once and run the einsum instead.

Both forms of the sum run the same code (:func:`_sum_partials`: from zero, split 0, 1, .. added in fp32, one
rounding at the end), so they give the same bits.

NOTE: the ``fuse_sum`` tile counters (int32, zero between launches) are one buffer per device shared by every
call: launches on one stream only; two such GEMMs running at once on two streams would race.
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


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}  # per device, the newest last (captured graphs may hold
# the older ones: kept alive)


@triton.jit
def _sum_partials(p_ptr, out, mask, stride, splits):
    """fp32 sum over s = 0, 1, .. splits - 1 (in that order, starting from zero) of ``p[s * stride + out]``,
    ``out`` int64 offsets of any shape. Loads bypass L1 (``.cg``): in the fused form other programs wrote them
    during this launch."""
    acc = tl.zeros(out.shape, dtype=tl.float32)
    p = p_ptr + out
    for _ in range(splits):
        acc += tl.load(p, mask=mask, other=0.0, cache_modifier=".cg")
        p += stride
    return acc


@triton.jit
def _sum_tail(p_ptr, y_ptr, cnt_ptr, tile, splits, out, mask, stride):
    """The fused split-K sum, called by each of the ``splits`` programs of output tile ``tile`` after storing its
    partial: the last to arrive sums them all into y (:func:`_sum_partials`) and zeroes the tile's counter for
    the next launch or CUDA-graph replay. Which program that is does not change the bits."""
    # every thread's partial stored before the counter's release; the acquire orders the last one's loads after
    # every other program's stores (the pattern of dsv4.ops.moe_decode_triton)
    tl.debug_barrier()
    done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if done == splits - 1:
        tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
        acc = _sum_partials(p_ptr, out, mask, stride, splits)
        tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=mask)


# KB_PER_SPLIT only bounds the K loop: specializing it (== 1, multiple of 16) would compile one more kernel per
# split count for no faster code
@triton.jit(do_not_specialize=["KB_PER_SPLIT"])
def _fp8_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, p_ptr, cnt_ptr, M, N, K, KB, KB_PER_SPLIT,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                     QUANT_X: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr, FUSE_SUM: tl.constexpr):
    """x [M, K]: QUANT_X: the raw activations (any float dtype), else e4m3 codes with xs [M, KB] e8m0 bytes.
    w [N, K] e4m3, ws [ceil(N/128), KB] fp32. y: [M, N] in its dtype. SPLIT: the program's K blocks
    ``pid_s * KB_PER_SPLIT ..`` go to the fp32 partials p [splits, M, N], and with FUSE_SUM the last split of
    each tile sums them into y (counters ``cnt`` [tiles] int32, zero)."""
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
        tl.store(p_ptr + pid_s.to(tl.int64) * M * N + out, acc, mask=omask)
        if FUSE_SUM:
            _sum_tail(p_ptr, y_ptr, cnt_ptr, pid, tl.num_programs(1), out, omask, M * N)
    else:
        tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _split_sum_kernel(p_ptr, y_ptr, MN, SPLITS, BLOCK: tl.constexpr):
    """y[i] = sum over s (in order) of p[s, i]; p [SPLITS, MN] fp32, y [MN] in its dtype."""
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = offs < MN
    tl.store(y_ptr + offs, _sum_partials(p_ptr, offs, mask, MN, SPLITS).to(y_ptr.dtype.element_ty), mask=mask)


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """The device's ``fuse_sum`` tile counters (int32, zero between launches), at least ``n``; allocated on first
    use, which must come outside any CUDA-graph capture (the runner's eager warm-up comes first): 16K covers
    every decode tile count of the Flash shapes, so later calls never allocate."""
    held = _COUNTERS.setdefault(device, [])
    if not held or held[-1].numel() < n:
        held.append(torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device))
    return held[-1]


def _partial_sum(out: torch.Tensor, y: torch.Tensor, splits: int, fused: bool) -> None:
    """The second launch of the unfused form: y = the sum of the fp32 partials ``out`` [splits, ...]."""
    if splits > 1 and not fused:
        _split_sum_kernel[(triton.cdiv(y.numel(), 1024),)](out, y, y.numel(), splits, BLOCK=1024)


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


# Decode tiles the sweep tries (block_m from the rows; split-K and fuse_sum swept on the best of them): GEMV-shaped,
# memory-bound, so what varies is how many programs share the weight and how deep each one's pipeline is.
DECODE_CANDIDATES = (
    dict(block_n=32, num_warps=4, num_stages=4),
    dict(block_n=64, num_warps=4, num_stages=4),
    dict(block_n=64, num_warps=4, num_stages=6),
    dict(block_n=64, num_warps=8, num_stages=4),
    dict(block_n=128, num_warps=4, num_stages=3),
    dict(block_n=128, num_warps=8, num_stages=4),
)


def config_name(cfg: dict) -> str:
    """e.g. ``m16n64w4s4q k8f``: tiles, warps, stages, q: quantised in the GEMM, k8: 8 splits forced, f:
    ``fuse_sum``."""
    return f"m{cfg['block_m']}n{cfg['block_n']}w{cfg['num_warps']}s{cfg['num_stages']}" + \
        ("q" if cfg.get("quant_x") else "") + (f" k{cfg['splits']}" if cfg.get("splits") else "") + \
        ("f" if cfg.get("fuse_sum") else "")


# Decode tiles per (N, K) weight shape, for up to DECODE_M rows, over default_config's generic choice (block_n,
# num_warps, num_stages, splits, fuse_sum); benchmarks/bench_fp8_gemm.py sweeps the V4-Flash shapes at 1 and 16
# rows and prints its picks in this form. Empty until measured: every shape takes the generic rule (split-K for
# two programs per SM, the partials summed by a second launch).
DECODE_M = 16
DECODE: dict[tuple[int, int], dict] = {}
GROUPED_DECODE: dict = {}  # the same for fp8_grouped_linear (one shape: wo_a)


def default_config(m: int, n: int, k: int) -> dict:
    """Tile shape for an [m, k] x [n, k]^T product. ``quant_x``: quantise the activations inside the GEMM
    (few rows) rather than in one act_quant launch first (which also needs k % 128 == 0). ``fuse_sum``: with
    split-K, the last split of each tile sums the partials (no second launch)."""
    if m <= SMALL_M:
        cfg = dict(block_m=max(16, triton.next_power_of_2(m)), block_n=64, num_warps=4, num_stages=4, quant_x=True,
                   fuse_sum=False)
        return cfg | DECODE.get((n, k), {}) if m <= DECODE_M else cfg
    return dict(block_m=128, block_n=128, num_warps=8, num_stages=3, quant_x=k % BLOCK_K != 0, fuse_sum=False)


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
    fused = splits > 1 and bool(cfg.get("fuse_sum"))
    out = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else y
    tiles = triton.cdiv(m, cfg["block_m"]) * triton.cdiv(n, cfg["block_n"])
    cnt = _counters(x.device, tiles) if fused else y  # y: unused
    _fp8_gemm_kernel[(tiles, splits)](a, sa, weight, scale, y, out, cnt, m, n, k, kb, per, BLOCK_M=cfg["block_m"],
                                      BLOCK_N=cfg["block_n"], GROUP_M=8, QUANT_X=quant_x, EVEN_K=k % BLOCK_K == 0,
                                      SPLIT=splits > 1, FUSE_SUM=fused, num_warps=cfg["num_warps"],
                                      num_stages=cfg["num_stages"])
    _partial_sum(out, y, splits, fused)
    return y.view(*x.shape[:-1], n)


@triton.jit(do_not_specialize=["KB_PER_SPLIT"])
def _fp8_grouped_kernel(x_ptr, w_ptr, ws_ptr, y_ptr, p_ptr, cnt_ptr, T, G, R, K, KB, KB_PER_SPLIT,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, FUSE_SUM: tl.constexpr,
                        DT: tl.constexpr, PREC: tl.constexpr):
    """Group ``program_id(1)`` of the weight-only FP8 grouped projection: x [T, G, K] (the activation dtype),
    w [G*R, K] e4m3 with ws [ceil(G*R/128), KB] fp32; y [T, G, R]; SPLIT: fp32 partials p [splits, T, G, R],
    summed into y by the last split of each tile with FUSE_SUM (counters [G * tiles per group] int32, zero).
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
        tl.store(p_ptr + pid_s.to(tl.int64) * T * G * R + out, acc, mask=omask)
        if FUSE_SUM:
            _sum_tail(p_ptr, y_ptr, cnt_ptr, g * tl.num_programs(0) + pid, tl.num_programs(2), out, omask, T * G * R)
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
    GEMV-shaped with split-K (the weight read once by ~2 programs per SM), the partials summed by a second
    launch (``fuse_sum`` False) until the GPU sweep says otherwise."""
    if t <= SMALL_M:
        cfg = dict(block_m=max(16, triton.next_power_of_2(t)), block_n=64, num_warps=4, num_stages=4, fuse_sum=False)
        return cfg | GROUPED_DECODE if t <= DECODE_M else cfg
    return dict(block_m=64, block_n=128, num_warps=8, num_stages=3, fuse_sum=False)


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
    fused = splits > 1 and bool(cfg.get("fuse_sum"))
    out = torch.empty((splits, t, g, r), dtype=torch.float32, device=x.device) if splits > 1 else y
    tiles = triton.cdiv(t, cfg["block_m"]) * triton.cdiv(r, cfg["block_n"])
    cnt = _counters(x.device, g * tiles) if fused else y  # y: unused
    _fp8_grouped_kernel[(tiles, g, splits)](x.contiguous(), weight, scale, y, out, cnt, t, g, r, k, kb, per,
                                            BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], SPLIT=splits > 1,
                                            FUSE_SUM=fused, DT=_TL[x.dtype],
                                            PREC="ieee" if x.dtype == torch.float32 else "tf32",
                                            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _partial_sum(out, y, splits, fused)
    return y
