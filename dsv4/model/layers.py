"""Small building blocks: linear, RMSNorm, runtime options, and the pool gather/scatter helpers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.distributed.parallel import SINGLE, Parallel
from dsv4.ops.dispatch import OpSet, get_ops, resolve_ops
from dsv4.ops.quant import act_quant_sim


@dataclass(frozen=True)
class ModelOptions:
    """Numerics switches fixed when the model is built.

    quant_sim: the latest official reference's quantisation-aware simulation: the nope dims of every window
    KV vector and compressed entry are rounded through FP8 e4m3 (blocks of 64, power-of-two scales), and the
    indexer's queries and keys are Hadamard-rotated and rounded through FP4 e2m1 (blocks of 32).
    transformers does none of this; the oracle tests turn it off.
    act_quant: the inputs of the GEMMs whose weights the official checkpoint stores in FP8/FP4 are rounded
    through FP8 per 1x128 block with power-of-two scales, as the official FP8 GEMMs do (weights here are
    dequantized, so this reproduces those GEMMs' products exactly). Only meaningful for quantized checkpoints.
    shared_expert_clamp: the latest official code clamps the shared expert's SwiGLU like the routed ones
    (the first release did not).
    ops: which implementation of the hot ops the model calls (dsv4/ops/dispatch.py): "auto" (Triton kernels on
    CUDA, the PyTorch references elsewhere), "ref" or "triton"; resolved once when the model is built.
    weight_format: "dequant" keeps every weight in the model dtype (quantized checkpoints are dequantized at
    load); "native" keeps the checkpoint's FP8 linears (block-scaled, see :class:`Linear`) and FP8/FP4 routed
    experts as stored and runs them through native GEMMs, whose input quantization is what ``act_quant``
    simulates: "native" sets ``act_quant``. Needs a quantized checkpoint (dsv4.weights.check_weight_format).
    parallel: this rank's place in the tensor/expert-parallel layout (dsv4/distributed/parallel.py); the layers
    build only their slices and reduce their outputs over its groups. The default is one process.
    """

    quant_sim: bool = True
    act_quant: bool = False
    shared_expert_clamp: bool = True
    ops: str = "auto"
    weight_format: str = "dequant"
    parallel: Parallel = SINGLE

    def __post_init__(self) -> None:
        if self.weight_format not in ("dequant", "native"):
            raise ValueError(f"weight_format must be 'dequant' or 'native', got {self.weight_format!r}")
        if self.weight_format == "native":
            # native FP8/FP4 GEMMs always quantize their inputs; code that still holds a dequantized copy of such a
            # weight (the MoE's fallbacks) must round the same way
            object.__setattr__(self, "act_quant", True)


class Linear(nn.Module):
    """``y = x @ W^T`` with W [out, in]. ``fp32`` layers upcast the input (the official fp32 projections);
    ``act_quant`` layers round the input through FP8 first (see :class:`ModelOptions`).

    ``fp8_ops`` given: the checkpoint's FP8 weight kept as stored, ``weight`` float8_e4m3fn [out, in] with
    ``scale`` fp32 [ceil(out/128), ceil(in/128)] (one per 128x128 block), run by ``fp8_ops.fp8_linear``
    (the input quantized per token per 128 columns inside); the output has the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, fp32: bool = False,
                 act_quant: bool = False, fp8_ops: OpSet | None = None) -> None:
        super().__init__()
        self.fp32, self.act_quant, self.fp8_ops = fp32, act_quant, fp8_ops
        wdtype = torch.float8_e4m3fn if fp8_ops is not None else torch.float32 if fp32 else dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=wdtype), requires_grad=False)
        if fp8_ops is not None:
            self.scale = nn.Parameter(torch.empty(-(-out_features // 128), -(-in_features // 128)),
                                      requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_ops is not None:
            return self.fp8_ops.fp8_linear(x, self.weight, self.scale)
        if self.act_quant:
            x = act_quant_sim(x, 128)
        return F.linear(x.float() if self.fp32 else x, self.weight)


def checkpoint_fp8_linear(in_features: int, out_features: int, dtype: torch.dtype, opts: ModelOptions) -> Linear:
    """A :class:`Linear` for a module the official checkpoint stores in FP8 (DSV4_SPEC 7.3): native FP8 with
    ``opts.weight_format == "native"``, else the dequantized weight in ``dtype`` (with ``opts.act_quant``)."""
    if opts.weight_format == "native":
        return Linear(in_features, out_features, dtype,
                      fp8_ops=get_ops(resolve_ops(opts.ops, torch.get_default_device())))
    return Linear(in_features, out_features, dtype, act_quant=opts.act_quant)


def checkpoint_fp8_weight(in_features: int, out_features: int, dtype: torch.dtype, opts: ModelOptions) -> Linear:
    """A :class:`Linear` holding the weight of an FP8 module whose input the official code never quantizes
    (``wo_a``, DSV4_SPEC 4.5 step 7): FP8 as stored with ``opts.weight_format == "native"`` (the caller runs
    ``fp8_ops.fp8_grouped_linear``), else the dequantized weight in ``dtype``."""
    fp8_ops = get_ops(resolve_ops(opts.ops, torch.get_default_device())) if opts.weight_format == "native" else None
    return Linear(in_features, out_features, dtype, fp8_ops=fp8_ops)


class RMSNorm(nn.Module):
    """Weighted RMSNorm; the weight is kept in fp32 (the official loader upcasts it).

    ``ops`` picks the implementation (``dsv4.ops.dispatch``) once, here: the model should pass its resolved
    ``opts.ops``; "auto" follows the device the layer is built on.
    """

    def __init__(self, dim: int, eps: float, ops: str = "auto") -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False)
        self.rms_norm = get_ops(resolve_ops(ops, torch.get_default_device())).rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rms_norm(x, self.weight, self.eps)


def fp32_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=torch.float32), requires_grad=False)


def fp8_sim_nope(x: torch.Tensor, nope_dim: int, block: int = 64) -> torch.Tensor:
    """Round ``x[..., :nope_dim]`` through FP8 (blocks of ``block``; a short last block is padded)."""
    return torch.cat((act_quant_sim(x[..., :nope_dim], block), x[..., nope_dim:]), dim=-1)


def gather_entries(pool: torch.Tensor, table_row: torch.Tensor, count: int) -> torch.Tensor:
    """Entries 0..count-1 of one slot from a paged pool [pages, page_size, d] -> [count, d]."""
    ps = pool.shape[1]
    idx = torch.arange(count, device=pool.device)
    return pool[table_row[idx // ps], idx % ps]


def scatter_entries(pool: torch.Tensor, table_row: torch.Tensor, first: int, values: torch.Tensor) -> None:
    """Write ``values`` [n, d] as entries first..first+n-1 of one slot."""
    ps = pool.shape[1]
    idx = torch.arange(first, first + values.shape[0], device=pool.device)
    pool[table_row[idx // ps], idx % ps] = values.to(pool.dtype)
