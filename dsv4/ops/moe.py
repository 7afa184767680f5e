"""MoE routing and experts (DSV4_SPEC 4.8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.ops.quant import act_quant_sim


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


def moe_experts(
    x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
    weights: torch.Tensor, ids: torch.Tensor, limit: float | None, act_quant: bool = False,
) -> torch.Tensor:
    """Routed experts, looped per expert hit.

    x: [N, D]; w1, w3: [E, I, D]; w2: [E, D, I]; weights/ids: [N, k]. The route weight multiplies the fp32
    SwiGLU output before w2 (official order). ``act_quant`` rounds both GEMM inputs through FP8 per 1x128
    block (the official FP8/FP4 expert GEMMs). Returns fp32 [N, D] accumulated over the picks.
    """
    if act_quant:
        x = act_quant_sim(x, 128)
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w1.shape[0]).tolist()
    tok = order // ids.shape[1]
    wts = weights.reshape(-1)[order]
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        t = tok[start : start + c]
        xe = x[t]
        h = (swiglu(xe @ w1[e].t(), xe @ w3[e].t(), limit) * wts[start : start + c, None]).to(x.dtype)
        if act_quant:
            h = act_quant_sim(h, 128)
        out.index_add_(0, t, (h @ w2[e].t()).float())
        start += c
    return out
