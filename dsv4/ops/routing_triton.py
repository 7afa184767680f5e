"""Triton kernels for MoE routing (references: :func:`dsv4.ops.moe.route_scored`, :func:`dsv4.ops.moe.route_hash`).

Scored routing: one program takes ``BLOCK_N`` rows of router logits [N, E] (the fp32 router GEMM's output),
scores them, adds the selection bias and picks the top k by k rounds of "row max, then the lowest expert index
holding it" (the reference's tie rule), gathering each pick's score as it goes; the weights are normalised with
the sum taken in pick order, as the reference does.

Hash routing needs only k of the E router rows per token, so its kernel fuses the router projection: one
program per token gathers ``tid2eid[token]``, computes those k fp32 dot products over D (the whole row in one
step up to D = 4096: a decode step waits on one round of loads, not one per chunk), scores and normalises them
(k x D weights read per token instead of E x D).

Scores: on the GPU the softplus, exp and sigmoid come from libdevice (``log1pf(expf(x))`` and an IEEE division,
what torch's CUDA kernels compute), so scores and picks match a CUDA reference bit for bit; the interpreter has
no libdevice, so there an equivalent formula stands in (a few ulp from torch's CPU kernels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from dsv4.ops import moe as ref
from dsv4.ops import pdl
from dsv4.ops.pdl import enter as pdl_enter

_SCORING = {"sqrtsoftplus": 0, "sigmoid": 1, "softmax": 2}


@triton.jit
def _softplus(x, GPU_MATH: tl.constexpr):
    """torch's softplus (beta 1, threshold 20): x above 20, else log1p(exp(x)); fp32."""
    if GPU_MATH:
        sp = libdevice.log1p(libdevice.exp(x))
    else:
        e = tl.exp(x)
        u = 1.0 + e
        # log1p(e) = log(u) * e / (u - 1) corrects the rounding of 1 + e (e tiny: u == 1 and the answer is e)
        sp = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(x > 20.0, x, sp)


@triton.jit
def _score(x, SCORING: tl.constexpr, GPU_MATH: tl.constexpr):
    """Elementwise scores for sqrtsoftplus (0) and sigmoid (1); fp32."""
    if SCORING == 0:
        return tl.sqrt_rn(_softplus(x, GPU_MATH))
    else:
        if GPU_MATH:
            e = libdevice.exp(-x)
        else:
            e = tl.exp(-x)
        return tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + e)


@triton.jit
def _route_scored_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, N, E, route_scale, HAS_BIAS: tl.constexpr,
                         K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, SCORING: tl.constexpr,
                         GPU_MATH: tl.constexpr, PDL: tl.constexpr):
    """logits [N, E] fp32 -> weights [N, K] fp32, ids [N, K] int64."""
    pdl_enter(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < N
    col_ok = cols < E
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * E + cols[None, :], mask=mask, other=0.0)
    if SCORING == 2:
        xm = tl.where(col_ok[None, :], x, float("-inf"))
        e = tl.exp(xm - tl.max(xm, axis=1)[:, None])
        s = e / tl.sum(e, axis=1)[:, None]
    else:
        s = _score(x, SCORING, GPU_MATH)
    sel = s
    if HAS_BIAS:
        sel = s + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    # padding columns can never be picked: every real sel is finite
    sel = tl.where(col_ok[None, :], sel, float("-inf"))
    kcols = tl.arange(0, BLOCK_K)
    total = tl.zeros([BLOCK_N], tl.float32)
    picks = tl.zeros([BLOCK_N, BLOCK_K], tl.int64)
    ws = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for j in tl.static_range(K):
        m = tl.max(sel, axis=1)
        pick = tl.min(tl.where(sel == m[:, None], cols[None, :], BLOCK_E), axis=1)
        hit = cols[None, :] == pick[:, None]
        # exact gather: one non-zero term per row
        w = tl.sum(tl.where(hit, s, 0.0), axis=1)
        total = total + w  # 0 + w is exact: the sum runs left to right in pick order like the reference
        sel = tl.where(hit, float("-inf"), sel)
        picks = tl.where(kcols[None, :] == j, pick.to(tl.int64)[:, None], picks)
        ws = tl.where(kcols[None, :] == j, w[:, None], ws)
    out = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    out_mask = row_ok[:, None] & (kcols < K)[None, :]
    tl.store(ids_ptr + out, picks, mask=out_mask)
    tl.store(w_ptr + out, tl.math.div_rn(ws, total[:, None]) * route_scale, mask=out_mask)


@triton.jit
def _route_hash_kernel(x_ptr, weight_ptr, tok_ptr, t2e_ptr, w_ptr, ids_ptr, D, route_scale, K: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, SCORING: tl.constexpr,
                       GPU_MATH: tl.constexpr, PDL: tl.constexpr):
    """One token: ids = tid2eid[tok] [K]; logits = weight[ids] @ x (fp32); weights normalised in pick order."""
    pdl_enter(PDL)
    n = tl.program_id(0)
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    tok = tl.load(tok_ptr + n).to(tl.int64)
    ids = tl.load(t2e_ptr + tok * K + kk, mask=k_ok, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        xv = tl.load(x_ptr + n.to(tl.int64) * D + d, mask=d_ok, other=0.0).to(tl.float32)
        wv = tl.load(weight_ptr + ids[:, None] * D + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc += wv.to(tl.float32) * xv[None, :]
    s = _score(tl.sum(acc, axis=1), SCORING, GPU_MATH)
    total = tl.sum(tl.where(kk == 0, s, 0.0), axis=0)
    for j in tl.static_range(1, K):
        total = total + tl.sum(tl.where(kk == j, s, 0.0), axis=0)
    tl.store(ids_ptr + n * K + kk, ids, mask=k_ok)
    tl.store(w_ptr + n * K + kk, tl.math.div_rn(s, total) * route_scale, mask=k_ok)


def route_scored(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, scoring_func: str,
                 route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel for :func:`dsv4.ops.moe.route_scored`: logits [N, E] fp32, bias [E] fp32 or None ->
    (weights [N, k] fp32, ids [N, k] int64)."""
    n, e = logits.shape
    if top_k > e:
        raise ValueError(f"top_k {top_k} > {e} experts")
    logits = logits.float().contiguous()
    w = torch.empty((n, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((n, top_k), dtype=torch.int64, device=logits.device)
    if n:
        block_e = triton.next_power_of_2(e)
        block_n = max(1, min(16, 2048 // block_e, triton.next_power_of_2(n)))
        b = bias.float().contiguous() if bias is not None else logits
        _route_scored_kernel[(triton.cdiv(n, block_n),)](
            logits, b, w, ids, n, e, float(route_scale), HAS_BIAS=bias is not None, K=top_k,
            BLOCK_K=triton.next_power_of_2(top_k), BLOCK_N=block_n,
            BLOCK_E=block_e, SCORING=_SCORING[scoring_func], GPU_MATH=logits.is_cuda, num_warps=4,
            **pdl.launch(logits.device))
    return w, ids


def route_hash(x: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor, tid2eid: torch.Tensor,
               scoring_func: str, route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel for :func:`dsv4.ops.moe.route_hash`: x [N, D], router weight [E, D], input_ids [N], tid2eid [V, k]
    -> (weights [N, k] fp32, ids [N, k] int64). Softmax scores need every expert's logit: the reference."""
    if scoring_func == "softmax":
        return ref.route_hash(x, weight, input_ids, tid2eid, scoring_func, route_scale)
    n, d = x.shape
    k = tid2eid.shape[1]
    x, weight = x.contiguous(), weight.contiguous()
    w = torch.empty((n, k), dtype=torch.float32, device=x.device)
    ids = torch.empty((n, k), dtype=torch.int64, device=x.device)
    if n:
        # the whole row in one step up to 4096 wide (Flash's D): every load of the program is in flight at once,
        # instead of 8 dependent 512-wide rounds (~10 us per call at batch 1 on an H200); 16 warps keep that
        # [8, 4096] fp32 tile at 64 registers a thread
        block_d = min(4096, triton.next_power_of_2(d))
        _route_hash_kernel[(n,)](x, weight, input_ids.contiguous(), tid2eid.contiguous(), w, ids, d,
                                 float(route_scale), K=k, BLOCK_K=triton.next_power_of_2(k), BLOCK_D=block_d,
                                 SCORING=_SCORING[scoring_func], GPU_MATH=x.is_cuda,
                                 num_warps=max(4, min(16, block_d * triton.next_power_of_2(k) // 2048)),
                                 **pdl.launch(x.device))
    return w, ids
