"""FP8 storage of KV rows for ``--kv-cache-dtype fp8`` (DSV4_SPEC 3.3, 6.5 and 8 D2).

A stored row of ``head_dim`` values keeps its leading ``nope = head_dim - rope_dim`` dims as FP8 e4m3 with one
power-of-two scale per block of 64 (the e8m0 exponent byte, ``2^(byte - 127)``; a short last block is quantised
as if zero-padded) and its trailing rope dims in the activation dtype. The scale rule is the official FP8 KV
simulation's (:func:`dsv4.ops.quant.act_quant_sim` with block 64), so dequantising a stored row gives back the
simulated row bit for bit: ``fp32(e4m3) * 2^k`` is exact in bf16 and fp32.

Flash: 448 FP8 bytes + 7 scale bytes + 64 bf16 rope dims = 583 bytes per row instead of 1024.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dsv4.ops.quant import act_quant, e8m0_to_float

KV_QUANT_BLOCK = 64


class Fp8KV(NamedTuple):
    """One FP8 KV store: the same leading dims (``[slots, R]`` for a ring, ``[pages, page_size]`` for a pool)
    on three tensors: ``nope`` [..., nope] float8_e4m3fn, ``scale`` [..., ceil(nope / 64)] uint8 (e8m0 bytes),
    ``rope`` [..., rope_dim] in the activation dtype."""

    nope: torch.Tensor
    scale: torch.Tensor
    rope: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape ``[..., head_dim]`` (as a plain store of the same rows would have)."""
        return (*self.nope.shape[:-1], self.nope.shape[-1] + self.rope.shape[-1])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype rows dequantise to."""
        return self.rope.dtype

    @property
    def device(self) -> torch.device:
        return self.rope.device


def alloc_fp8_kv(lead: tuple[int, ...], head_dim: int, rope_dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> Fp8KV:
    nope = head_dim - rope_dim
    return Fp8KV(torch.zeros(*lead, nope, dtype=torch.float8_e4m3fn, device=device),
                 torch.full((*lead, -(-nope // KV_QUANT_BLOCK)), 127, dtype=torch.uint8, device=device),
                 torch.zeros(*lead, rope_dim, dtype=dtype, device=device))


def fp8_kv_bytes_per_row(head_dim: int, rope_dim: int, dtype: torch.dtype) -> int:
    nope = head_dim - rope_dim
    return nope + -(-nope // KV_QUANT_BLOCK) + rope_dim * torch.empty((), dtype=dtype).element_size()


def quantize_rows(x: torch.Tensor, rope_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (nope e4m3, scale bytes uint8, rope in x.dtype) as stored in an :class:`Fp8KV`."""
    nope = x.shape[-1] - rope_dim
    pad = -nope % KV_QUANT_BLOCK
    xn = torch.nn.functional.pad(x[..., :nope], (0, pad)) if pad else x[..., :nope]
    q, s = act_quant(xn, KV_QUANT_BLOCK, "ue8m0")
    return q[..., :nope], s.view(torch.uint8), x[..., nope:]


def dequantize_rows(nope: torch.Tensor, scale: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_rows`: [..., head_dim] in rope.dtype."""
    sf = e8m0_to_float(scale).repeat_interleave(KV_QUANT_BLOCK, dim=-1)[..., : nope.shape[-1]]
    return torch.cat(((nope.float() * sf).to(rope.dtype), rope), dim=-1)


def gather_rows(store: torch.Tensor | Fp8KV, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (any shape, int64 flat indices over the store's leading dims) -> [*rows.shape, head_dim] in
    the store's dtype (FP8 rows dequantised)."""
    if isinstance(store, Fp8KV):
        return dequantize_rows(*(t.view(-1, t.shape[-1])[rows] for t in store))
    return store.view(-1, store.shape[-1])[rows]


def scatter_rows(store: torch.Tensor | Fp8KV, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``store[rows[i]] = values[i]`` over the flat leading dims; values [n, head_dim] (FP8 stores quantise)."""
    if isinstance(store, Fp8KV):
        for t, v in zip(store, quantize_rows(values, store.rope.shape[-1]), strict=True):
            t.view(-1, t.shape[-1])[rows] = v.to(t.dtype)
        return
    store.view(-1, store.shape[-1])[rows] = values.to(store.dtype)
