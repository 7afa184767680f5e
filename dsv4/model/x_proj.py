"""The projections that read the attention input x, as one fused weight (one GEMM instead of up to seven).

A layer's attention input x [T, D] feeds ``wq_a``, ``wkv`` and, by layer kind, the compressor's ``wkv``/``wgate``,
the indexer's ``weights_proj`` and the indexer compressor's ``wkv``/``wgate`` (:func:`x_parts`). Their weights
are rows of one parameter ``attn.x_proj.weight`` [sum of rows, D] in :func:`x_parts` order; the outputs are
column views of one product. The checkpoint keeps its per-module names: dsv4.weights loads each checkpoint
tensor into its rows (:func:`x_layout`), and :func:`fuse_state_dict` does the same for ``load_state_dict``.

Numerics are each part's own, as when they were separate modules:

* the parts consumed in the activation dtype (``wq_a``, ``wkv``, ``weights_proj``) are one rounding of an fp32
  accumulation to that dtype, as a bf16 GEMM gives;
* the compressor parts are consumed in fp32 (the official code runs them as fp32 GEMMs on bf16-valued weights):
  the fused GEMM returns them unrounded from its fp32 accumulation (``torch.mm(..., out_dtype=float32)`` on
  CUDA), so the compress kernel reads them as before, without a separate input upcast. Their weights are held
  in the model dtype, which is exact for the official checkpoint (it stores them bf16).
* under ``act_quant`` / ``weight_format="native"`` the FP8-stored parts (``wq_a``, ``wkv``) quantize their input
  and the others do not, so they are a second GEMM: over the first rows of the same weight (``act_quant``), or
  over their own FP8 parameter ``attn.x_proj.fp8`` (native; FP8 128x128 scale blocks: every FP8 part but the
  last must have a multiple of 128 rows, true at the released shapes; otherwise they stay separate modules
  under their own names, see :func:`x_layout`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.config import CSA, SLIDING, ModelConfig
from dsv4.ops.mm_fp32 import mm_fp32
from dsv4.ops.quant import act_quant_sim

FP8_BLOCK = 128  # the native FP8 weights' square scale block


class XPart(NamedTuple):
    """One projection of x: its module path under the attention (``<attn>.<name>.weight`` in the checkpoint),
    its output rows, whether the checkpoint stores it FP8 (its input is FP8-quantized under ``act_quant`` or
    native weights), and whether its output is consumed in fp32 (else in the activation dtype)."""

    name: str
    rows: int
    fp8: bool
    fp32: bool


def x_parts(cfg: ModelConfig, layer_id: int) -> list[XPart]:
    """The projections reading layer ``layer_id``'s attention input, in their row order in the fused weight:
    FP8-stored first, then the other activation-dtype parts, then the fp32 (compressor) parts."""
    kind, hd = cfg.layer_kind(layer_id), cfg.head_dim
    parts = [XPart("wq_a", cfg.q_lora_rank, True, False), XPart("wkv", hd, True, False)]
    if kind == CSA:
        parts.append(XPart("indexer.weights_proj", cfg.index_n_heads, False, False))
    if kind != SLIDING:
        c = 2 if kind == CSA else 1  # CSA compressors keep two overlapping window halves
        parts += [XPart("compressor.wkv", c * hd, False, True), XPart("compressor.wgate", c * hd, False, True)]
    if kind == CSA:
        di = cfg.index_head_dim
        parts += [XPart("indexer.compressor.wkv", 2 * di, False, True),
                  XPart("indexer.compressor.wgate", 2 * di, False, True)]
    return parts


def fp8_fusable(parts: list[XPart]) -> bool:
    """Whether the FP8 parts can share one block-scaled weight: each one's rows but the last's fill whole
    128-row scale blocks (then the fused scale rows are the parts' scale rows back to back)."""
    return all(p.rows % FP8_BLOCK == 0 for p in [p for p in parts if p.fp8][:-1])


class Placement(NamedTuple):
    """Where a part's weight lives, relative to the attention module: ``param`` rows ``[row, row + rows)``;
    ``scale`` (native FP8 only) rows from ``scale_row``."""

    param: str
    row: int
    scale: str | None = None
    scale_row: int = 0


def x_layout(parts: list[XPart], native: bool) -> dict[str, Placement]:
    """Each part's :class:`Placement`. Dequantized weights: all in ``x_proj.weight``. Native: the FP8 parts in
    ``x_proj.fp8.weight``/``.scale`` when :func:`fp8_fusable`, else each in its own ``<name>.weight``/``.scale``
    (the unfused module); the others in ``x_proj.weight``."""
    out: dict[str, Placement] = {}
    row = fp8_row = 0
    fused8 = fp8_fusable(parts)
    for p in parts:
        if native and p.fp8 and not fused8:
            out[p.name] = Placement(f"{p.name}.weight", 0, f"{p.name}.scale", 0)
        elif native and p.fp8:
            out[p.name] = Placement("x_proj.fp8.weight", fp8_row, "x_proj.fp8.scale", fp8_row // FP8_BLOCK)
            fp8_row += p.rows
        else:
            out[p.name] = Placement("x_proj.weight", row)
            row += p.rows
    return out


class XProjection(nn.Module):
    """All of :func:`x_parts` as one (or, with FP8 inputs, two) GEMMs; :meth:`forward` returns each part's output.

    ``weight`` [rows of the parts in it, D] in ``dtype``: every part (dequantized weights) or the non-FP8 parts
    (native). ``fp8``: the native FP8 parts' fused :class:`~dsv4.model.layers.Linear` (``fp8_linear`` GEMM), or
    None. ``separate``: native FP8 parts that cannot be fused (:func:`fp8_fusable`), owned and registered by
    the caller under their own names.
    """

    def __init__(self, parts: list[XPart], dim: int, dtype: torch.dtype, act_quant: bool,
                 fp8: nn.Module | None = None, separate: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.fp8 = fp8
        self.separate = tuple((separate or {}).items())  # a tuple: not registered here (the caller owns them)
        held = {n for n, _ in self.separate} | ({p.name for p in parts if p.fp8} if fp8 is not None else set())
        self.fp8_parts = [p for p in parts if p.fp8 and fp8 is not None]
        mine = [p for p in parts if p.name not in held]
        self.act_quant = act_quant and any(p.fp8 for p in mine)
        self.quant_parts = [p for p in mine if p.fp8] if self.act_quant else []
        self.plain_parts = [p for p in mine if p not in self.quant_parts]
        self.n_quant = sum(p.rows for p in self.quant_parts)
        self.n_act = sum(p.rows for p in self.plain_parts if not p.fp32)
        self.any_fp32 = any(p.fp32 for p in self.plain_parts)
        self.weight = nn.Parameter(torch.empty(sum(p.rows for p in mine), dim, dtype=dtype), requires_grad=False) \
            if mine else None

    def forward(self, x: torch.Tensor, act_fp32: bool = False) -> dict[str, torch.Tensor]:
        """x: [T, D] in the activation dtype -> {part name: [T, rows]} (column views of the fused products):
        fp32 for the compressor parts, the activation dtype for the others.

        ``act_fp32``: where those others share the fp32 GEMM of the compressor parts, hand them over unrounded
        (fp32 column views) for consumers that round them to the activation dtype as they load them (the
        ``dtype`` arguments of rms_norm, kv_norm_rope_store, indexer_q: the same values, no cast launch)."""
        out: dict[str, torch.Tensor] = {}
        if self.fp8 is not None:
            _split(self.fp8(x), self.fp8_parts, out)
        for name, lin in self.separate:
            out[name] = lin(x)
        if self.weight is None:
            return out
        w = self.weight
        if self.quant_parts:  # the FP8-stored parts' input is rounded through FP8, as the official FP8 GEMMs do
            _split(F.linear(act_quant_sim(x, FP8_BLOCK), w[: self.n_quant]), self.quant_parts, out)
            w = w[self.n_quant:]
        if not self.plain_parts:
            return out
        if not self.any_fp32:
            _split(F.linear(x, w), self.plain_parts, out)
            return out
        y = mm_fp32(x, w)
        if self.n_act and x.dtype != torch.float32 and not act_fp32:
            # one rounding of the fp32 accumulation for the activation-dtype parts, as their own GEMM would: one
            # cast for a single token (its column views are contiguous), else one per part, whose contiguous
            # outputs spare the consumers' kernels a copy each
            act = [p for p in self.plain_parts if not p.fp32]
            if x.shape[0] == 1:
                _split(y[:, : self.n_act].to(x.dtype), act, out)
            else:
                _split(y[:, : self.n_act], act, out)
                out.update({p.name: out[p.name].to(x.dtype) for p in act})
            _split(y[:, self.n_act:], [p for p in self.plain_parts if p.fp32], out)
        else:
            _split(y, self.plain_parts, out)
        return out


def _split(y: torch.Tensor, parts: list[XPart], out: dict[str, torch.Tensor]) -> None:
    a = 0
    for p in parts:
        out[p.name] = y[:, a: a + p.rows]
        a += p.rows


def fuse_state_dict(state: dict[str, torch.Tensor], prefix: str, parts: list[XPart], native: bool) -> None:
    """Rewrite, in place, a state dict that holds the parts under their checkpoint names (``<prefix><name>.weight``,
    ``.scale`` for native FP8) into the fused parameters of :func:`x_layout`; one left incomplete stays as it is
    (``load_state_dict`` then reports it)."""
    by_param: dict[str, list[tuple[int, str]]] = {}
    for p in parts:
        pl = x_layout(parts, native)[p.name]
        if pl.param != f"{p.name}.weight":
            by_param.setdefault(pl.param, []).append((pl.row, f"{prefix}{p.name}.weight"))
            if pl.scale is not None:
                by_param.setdefault(pl.scale, []).append((pl.scale_row, f"{prefix}{p.name}.scale"))
    for param, members in by_param.items():
        keys = [k for _, k in sorted(members)]
        if f"{prefix}{param}" in state or not all(k in state for k in keys):
            continue
        tensors = [state.pop(k) for k in keys]
        dtype = tensors[0].dtype if all(t.dtype == tensors[0].dtype for t in tensors) else torch.float32
        state[f"{prefix}{param}"] = torch.cat([t.to(dtype) for t in tensors])
