"""MoE routing and experts (DSV4_SPEC 4.8)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from dsv4.ops.quant import act_quant_sim, dequantize_fp4_block, dequantize_fp8_block


def router_scores(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """logits [N, E] fp32 -> affinity scores [N, E] fp32."""
    if scoring_func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if scoring_func == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def top_k_ids(sel: torch.Tensor, top_k: int) -> torch.Tensor:
    """The ``top_k`` largest entries of each row of ``sel`` [N, E], largest first; among equal values the lower
    expert index wins (a stable descending sort; ``torch.topk`` promises no tie order). Returns [N, k] int64."""
    return torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :top_k]


def normalize_weights(w: torch.Tensor, route_scale: float) -> torch.Tensor:
    """``w / sum(w) * route_scale`` per row of ``w`` [N, k] fp32, the sum taken left to right in pick order so
    that a kernel can reproduce it bit for bit (``Tensor.sum`` leaves its order to the backend)."""
    total = w[:, 0]
    for j in range(1, w.shape[1]):
        total = total + w[:, j]
    return w / total[:, None] * route_scale


def route(
    scores: torch.Tensor, top_k: int, bias: torch.Tensor | None, hash_ids: torch.Tensor | None, route_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick experts and their weights.

    scores: [N, E] fp32. Scored layers pick ``topk(scores + bias)`` (the bias only selects; ties to the lower
    expert index); hash layers take ``hash_ids`` [N, k]. Weights are the picked scores, renormalised, times
    ``route_scale``. Returns (weights [N, k] fp32, ids [N, k] int64).
    """
    if hash_ids is not None:
        ids = hash_ids.long()
    else:
        ids = top_k_ids(scores if bias is None else scores + bias.float(), top_k)
    return normalize_weights(scores.gather(1, ids), route_scale), ids


def route_scored(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, scoring_func: str,
                 route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scored routing from the router's output: logits [N, E] fp32, selection bias [E] fp32 (or None).

    Returns (weights [N, k] fp32, ids [N, k] int64), ids ordered by ``scores + bias`` descending.
    """
    return route(router_scores(logits, scoring_func), top_k, bias, None, route_scale)


def route_hash(x: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor, tid2eid: torch.Tensor,
               scoring_func: str, route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash routing with the router projection: x [N, D] (any float dtype), router weight [E, D], input_ids [N],
    tid2eid [V, k] int. The experts are ``tid2eid[input_ids]``; their weights are the learned scores of those
    experts (``x.float() @ weight.float().T`` then ``scoring_func``), renormalised, times ``route_scale``.

    Returns (weights [N, k] fp32, ids [N, k] int64).
    """
    scores = router_scores(F.linear(x.float(), weight.float()), scoring_func)
    return route(scores, tid2eid.shape[1], None, tid2eid[input_ids], route_scale)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None) -> torch.Tensor:
    """Clamped SwiGLU in fp32: gate <= limit, up in [-limit, limit]."""
    gate, up = gate.float(), up.float()
    if limit is not None and limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


class ExpertWeights(NamedTuple):
    """A stack of E SwiGLU experts in one of three forms, told apart by ``w1.dtype`` (see :attr:`form`):

    * "dense" (the model dtype): ``w1``, ``w3`` [E, I, D], ``w2`` [E, D, I]; no scales;
    * "fp8": float8_e4m3fn weights of the same shapes; fp32 scales per 128x128 block ``w1_scale``, ``w3_scale``
      [E, ceil(I/128), ceil(D/128)], ``w2_scale`` [E, ceil(D/128), ceil(I/128)];
    * "fp4": uint8 (or int8) packed e2m1 pairs ``w1``, ``w3`` [E, I, D/2], ``w2`` [E, D, I/2] (low nibble = even
      column); fp32 scales per 32 inputs ``w1_scale``, ``w3_scale`` [E, I, D/32], ``w2_scale`` [E, D, I/32].

    The scales may also be float8_e8m0fnu (decoded exactly). A shared expert is a stack of one (``unsqueeze(0)``
    views of its [out, in] weights).
    """

    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor
    w1_scale: torch.Tensor | None = None
    w3_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None

    @property
    def form(self) -> str:
        if self.w1.dtype == torch.float8_e4m3fn:
            return "fp8"
        if self.w1.dtype in (torch.uint8, torch.int8):
            return "fp4"
        return "dense"

    def expert(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert ``e``'s (w1 [I, D], w3 [I, D], w2 [D, I]) in ``dtype``; quantized forms are dequantized exactly
        (an e4m3 or e2m1 value times a power of two fits bf16)."""
        ws = (self.w1[e], self.w3[e], self.w2[e])
        if self.form == "dense":
            return tuple(w.to(dtype) for w in ws)
        scales = (self.w1_scale[e], self.w3_scale[e], self.w2_scale[e])
        deq = dequantize_fp8_block if self.form == "fp8" else dequantize_fp4_block
        return tuple(deq(w, s).to(dtype) for w, s in zip(ws, scales, strict=True))


def _expert_ffn(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, wts: torch.Tensor,
                limit: float | None, act_quant: bool) -> torch.Tensor:
    """One expert on its rows ``x`` [n, D] (already FP8-rounded under ``act_quant``): each GEMM's output is
    rounded to x.dtype as the official bf16-output GEMMs do; the route weight ``wts`` [n] scales the fp32
    SwiGLU before the rounding that feeds w2. Returns [n, D] in x.dtype."""
    h = (swiglu(x @ w1.t(), x @ w3.t(), limit) * wts[:, None]).to(x.dtype)
    if act_quant:
        h = act_quant_sim(h, 128)
    return h @ w2.t()


def moe_experts(
    x: torch.Tensor, experts: ExpertWeights, weights: torch.Tensor, ids: torch.Tensor, limit: float | None,
    act_quant: bool = False, shared: ExpertWeights | None = None, shared_limit: float | None = None,
    out_dtype: torch.dtype = torch.float32, may_skip: bool = False,
) -> torch.Tensor:
    """Routed experts, looped per expert hit, plus an optional shared expert.

    x: [N, D] in the model dtype; ``experts``: E experts in any :class:`ExpertWeights` form; weights/ids:
    [N, k] fp32 / integer. The route weight multiplies the fp32 SwiGLU output before w2 (official order).
    ``act_quant`` rounds both GEMM inputs through FP8 per 1x128 block (the activation quantisation of the
    official FP8/FP4 GEMMs: with the quantized weights dequantized exactly, the products are the native ones up
    to accumulation order). ``shared`` (a stack of one, clamped at ``shared_limit``) runs unweighted on every
    token. Every expert output is rounded to x.dtype and summed in fp32 (routed picks in expert order, then the
    shared expert); returns [N, D] in ``out_dtype``.

    A hit of expert id -1 ("not here": another rank's expert, a padding row) is skipped: it adds nothing, as a
    hit of weight 0 adds a zero. ``may_skip`` tells the kernels that ids may hold -1 (their single-GPU code has
    no such test); the reference always skips them.
    """
    if act_quant:
        x = act_quant_sim(x, 128)
    out = torch.zeros(x.shape[0], experts.w2.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    # id -1 counts as entry 0 and sorts first: the loop starts past those hits
    skipped, *counts = torch.bincount(flat_ids + 1, minlength=experts.w1.shape[0] + 1).tolist()
    tok = order // ids.shape[1]
    wts = weights.reshape(-1)[order].float()
    start = skipped
    for e, c in enumerate(counts):
        if c == 0:
            continue
        t = tok[start : start + c]
        y = _expert_ffn(x[t], *experts.expert(e, x.dtype), wts[start : start + c], limit, act_quant)
        out.index_add_(0, t, y.float())
        start += c
    if shared is not None:
        ones = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
        out += _expert_ffn(x, *shared.expert(0, x.dtype), ones, shared_limit, act_quant).float()
    return out.to(out_dtype)
