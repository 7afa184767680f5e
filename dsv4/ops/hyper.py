"""mHC (manifold-constrained hyper-connections) references (DSV4_SPEC 4.3, 4.4, 4.9). All mixing in fp32."""

from __future__ import annotations

import torch


def _mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, hc, D] -> mixes [T, M] fp32 = (flat @ fn^T) * rsqrt(mean(flat^2) + eps)."""
    flat = x.flatten(1).float()
    r = torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
    return (flat @ fn.float().t()) * r


def hc_pre(
    x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
    hc_mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse the residual streams for one sub-layer.

    x: [T, hc, D] (model dtype); fn [(2+hc)*hc, hc*D], scale [3], base [(2+hc)*hc] fp32.
    Returns (collapsed [T, D] in x.dtype, post [T, hc] fp32, comb [T, hc, hc] fp32 doubly-stochastic).
    """
    hc = hc_mult
    m = _mixes(x, fn, norm_eps)
    base = base.float()
    pre = torch.sigmoid(m[:, :hc] * scale[0] + base[:hc]) + hc_eps
    post = 2 * torch.sigmoid(m[:, hc : 2 * hc] * scale[1] + base[hc : 2 * hc])
    comb = (m[:, 2 * hc :] * scale[2] + base[2 * hc :]).view(-1, hc, hc)
    comb = torch.softmax(comb, dim=-1) + hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    collapsed = (pre.unsqueeze(-1) * x.float()).sum(dim=1).to(x.dtype)
    return collapsed, post, comb


def hc_post(a: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Expand a sub-layer output back into the streams: ``Y[k] = post_k * a + sum_i comb[i, k] * X[i]``.

    a: [T, D]; x: [T, hc, D]; post [T, hc], comb [T, hc, hc] fp32. Computed in fp32, rounded once.
    """
    y = post.unsqueeze(-1) * a.float().unsqueeze(1) + torch.einsum("tik,tid->tkd", comb, x.float())
    return y.to(x.dtype)


def hc_head(
    x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_eps: float, norm_eps: float
) -> torch.Tensor:
    """Final stream collapse (no Sinkhorn, no x2). x: [T, hc, D] -> [T, D] in x.dtype."""
    m = _mixes(x, fn, norm_eps)
    pre = torch.sigmoid(m * scale.float()[0] + base.float()) + hc_eps
    return (pre.unsqueeze(-1) * x.float()).sum(dim=1).to(x.dtype)
