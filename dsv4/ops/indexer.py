"""Lightning Indexer scoring and top-k (DSV4_SPEC 4.7).

:func:`indexer_topk` is the batch-wide op the model calls (its Triton twin: ``dsv4/ops/indexer_triton.py``):
every row of a flat batch scores its own request's compressed keys, read through the page table, and keeps
its top-k visible entries. It takes device tensors and static ints only (no host sync, no loop over
requests), so a decode step can be captured in a CUDA graph. :func:`indexer_scores` and
:func:`topk_indices` are the one-request forms it is checked against.
"""

from __future__ import annotations

import torch

from dsv4.ops.quant import fp4_act_quant_sim, hadamard_transform
from dsv4.ops.rope import apply_rope

INDEX_Q_QUANT_BLOCK = 32  # the FP4 simulation of the indexer queries (as of its keys)


def indexer_q(q: torch.Tensor, weights: torch.Tensor, weight_scale: float, cos: torch.Tensor, sin: torch.Tensor,
              quant: bool, w_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The indexer's query side before scoring: rope, then (``quant``) the Hadamard rotation and the FP4
    simulation; and the head weights scaled.

    q: [T, nI, dI] (the ``wq_b`` output, dI a power of two); weights: [T, nI] (the ``weights_proj`` output);
    cos/sin: [T, rd/2] fp32. Each step is rounded to q's dtype as the official code does (rope in fp32 from q's
    values; the butterfly in fp32, times dI^-0.5; FP4 e2m1 with power-of-two scales per 32); the weights are
    ``weights * weight_scale`` in their own dtype, or in ``w_dtype`` when given: weights in another dtype (the
    fused projection's fp32 accumulation) are rounded to it first. Returns (q [T, nI, dI], weights [T, nI]).
    """
    weights = weights if w_dtype is None else weights.to(w_dtype)
    q = apply_rope(q, cos, sin)
    if quant:
        q = fp4_act_quant_sim(hadamard_transform(q), INDEX_Q_QUANT_BLOCK)
    return q, weights * weight_scale


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``score[t, c] = sum_h w[t, h] * relu(q[t, h] . k[c])``.

    q: [n, nI, dI]; weights: [n, nI] (already scaled by dI^-0.5 * nI^-0.5); keys: [C, dI]. Returns [n, C]
    fp32. The dot products accumulate in fp32; as in the official code, the per-head scores, the weighting
    and the head sum are rounded to q's dtype (exact fp32 when the model runs in fp32).
    """
    dots = torch.einsum("nhd,cd->nhc", q.float(), keys.float()).to(q.dtype).relu()
    return (dots * weights.to(q.dtype).unsqueeze(-1)).sum(dim=1).float()


def topk_indices(scores: torch.Tensor, visible_count: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k entries per row among ``c < visible_count[row]``; ties go to the lowest index.

    scores: [n, C] fp32; visible_count: [n] int. Returns [n, min(k, C)] int64 in descending score order, -1
    where a row has fewer than k visible entries (those picks are padding, never attended).
    """
    n, c = scores.shape
    k = min(k, c)
    if k == 0:
        return scores.new_zeros((n, 0), dtype=torch.int64)
    col = torch.arange(c, device=scores.device)
    valid = col[None, :] < visible_count[:, None]
    masked = scores.masked_fill(~valid, float("-inf"))
    # stable descending sort: equal scores keep ascending index order, so the lowest index wins ties
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.where(order < visible_count[:, None], order, torch.full_like(order, -1))


def visible_entries(positions: torch.Tensor, ratio: int, max_entries: int) -> torch.Tensor:
    """[T] int64: how many compressed entries a row at each position sees (the windows closed by p + 1
    tokens), capped by the static bound ``max_entries``."""
    return ((positions + 1) // ratio).clamp(0, max_entries)


def row_slots(slots: torch.Tensor, extend_lens: torch.Tensor, t: int) -> torch.Tensor:
    """[T] int64: each row's cache slot (requests' rows are back to back; no host sync)."""
    return torch.repeat_interleave(slots, extend_lens, output_size=t)


def paged_scores(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, page_table: torch.Tensor, slots: torch.Tensor,
    extend_lens: torch.Tensor, positions: torch.Tensor, ratio: int, max_entries: int,
) -> torch.Tensor:
    """Every row's :func:`indexer_scores` against its own request's entries 0 .. max_entries - 1.

    Arguments as :func:`indexer_topk`. Returns [T, max_entries] fp32; entries a row does not see are -inf.
    """
    t, nh, dh = q.shape
    out = torch.full((t, max_entries), float("-inf"), device=q.device)
    if t == 0 or max_entries == 0:
        return out
    ps = keys.shape[1]
    slot = row_slots(slots, extend_lens, t)
    vis = visible_entries(positions, ratio, max_entries)
    c = torch.arange(max_entries, device=q.device)
    page_col = (c // ps).clamp_max(page_table.shape[1] - 1)
    chunk = max(1, (1 << 24) // (max_entries * max(dh, nh)))  # bounds the gathered keys and per-head dots
    for lo in range(0, t, chunk):
        rows = slice(lo, min(t, lo + chunk))
        kk = keys[page_table[slot[rows, None], page_col[None, :]], c % ps]  # [n, C, dI]
        dots = torch.einsum("nhd,ncd->nhc", q[rows].float(), kk.float()).to(q.dtype).relu()
        s = (dots * weights[rows].to(q.dtype).unsqueeze(-1)).sum(dim=1).float()
        out[rows] = s.masked_fill(c[None, :] >= vis[rows, None], float("-inf"))
    return out


def select_topk(scores: torch.Tensor, positions: torch.Tensor, ratio: int, topk: int) -> torch.Tensor:
    """Each row's top-k among its visible entries (``c < min((pos + 1) // ratio, C)``).

    scores: [T, C] fp32. Returns [T, min(topk, C)] int64: the picked entries in ascending entry order, then
    -1 padding. The set is the top-k by score with ties to the lowest index, as :func:`topk_indices`; the
    order is by entry, not by score (attention does not care, and pages are then read in order).
    """
    t, c = scores.shape
    vis = visible_entries(positions, ratio, c)
    picks = topk_indices(scores, vis, topk)
    ordered = torch.sort(picks.masked_fill(picks < 0, c), dim=-1).values  # padding sorts last
    return ordered.masked_fill(ordered == c, -1)


def indexer_topk(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, page_table: torch.Tensor, slots: torch.Tensor,
    extend_lens: torch.Tensor, positions: torch.Tensor, ratio: int, topk: int, max_entries: int,
) -> torch.Tensor:
    """The indexer's picks for every row of a flat batch (extend, decode and verify rows alike).

    q: [T, nI, dI] (roped; Hadamard-rotated and FP4-rounded under quant_sim); weights: [T, nI] (the scaled
    ``weights_proj`` output) in q's dtype or fp32; keys: the indexer key pool [pages, page_size, dI];
    page_table: [slots, max_pages] int64; slots / extend_lens: [R] int64 per request (its cache slot and new
    rows; requests' rows are back to back in the batch); positions: [T] int64. ``ratio``, ``topk`` and
    ``max_entries`` are host ints; ``max_entries`` bounds every row's visible count (the batch's most
    entries after this step, or a static bound when the step is captured in a CUDA graph).

    Row t at position p sees entries ``c < (p + 1) // ratio`` of its request (entries completed by earlier
    rows of this batch included: the compressor writes them first); rows of one request (a prefill chunk,
    or the ``next_n`` draft rows of a verify) share its keys. Scores as :func:`indexer_scores`.

    Returns [T, K] int64, K = min(topk, max_entries): row t's top-min(topk, visible) entries (ties to the
    lowest index) in ascending entry order, then -1. Attention reads column c only while
    ``c < min(K, (p + 1) // ratio)`` and the pick is >= 0.
    """
    return select_topk(paged_scores(q, weights, keys, page_table, slots, extend_lens, positions, ratio, max_entries),
                       positions, ratio, topk)
