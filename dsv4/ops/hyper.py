"""mHC (manifold-constrained hyper-connections) references (DSV4_SPEC 4.3, 4.4, 4.9). All mixing in fp32."""

from __future__ import annotations

import torch

from dsv4.ops.norm import rms_norm


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


def hc_pre_norm(
    x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_weight: torch.Tensor,
    hc_mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`hc_pre`, then the sub-layer's weighted RMSNorm (``attn_norm`` / ``ffn_norm``) of the collapse.

    norm_weight: [D] fp32; ``norm_eps`` serves both the mix RMS and the RMSNorm (both are ``rms_norm_eps``).
    Returns (normed sub-layer input [T, D] in x.dtype, post [T, hc], comb [T, hc, hc] fp32). The collapse is
    rounded to x.dtype before the norm, as the unfused model does.
    """
    h, post, comb = hc_pre(x, fn, scale, base, hc_mult, sinkhorn_iters, hc_eps, norm_eps)
    return rms_norm(h, norm_weight, norm_eps), post, comb


def hc_post(a: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Expand a sub-layer output back into the streams: ``Y[k] = post_k * a + sum_i comb[i, k] * X[i]``.

    a: [T, D]; x: [T, hc, D]; post [T, hc], comb [T, hc, hc] fp32. Computed in fp32, rounded once.
    """
    y = post.unsqueeze(-1) * a.float().unsqueeze(1) + torch.einsum("tik,tid->tkd", comb, x.float())
    return y.to(x.dtype)


def hc_post_pre_norm(
    a: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, fn: torch.Tensor,
    scale: torch.Tensor, base: torch.Tensor, norm_weight: torch.Tensor, hc_mult: int, sinkhorn_iters: int,
    hc_eps: float, norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer boundary: :func:`hc_post` of one sub-layer (a, post, comb), then :func:`hc_pre_norm` of the next
    (fn, scale, base, norm_weight) on the new streams.

    Returns (new streams [T, hc, D] in x.dtype, normed next input [T, D], post [T, hc], comb [T, hc, hc]).
    """
    x = hc_post(a, x, post, comb)
    return (x, *hc_pre_norm(x, fn, scale, base, norm_weight, hc_mult, sinkhorn_iters, hc_eps, norm_eps))


def hc_head(
    x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_eps: float, norm_eps: float
) -> torch.Tensor:
    """Final stream collapse (no Sinkhorn, no x2). x: [T, hc, D] -> [T, D] in x.dtype."""
    m = _mixes(x, fn, norm_eps)
    pre = torch.sigmoid(m * scale.float()[0] + base.float()) + hc_eps
    return (pre.unsqueeze(-1) * x.float()).sum(dim=1).to(x.dtype)
