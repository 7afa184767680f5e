"""Triton kernels for mHC (references: :mod:`dsv4.ops.hyper`): pre + RMSNorm, post, the fused layer boundary
(post of one sub-layer, pre + RMSNorm of the next) and the final hyper head.

Every op but post is two launches:

1. ``_mix_partial_kernel``: the skinny GEMM ``flat @ fn^T`` ([T, hc*D] x [hc*D, 24]) in fp32, split over the
   channel dim, so that a few tokens still spread the 1.5 MB of Flash's ``fn`` over the whole
   GPU. Program (s, tb) owns a token block and a channel range of every stream; it writes its partial mixes and
   its partial sum of squares (column M of the same row) into a scratch ``[S, T, RW]`` (RW = MP, or MP + hc*hc). In the boundary form
   it first builds the new streams on its range (``post * a + comb^T x``), stores them rounded to the model
   dtype and mixes the rounded values, as the unfused ops would. Precision: bf16 streams are exact in bf16, so
   fn is split into three bf16 parts whose sum is fn exactly and the three products run on the tensor cores
   with fp32 accumulation ("bf16x3": the fp32 products, summed in fp32); other dtypes use fp32 FMA ("ieee").
2. ``_collapse_kernel``: one program per token sums the S partials in a fixed order (no atomics: the result
   does not depend on scheduling), applies the RMS factor, the sigmoids, the softmax and the Sinkhorn
   iterations on a [hc, hc] register tile, then collapses the streams (which the first launch just wrote: an
   L2 hit for small batches), rounds, and applies the sub-layer's RMSNorm over the whole row. That one program
   per token is pure latency at decode (serial Sinkhorn, then a full-row reduction), so config ``cbd`` selects
   ``_collapse_chunk_kernel`` instead: grid (T, 1 + D/cbd); program 0 of a token writes post and comb (the
   Sinkhorn loop, nothing waits on it), each other one collapses and normalises ``cbd`` channels. The norm needs
   sum_d h_d^2 of the whole row; the mix kernel then also stores the streams' Gram matrix G_jk = sum_d x_j x_k
   (hc*hc columns after the MP mix columns), so every program has sum_d h^2 = pre^T G pre without the others.
   NOTE: that is the sum of squares of the unrounded collapse, the reference squares h rounded to the model
   dtype. fp32: the same to rounding (<= 1e-6). bf16 (torch check on the tests' streams, D = 4096): the norm
   factor is <= 1.4e-4 relative apart (1/28 of a bf16 step), so ~0.7% of the outputs round to the neighbouring
   bf16 value; at D = 64, <= 1.3e-3 and ~5%. A last-arriving program re-reading the row would be exact but is a
   serial tail (a one-launch form with one measured slower, session 9).

The fused boundary runs for :data:`MIN_FUSED_TOKENS` to :data:`MAX_FUSED_TOKENS` tokens (decode, verify, draft
steps; fewer take the unfused pair, measured faster there), with its scratch taken from a pool keyed by shape, so
CUDA-graph replays of those steps reuse fixed buffers and never allocate (the Gram columns widen the pooled rows,
a key of their own). Larger batches (extend) run post and pre+norm as two ops with per-call scratch: pooling every
prefill length would keep one buffer per length alive. That switch is logged once.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from dsv4.ops import pdl
from dsv4.ops.pdl import enter as pdl_enter

log = logging.getLogger(__name__)

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
MAX_FUSED_TOKENS = 64
# below, post then pre+norm (three launches) measured faster than the fused two on an H200 (1 token: 11.1 against
# 12.5 us; 8 tokens: 11.8 against 13.2 us; 64: 22.4 against 16.3; docs/benchmarks.md, 2026-12-04 session 10)
MIN_FUSED_TOKENS = 16
# ~2 programs per SM of an H100/H200 (132 SMs) for the split GEMM; the interpreter gets a handful
_TARGET_PROGRAMS = 256
_POOL: dict[tuple, torch.Tensor] = {}
_fallback_logged = False


@triton.jit
def _mix_partial_kernel(x_ptr, a_ptr, post_ptr, comb_ptr, xout_ptr, fn_ptr, part_ptr, T, D,
                        CHUNKS: tl.constexpr, HC: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
                        RW: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, POST: tl.constexpr,
                        SPLIT: tl.constexpr, GRAM: tl.constexpr, DT: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    s, tb = tl.program_id(0), tl.program_id(1)
    K = HC * D
    t = (tb * BT + tl.arange(0, BT)).to(tl.int64)
    tmask = t < T
    k = tl.arange(0, HC)
    m = tl.arange(0, MP)
    kk = tl.arange(0, HC * BD)  # (stream, channel) of a chunk, stream-major like the flattened streams
    t3, tm3, k3 = t[:, None, None], tmask[:, None, None], k[None, :, None]
    acc = tl.zeros([BT, MP], dtype=tl.float32)
    ss = tl.zeros([BT], dtype=tl.float32)
    ki = k[None, None, :]
    gram = tl.zeros([BT, HC, HC], dtype=tl.float32)
    if POST:
        post = tl.load(post_ptr + t3 * HC + k3, mask=tm3, other=0.0)  # [BT, HC, 1]
    for c in range(CHUNKS):
        d0 = (s * CHUNKS + c) * BD
        dk = d0 + kk % BD
        col = (kk // BD) * D + dk
        if POST:
            d = d0 + tl.arange(0, BD)
            d3 = d[None, None, :]
            m3 = tm3 & (d3 < D)
            a = tl.load(a_ptr + t3 * D + d3, mask=m3, other=0.0).to(tl.float32)  # [BT, 1, BD]
            y = post * a
            for i in tl.static_range(HC):
                xi = tl.load(x_ptr + t3 * K + i * D + d3, mask=m3, other=0.0).to(tl.float32)
                ci = tl.load(comb_ptr + t3 * (HC * HC) + i * HC + k3, mask=tm3, other=0.0)  # comb[t, i, k]
                y += ci * xi
            y = y.to(DT)
            tl.store(xout_ptr + t3 * K + k3 * D + d3, y, mask=m3)
            y2 = tl.reshape(y, [BT, HC * BD])
        else:
            # the plain form loads the [BT, hc*BD] operand as it is used (no 3-D tile to reshape)
            y2 = tl.load(x_ptr + t[:, None] * K + col[None, :], mask=tmask[:, None] & (dk < D)[None, :], other=0.0)
        y2f = y2.to(tl.float32)
        ss += tl.sum(y2f * y2f, axis=1)
        if GRAM:
            # gram[:, k, i] = sum_d y_k y_i on this range; stream i picked by a masked sum over the stream axis (a
            # few shuffles), not a second load: in the boundary form the new streams exist only in registers here
            y3 = tl.reshape(y2f, [BT, HC, BD])
            for i in tl.static_range(HC):
                yi = tl.sum(tl.where(k3 == i, y3, 0.0), axis=1)
                gram += tl.where(ki == i, tl.sum(y3 * yi[:, None, :], axis=2)[:, :, None], 0.0)
        w = tl.load(fn_ptr + m[None, :] * K + col[:, None], mask=(dk < D)[:, None] & (m < M)[None, :], other=0.0)
        if SPLIT:
            # bf16 streams are exact in bf16; fp32 fn = w1 + w2 + w3 exactly (three 8-bit mantissas, each rounded
            # to nearest, cover fp32's 24): three bf16 tensor-core products with fp32 accumulation are the fp32
            # products, exactly, summed in fp32, the smallest part first
            w1 = w.to(tl.bfloat16)
            r1 = w - w1.to(tl.float32)
            w2 = r1.to(tl.bfloat16)
            w3 = (r1 - w2.to(tl.float32)).to(tl.bfloat16)
            yb = y2.to(tl.bfloat16)
            acc = tl.dot(yb, w3, acc)
            acc = tl.dot(yb, w2, acc)
            acc = tl.dot(yb, w1, acc)
        else:
            acc += tl.dot(y2f, w, input_precision="ieee")
    acc += tl.where(m[None, :] == M, ss[:, None], 0.0)
    tl.store(part_ptr + (s * T + t[:, None]) * RW + m[None, :], acc, mask=tmask[:, None])
    if GRAM:
        tl.store(part_ptr + (s * T + t3) * RW + MP + k3 * HC + ki, gram, mask=tm3)


@triton.jit
def _rms_factor(part_ptr, row, smask, K, norm_eps, M: tl.constexpr):
    """The mix RMS factor rsqrt(mean(flat^2) + eps) of one token from its S partial rows."""
    return tl.rsqrt(tl.sum(tl.load(part_ptr + row + M, mask=smask, other=0.0), axis=0) / K + norm_eps)


@triton.jit
def _pre(part_ptr, row, smask, r, scale_ptr, base_ptr, hc_eps, HC: tl.constexpr):
    j = tl.arange(0, HC)
    mix = tl.sum(tl.load(part_ptr + row[:, None] + j[None, :], mask=smask[:, None], other=0.0), axis=0) * r
    return tl.sigmoid(mix * tl.load(scale_ptr) + tl.load(base_ptr + j)) + hc_eps


@triton.jit
def _post_comb(part_ptr, row, smask, r, scale_ptr, base_ptr, post_ptr, comb_ptr, t, iters, hc_eps,
               HC: tl.constexpr):
    """Store the token's post [hc] and its Sinkhorn-normalised comb [hc, hc]."""
    j = tl.arange(0, HC)
    mix = tl.sum(tl.load(part_ptr + row[:, None] + HC + j[None, :], mask=smask[:, None], other=0.0), axis=0) * r
    tl.store(post_ptr + t * HC + j, 2 * tl.sigmoid(mix * tl.load(scale_ptr + 1) + tl.load(base_ptr + HC + j)))
    # comb[i, k] (row-major) summed as a flat [hc*hc] vector and only then viewed as [hc, hc]: the tile then
    # sits in one warp, so the Sinkhorn loop reduces with shuffles, not shared memory and barriers
    ik = tl.arange(0, HC * HC)
    cm = tl.sum(tl.load(part_ptr + row[:, None] + 2 * HC + ik[None, :], mask=smask[:, None], other=0.0), axis=0)
    c = tl.reshape(cm * r * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * HC + ik), [HC, HC])
    c = tl.exp(c - tl.max(c, axis=1)[:, None])
    c = c / tl.sum(c, axis=1)[:, None] + hc_eps
    c = c / (tl.sum(c, axis=0)[None, :] + hc_eps)
    for _ in range(iters - 1):
        c = c / (tl.sum(c, axis=1)[:, None] + hc_eps)
        c = c / (tl.sum(c, axis=0)[None, :] + hc_eps)
    tl.store(comb_ptr + t * (HC * HC) + ik, tl.reshape(c, [HC * HC]))


@triton.jit
def _collapse_kernel(xs_ptr, part_ptr, scale_ptr, base_ptr, w_ptr, out_ptr, post_ptr, comb_ptr, S, T, D,
                     iters, hc_eps, norm_eps, HC: tl.constexpr, M: tl.constexpr, RW: tl.constexpr,
                     SP: tl.constexpr, BLOCK_D: tl.constexpr, HEAD: tl.constexpr, NORM: tl.constexpr,
                     DT: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    K = HC * D
    j = tl.arange(0, HC)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    # the streams' loads go out first: they fly while the mixes and the serial Sinkhorn loop are computed
    xv = tl.load(xs_ptr + t * K + j[:, None] * D + d[None, :], mask=dmask[None, :], other=0.0)
    if NORM:
        w = tl.load(w_ptr + d, mask=dmask, other=0.0)
    s = tl.arange(0, SP)
    smask = s < S
    row = (s * T + t) * RW
    r = _rms_factor(part_ptr, row, smask, K, norm_eps, M)
    pre = _pre(part_ptr, row, smask, r, scale_ptr, base_ptr, hc_eps, HC)
    if not HEAD:
        _post_comb(part_ptr, row, smask, r, scale_ptr, base_ptr, post_ptr, comb_ptr, t, iters, hc_eps, HC)
    h = tl.sum(pre[:, None] * xv.to(tl.float32), axis=0).to(DT).to(tl.float32)
    if NORM:
        h = w * (h * tl.rsqrt(tl.sum(h * h, axis=0) / D + norm_eps))
    tl.store(out_ptr + t * D + d, h.to(DT), mask=dmask)


@triton.jit
def _collapse_chunk_kernel(xs_ptr, part_ptr, scale_ptr, base_ptr, w_ptr, out_ptr, post_ptr, comb_ptr, S, T, D,
                           iters, hc_eps, norm_eps, HC: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
                           RW: tl.constexpr, SP: tl.constexpr, BD: tl.constexpr, MIXERS: tl.constexpr,
                           NORM: tl.constexpr, DT: tl.constexpr, PDL: tl.constexpr):
    """Program (t, c): for c < MIXERS (1, or 0 for the head) the token's post and comb; otherwise the collapse
    (and norm) of channels [(c - MIXERS) * BD, +BD). The norm's sum of squares is pre^T G pre, G the streams' Gram
    matrix from the mix kernel's partials: no program needs another's channels."""
    pdl_enter(PDL)
    t, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    K = HC * D
    s = tl.arange(0, SP)
    smask = s < S
    row = (s * T + t) * RW
    if c < MIXERS:
        # the serial Sinkhorn loop is the longest program: it has its own, launched first (lowest block ids)
        r = _rms_factor(part_ptr, row, smask, K, norm_eps, M)
        _post_comb(part_ptr, row, smask, r, scale_ptr, base_ptr, post_ptr, comb_ptr, t, iters, hc_eps, HC)
    else:
        j = tl.arange(0, HC)
        d = (c - MIXERS) * BD + tl.arange(0, BD)
        dmask = d < D
        xv = tl.load(xs_ptr + t * K + j[:, None] * D + d[None, :], mask=dmask[None, :], other=0.0)
        if NORM:
            w = tl.load(w_ptr + d, mask=dmask, other=0.0)
        r = _rms_factor(part_ptr, row, smask, K, norm_eps, M)
        pre = _pre(part_ptr, row, smask, r, scale_ptr, base_ptr, hc_eps, HC)
        h = tl.sum(pre[:, None] * xv.to(tl.float32), axis=0).to(DT).to(tl.float32)
        if NORM:
            jk = j[None, :, None] * HC + j[None, None, :]
            g = tl.sum(tl.load(part_ptr + row[:, None, None] + MP + jk, mask=smask[:, None, None], other=0.0), axis=0)
            # NOTE: sum_d h^2 of the unrounded collapse, not of h rounded to DT as the reference squares: see the
            # module docstring for the size of that difference
            hh = tl.sum(tl.sum(g * pre[None, :], axis=1) * pre, axis=0)
            h = w * (h * tl.rsqrt(hh / D + norm_eps))
        tl.store(out_ptr + t * D + d, h.to(DT), mask=dmask)


@triton.jit
def _post_kernel(a_ptr, x_ptr, post_ptr, comb_ptr, out_ptr, D, HC: tl.constexpr, BD: tl.constexpr,
                 DT: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    t, db = tl.program_id(0).to(tl.int64), tl.program_id(1)
    K = HC * D
    d = db * BD + tl.arange(0, BD)
    dmask = d < D
    k = tl.arange(0, HC)
    a = tl.load(a_ptr + t * D + d, mask=dmask, other=0.0).to(tl.float32)
    y = tl.load(post_ptr + t * HC + k)[:, None] * a[None, :]
    for i in tl.static_range(HC):  # the same order as the boundary kernel: fused and unfused agree bit for bit
        xi = tl.load(x_ptr + t * K + i * D + d, mask=dmask, other=0.0).to(tl.float32)
        y += tl.load(comb_ptr + t * (HC * HC) + i * HC + k)[:, None] * xi[None, :]
    tl.store(out_ptr + t * K + k[:, None] * D + d[None, :], y.to(DT), mask=dmask[None, :])


# Launch parameters by token count: the first row whose bound is >= T. Keys: ``bt`` tokens per program (16 is
# tl.dot's minimum; prefill takes large blocks, each re-reads all of fn from L2), ``bd`` channels of each stream
# per chunk, ``num_warps`` / ``num_stages`` of the split GEMM, ``programs`` the split aims at (an H100/H200 has
# 132 SMs: ~1 per SM measured best up to 64 tokens, ~2 beyond), ``cbd`` the collapse's channels per program (None:
# one program per token, the whole row; a power of two: the chunked collapse), ``cwarps`` the collapse kernel's
# warps (None: by width). benchmarks/bench_hyper.py sweeps the candidates and prints the winner per T in this form.
DEFAULTS: tuple[tuple[int, dict], ...] = (
    (64, dict(bt=16, bd=32, num_warps=4, num_stages=3, programs=128, cbd=None, cwarps=None)),
    (512, dict(bt=64, bd=32, num_warps=4, num_stages=3, programs=256, cbd=None, cwarps=None)),
    (1 << 62, dict(bt=128, bd=32, num_warps=8, num_stages=3, programs=256, cbd=None, cwarps=None)),
)


def default_config(t: int, d: int, device: torch.device) -> dict:
    """The :data:`DEFAULTS` row of ``t`` tokens (a copy); ``bd`` at most the width, and a handful of programs in
    the interpreter. ``prec`` (not in the table): "bf16x3" for bf16 streams (fn split in three bf16 parts on the
    tensor cores), otherwise "ieee" (fp32 FMA); :func:`_mix` sets it from the streams' dtype."""
    cfg = dict(next(c for bound, c in DEFAULTS if t <= bound))
    cfg["bd"] = min(cfg["bd"], max(16, triton.next_power_of_2(d)))
    if device.type != "cuda":
        cfg["programs"] = 4
    return cfg


def _splits(t: int, d: int, bt: int, bd: int, target: int) -> tuple[int, int]:
    """(splits S, chunks per split) over the channel dim, aiming at ``target`` programs in all."""
    n_chunks = triton.cdiv(d, bd)
    want = max(1, min(n_chunks, triton.cdiv(target, triton.cdiv(t, bt))))
    chunks = triton.cdiv(n_chunks, want)
    return triton.cdiv(n_chunks, chunks), chunks


def _scratch(s: int, t: int, rw: int, device: torch.device, pooled: bool) -> torch.Tensor:
    if not pooled:
        return torch.empty(s, t, rw, dtype=torch.float32, device=device)
    key = (s, t, rw, device)
    buf = _POOL.get(key)
    if buf is None:
        buf = _POOL[key] = torch.empty(s, t, rw, dtype=torch.float32, device=device)
    return buf


def _check(x: torch.Tensor, hc_mult: int) -> None:
    hc = x.shape[1]
    if hc != hc_mult or hc & (hc - 1):
        raise ValueError(f"streams [T, hc, D] need hc == hc_mult and a power of two, got {hc} (hc_mult {hc_mult})")


def _config(t: int, d: int, x: torch.Tensor, config: dict | None) -> dict:
    """:func:`default_config` updated by ``config``; "bf16x3" only where the streams are bf16 (exact in bf16)."""
    cfg = dict(default_config(t, d, x.device), prec="bf16x3" if x.dtype == torch.bfloat16 else "ieee")
    cfg.update(config or {})
    if cfg["prec"] not in ("bf16x3", "ieee"):
        raise ValueError(f"mHC mix precision must be 'bf16x3' or 'ieee', got {cfg['prec']!r}")
    cbd = cfg.get("cbd")
    if cbd is not None and (cbd < 16 or cbd & (cbd - 1)):
        raise ValueError(f"mHC collapse chunk 'cbd' must be None or a power of two >= 16, got {cbd!r}")
    if x.dtype != torch.bfloat16:
        cfg["prec"] = "ieee"
    return cfg


def _mix_cols(m: int) -> int:
    """Columns of a partial row before the Gram matrix: the ``m`` mixes and the sum of squares, padded for tl.dot."""
    return max(16, triton.next_power_of_2(m + 1))


def _mix(x: torch.Tensor, fn: torch.Tensor, a: torch.Tensor | None, post: torch.Tensor | None,
         comb: torch.Tensor | None, pooled: bool, config: dict | None, norm: bool = True,
         ) -> tuple[torch.Tensor, torch.Tensor, int, dict]:
    """Launch 1. Returns (the streams to collapse: x, or the new streams when ``a`` is given; partials [S, T, RW]
    fp32: MP mix columns (sum of squares in column M), then, for a chunked collapse with a norm, the streams'
    [hc, hc] Gram matrix; S; the launch config, whose ``cbd`` / ``cwarps`` the collapse takes)."""
    t, hc, d = x.shape
    m = fn.shape[0]
    mp = _mix_cols(m)
    cfg = _config(t, d, x, config)
    gram = norm and cfg.get("cbd") is not None
    rw = mp + hc * hc if gram else mp
    s, chunks = _splits(t, d, cfg["bt"], cfg["bd"], cfg["programs"])
    part = _scratch(s, t, rw, x.device, pooled)
    xs = x if a is None else torch.empty_like(x)
    _mix_partial_kernel[(s, triton.cdiv(t, cfg["bt"]))](
        x, x if a is None else a.contiguous(), x if post is None else post, x if comb is None else comb, xs,
        fn.float().contiguous(), part, t, d, CHUNKS=chunks, HC=hc, M=m, MP=mp, RW=rw, BT=cfg["bt"], BD=cfg["bd"],
        POST=a is not None, SPLIT=cfg["prec"] == "bf16x3", GRAM=gram, DT=_TL[x.dtype], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **pdl.launch(x.device))
    return xs, part, s, cfg


def _collapse(xs: torch.Tensor, part: torch.Tensor, s: int, scale: torch.Tensor, base: torch.Tensor,
              norm_weight: torch.Tensor | None, iters: int, hc_eps: float, norm_eps: float, head: bool,
              cfg: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch 2. Returns (collapsed, normed unless head [T, D]; post [T, hc]; comb [T, hc, hc]) (None for head)."""
    t, hc, d = xs.shape
    out = torch.empty(t, d, dtype=xs.dtype, device=xs.device)
    post = None if head else torch.empty(t, hc, dtype=torch.float32, device=xs.device)
    comb = None if head else torch.empty(t, hc, hc, dtype=torch.float32, device=xs.device)
    m = hc if head else (2 + hc) * hc
    args = (xs, part, scale.float().contiguous(), base.float().contiguous(),
            out if norm_weight is None else norm_weight.float().contiguous(), out, out if head else post,
            out if head else comb, s, t, d, iters, hc_eps, norm_eps)
    common = dict(HC=hc, M=m, RW=part.shape[2], SP=triton.next_power_of_2(s), NORM=norm_weight is not None,
                  DT=_TL[xs.dtype], **pdl.launch(xs.device))
    cbd, cwarps = cfg.get("cbd"), cfg.get("cwarps")
    if cbd is None:
        block_d = triton.next_power_of_2(d)
        _collapse_kernel[(t,)](*args, BLOCK_D=block_d, HEAD=head,
                               num_warps=cwarps or min(16, max(4, block_d * hc // 2048)), **common)
    else:
        bd = min(cbd, triton.next_power_of_2(d))
        mixers = 0 if head else 1
        _collapse_chunk_kernel[(t, mixers + triton.cdiv(d, bd))](
            *args, MP=_mix_cols(m), BD=bd, MIXERS=mixers,
            num_warps=cwarps or min(8, max(2, bd * hc // 512)), **common)
    return out, post, comb


def hc_pre_norm(
    x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_weight: torch.Tensor,
    hc_mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float, config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel for :func:`dsv4.ops.hyper.hc_pre_norm`. x: [T, hc, D] (bf16/fp32); fn [(2+hc)*hc, hc*D] fp32."""
    _check(x, hc_mult)
    t, hc, d = x.shape
    if t == 0:
        return x.new_empty(0, d), x.new_empty(0, hc, dtype=torch.float32), x.new_empty(0, hc, hc, dtype=torch.float32)
    x = x.contiguous()
    xs, part, s, cfg = _mix(x, fn, None, None, None, t <= MAX_FUSED_TOKENS, config)
    return _collapse(xs, part, s, scale, base, norm_weight, sinkhorn_iters, hc_eps, norm_eps, False, cfg)


def hc_post(a: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.hyper.hc_post`. a: [T, D]; x: [T, hc, D]; post [T, hc], comb [T, hc, hc] fp32."""
    t, hc, d = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if t:
        bd = min(1024, triton.next_power_of_2(d))
        _post_kernel[(t, triton.cdiv(d, bd))](a.contiguous(), x.contiguous(), post.float().contiguous(),
                                              comb.float().contiguous(), out, d, HC=hc, BD=bd, DT=_TL[x.dtype],
                                              **pdl.launch(x.device))
    return out


def hc_post_pre_norm(
    a: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, fn: torch.Tensor,
    scale: torch.Tensor, base: torch.Tensor, norm_weight: torch.Tensor, hc_mult: int, sinkhorn_iters: int,
    hc_eps: float, norm_eps: float, config: dict | None = None, fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel for :func:`dsv4.ops.hyper.hc_post_pre_norm`: one boundary in two launches for
    :data:`MIN_FUSED_TOKENS` to :data:`MAX_FUSED_TOKENS` tokens; otherwise :func:`hc_post` then :func:`hc_pre_norm`
    (the same bits; beyond the maximum logged once). ``fused`` forces the choice (tests, the bench's sweep)."""
    _check(x, hc_mult)
    t = x.shape[0]
    if fused is None:
        fused = MIN_FUSED_TOKENS <= t <= MAX_FUSED_TOKENS
    if not fused:
        global _fallback_logged
        if t > MAX_FUSED_TOKENS and not _fallback_logged:
            _fallback_logged = True
            log.info("mHC boundary: %d tokens > %d, running post and pre+norm as separate kernels (shown once)",
                     t, MAX_FUSED_TOKENS)
        x = hc_post(a, x, post, comb)
        return (x, *hc_pre_norm(x, fn, scale, base, norm_weight, hc_mult, sinkhorn_iters, hc_eps, norm_eps,
                                config))
    if t == 0:
        return (x.clone(), *hc_pre_norm(x, fn, scale, base, norm_weight, hc_mult, sinkhorn_iters, hc_eps, norm_eps))
    xs, part, s, cfg = _mix(x.contiguous(), fn, a, post.float().contiguous(), comb.float().contiguous(), True,
                            config)
    return (xs, *_collapse(xs, part, s, scale, base, norm_weight, sinkhorn_iters, hc_eps, norm_eps, False, cfg))


def hc_head(
    x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_eps: float, norm_eps: float,
    config: dict | None = None,
) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.hyper.hc_head`. x: [T, hc, D]; fn [hc, hc*D], scale [1], base [hc] fp32."""
    t, hc, d = x.shape
    if hc & (hc - 1):
        raise ValueError(f"hc must be a power of two, got {hc}")
    if t == 0:
        return x.new_empty(0, d)
    x = x.contiguous()
    xs, part, s, cfg = _mix(x, fn, None, None, None, t <= MAX_FUSED_TOKENS, config, norm=False)
    return _collapse(xs, part, s, scale, base, None, 1, hc_eps, norm_eps, True, cfg)[0]
