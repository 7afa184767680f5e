"""Lightning Indexer scoring and top-k (DSV4_SPEC 4.7)."""

from __future__ import annotations

import torch


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

    scores: [n, C] fp32; visible_count: [n] int. Returns [n, min(k, C)] int64, -1 where a row has fewer
    than k visible entries (those picks are padding, never attended).
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
