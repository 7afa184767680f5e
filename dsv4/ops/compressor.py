"""Gated softmax pooling of the KV compressors (DSV4_SPEC 4.6)."""

from __future__ import annotations

import torch


def pool_windows(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Pool each window's rows with a per-channel softmax over the rows.

    kv, score: [W, rows, d] fp32 (score includes the position bias; -inf rows get zero weight).
    Returns [W, d] fp32: ``sum_r softmax_r(score)[r] * kv[r]``.
    """
    return (torch.softmax(score.float(), dim=1) * kv.float()).sum(dim=1)
