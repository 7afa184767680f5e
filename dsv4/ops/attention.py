"""Sparse attention with a per-head sink over one shared K=V head (DSV4_SPEC 3.8)."""

from __future__ import annotations

import torch


def sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, visible: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """Reference for one request's rows.

    q: [n, H, hd]; kv: [N, hd] (keys and values: the window tokens then the compressed entries);
    visible: [n, N] bool (which keys each query row sees); sink: [H] fp32 raw logits (not scaled).
    ``o = sum_j e^(l_j - M) kv_j / (sum_j e^(l_j - M) + e^(sink - M))`` with ``l = scale * q.k`` in fp32.
    Probabilities are rounded to q.dtype before the fp32 PV product. Returns [n, H, hd] in q.dtype.
    """
    logits = torch.einsum("nhd,kd->nhk", q.float(), kv.float()) * scale
    logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
    sinks = sink.float().view(1, -1, 1).expand(logits.shape[0], -1, 1)
    probs = torch.softmax(torch.cat((logits, sinks), dim=-1), dim=-1)[..., :-1]
    # the official kernel rounds the probabilities to the activation dtype before the PV product
    probs = probs.to(q.dtype).float()
    return torch.einsum("nhk,kd->nhd", probs, kv.float()).to(q.dtype)
