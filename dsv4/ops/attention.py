"""Sparse attention with a per-head sink over one shared K=V head (DSV4_SPEC 3.8)."""

from __future__ import annotations

import torch

from dsv4.ops.kv_fp8 import Fp8KV, gather_rows
from dsv4.ops.rope import apply_rope


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


def gather_keys(
    kv: torch.Tensor, ring: torch.Tensor | Fp8KV, comp: torch.Tensor | Fp8KV | None, page_table: torch.Tensor | None,
    picks: torch.Tensor | None, slot: torch.Tensor, p0: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor,
    window: int, ratio: int, width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every candidate key of the batch rows ``rows`` and whether each row sees it.

    Row t's candidates are its window positions ``pos - window + 1 .. pos`` (positions >= its request's prefix
    length ``p0`` are this batch's own keys: row ``t - pos + k`` of ``kv``; older ones are ring rows
    ``slot * R + k % R``), then its compressed entries: ``picks[t, c]`` (CSA, -1 = none) or ``c`` (HCA),
    ``c < min(width, (pos + 1) // ratio)``, at ``comp[page_table[slot, e // ps], e % ps]``.
    Returns keys [n, window + width, hd] in kv.dtype and visible [n, window + width] bool.
    """
    s, b, p = slot[rows], p0[rows], pos[rows]
    k = p[:, None] - window + 1 + torch.arange(window, device=kv.device)
    kc = k.clamp_min(0)
    r = ring.shape[1]
    from_ring = gather_rows(ring, s[:, None] * r + kc % r).to(kv.dtype)
    from_new = kv[(rows[:, None] - p[:, None] + kc).clamp(0, kv.shape[0] - 1)]
    keys = torch.where((kc >= b[:, None])[..., None], from_new, from_ring)
    visible = k >= 0
    if comp is not None and width > 0:
        c = torch.arange(width, device=kv.device)
        e = picks[rows, :width] if picks is not None else c.expand(len(rows), -1)
        count = ((p + 1) // ratio).clamp_max(width)
        ok = (c[None, :] < count[:, None]) & (e >= 0)
        ec = e.clamp_min(0)
        ps = comp.shape[1]
        page = page_table[s[:, None], (ec // ps).clamp_max(page_table.shape[1] - 1)]
        keys = torch.cat((keys, gather_rows(comp, page * ps + ec % ps).to(kv.dtype)), dim=1)
        visible = torch.cat((visible, ok), dim=1)
    return keys, visible


def paged_sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, ring: torch.Tensor | Fp8KV, comp: torch.Tensor | Fp8KV | None,
    page_table: torch.Tensor | None, picks: torch.Tensor | None, slot: torch.Tensor, p0: torch.Tensor,
    pos: torch.Tensor, sink: torch.Tensor, scale: float, window: int, ratio: int, cos: torch.Tensor,
    sin: torch.Tensor, rows_per_request: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Reference for the batch-wide attention kernel: window + compressed entries + sink, inverse rope.

    q: [T, H, hd] (normed, roped); kv: [T, hd] this batch's keys; ring: [slots, R, hd]; comp: [pages, ps, hd]
    with page_table [slots, max_pages] (None for sliding-only layers); ring and comp are plain tensors or
    :class:`~dsv4.ops.kv_fp8.Fp8KV` stores (read dequantised). picks: [T, K] int64 CSA entry indices (-1 = none;
    a row sees at most ``min(K, (pos + 1) // ratio)`` of them) or None (HCA: every closed window,
    ``(pos + 1) // ratio``); slot / p0 (prefix length of the row's request) / pos: [T] int64; sink: [H] fp32;
    cos/sin: [T, rd/2] fp32 at pos. Returns [T, H, hd] in q.dtype with the conjugate rope applied to the
    trailing dims at pos. (The HCA width is read off ``pos``: a host sync the kernel does not need.)
    A request's rows are consecutive in the batch, at positions p0, p0 + 1, ...; ``rows_per_request`` (the
    fewest and the most rows any request has, known on the host) only routes rows between kernel forms and
    changes nothing here.
    """
    t, h, hd = q.shape
    out = torch.empty_like(q)
    width = 0
    if comp is not None and t:
        width = picks.shape[1] if picks is not None else int(((pos + 1) // ratio).max())
    kv = kv.to(ring.dtype).to(q.dtype)  # this batch's keys as the store will hold them
    n_keys = window + width
    chunk = max(1, (1 << 24) // max(1, n_keys * max(hd, h)))  # bounds the gathered keys and logits
    for lo in range(0, t, chunk):
        rows = torch.arange(lo, min(t, lo + chunk), device=q.device)
        keys, visible = gather_keys(kv, ring, comp, page_table, picks, slot, p0, pos, rows, window, ratio, width)
        qq, kk = q[rows].float(), keys.float()
        logits = torch.einsum("nhd,nkd->nhk", qq, kk) * scale
        logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
        sinks = sink.float().view(1, -1, 1).expand(len(rows), -1, 1)
        probs = torch.softmax(torch.cat((logits, sinks), dim=-1), dim=-1)[..., :-1]
        probs = probs.to(q.dtype).float()  # the official kernel rounds P before the PV product
        out[rows] = torch.einsum("nhk,nkd->nhd", probs, kk).to(q.dtype)
    return apply_rope(out, cos, sin, inverse=True)
