"""The attention's q and kv preparation and the window-ring store, as references (DSV4_SPEC 4.5 steps 1-2).

Kernels with the same signatures are in :mod:`dsv4.ops.qkv_triton`. The ring is ``[slots, R, hd]`` with
position p of a slot at row ``p % R``; ``dest`` names flat ring rows (``slot * R + p % R``), -1 = no store. A ring
may be an FP8 store (:class:`~dsv4.ops.kv_fp8.Fp8KV`, ``--kv-cache-dtype fp8``): its nope dims are then always
rounded through FP8 (what the store holds is what attention must read for this batch's own keys too).
"""

from __future__ import annotations

import torch

from dsv4.ops.kv_fp8 import Fp8KV, scatter_rows
from dsv4.ops.norm import head_rms_norm, rms_norm
from dsv4.ops.quant import act_quant_sim
from dsv4.ops.rope import apply_rope

KV_QUANT_BLOCK = 64  # the official FP8 simulation of the kv nope dims


def q_norm_rope(q: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Per-head unweighted RMSNorm (in q's dtype, as the official code) then rope on the trailing dims.

    q: [T, H, hd]; cos/sin: [T, rd/2] fp32. Returns a new [T, H, hd] tensor in q.dtype.
    """
    return apply_rope(head_rms_norm(q, eps), cos, sin)


def kv_norm_rope_store(
    kv: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, nope_quant: bool,
    ring: torch.Tensor | Fp8KV, dest: torch.Tensor, dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Weighted RMSNorm, rope on the trailing dims, optional FP8 simulation of the nope dims, ring store.

    kv: [T, hd] (the wkv projection); weight: [hd] fp32; cos/sin: [T, rd/2] fp32. ``nope_quant`` rounds
    ``kv[:, :hd - rd]`` through FP8 e4m3 in blocks of 64 with power-of-two scales (a short last block is
    padded; always on for an FP8 ring). ``ring``: [slots, R, hd]; ``dest``: [T] int64 flat ring rows or -1.
    ``dtype``: the activation dtype (None: kv.dtype); kv in another one (the fused projection's fp32
    accumulation) is rounded to it first. Returns [T, hd] in that dtype (what attention reads for this batch's
    own keys); stored rows are that value in ring.dtype.
    """
    kv = kv if dtype is None else kv.to(dtype)
    rd = 2 * cos.shape[-1]
    out = apply_rope(rms_norm(kv, weight, eps), cos, sin)
    if nope_quant or isinstance(ring, Fp8KV):
        nope = out.shape[-1] - rd
        out = torch.cat((act_quant_sim(out[:, :nope], KV_QUANT_BLOCK), out[:, nope:]), dim=-1)
    store_ring(out, ring, dest)
    return out


def store_ring(kv: torch.Tensor, ring: torch.Tensor | Fp8KV, dest: torch.Tensor) -> None:
    """``ring.view(-1, hd)[dest[t]] = kv[t]`` for every ``dest[t] >= 0`` (distinct rows). kv: [T, hd] (for an FP8
    ring already rounded as it stores them: quantising again gives the same values)."""
    keep = dest >= 0
    scatter_rows(ring, dest[keep], kv[keep])
