"""Mixture of experts: sqrt-softplus or hash routing, clamped SwiGLU experts, one shared expert (DSV4_SPEC 4.8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.config import ModelConfig
from dsv4.distributed.moe import moe_data_parallel, moe_parallel
from dsv4.distributed.parallel import SINGLE, Parallel
from dsv4.model.layers import ModelOptions, checkpoint_fp8_linear
from dsv4.ops.dispatch import get_ops, resolve_ops
from dsv4.ops.moe import ExpertWeights, swiglu


class Gate(nn.Module):
    """Router: ``weight`` [E, D] (scores in fp32); ``bias`` [E] selects only; hash layers own ``tid2eid``.

    ``ops`` picks the routing implementation (``dsv4.ops.dispatch``) once, here: the model should pass its
    resolved ``opts.ops``; "auto" follows the device the gate is built on.
    """

    def __init__(self, cfg: ModelConfig, is_hash: bool, ops: str = "auto") -> None:
        super().__init__()
        self.top_k, self.scoring, self.scale = cfg.num_experts_per_tok, cfg.scoring_func, cfg.routed_scaling_factor
        self.is_hash = is_hash
        self.ops = get_ops(resolve_ops(ops, torch.get_default_device()))
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size), requires_grad=False)
        if is_hash:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.int64))
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts), requires_grad=False)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], input_ids [N] -> (weights [N, k] fp32, expert ids [N, k] int64)."""
        if self.is_hash:
            return self.ops.route_hash(x, self.weight, input_ids, self.tid2eid, self.scoring, self.scale)
        logits = F.linear(x.float(), self.weight.float())
        return self.ops.route_scored(logits, self.bias, self.top_k, self.scoring, self.scale)


class Experts(nn.Module):
    """Routed experts stacked: ``w1``/``w3`` [E, I, D], ``w2`` [E, D, I] in ``dtype``.

    ``weight_format="native"`` keeps them as the checkpoint stores them (``dsv4.weights.native_parameters``),
    with fp32 scales beside: FP8 experts float8_e4m3fn, ``w1_scale``/``w3_scale`` [E, I/128, D/128] and
    ``w2_scale`` [E, D/128, I/128] (128x128 blocks); FP4 experts (``expert_dtype`` "fp4") uint8 packed e2m1
    pairs (column 2j in the low nibble) ``w1``/``w3`` [E, I, D/2] and ``w2`` [E, D, I/2], ``w1_scale``/``w3_scale``
    [E, I, D/32] and ``w2_scale`` [E, D, I/32] (one per 32 inputs). ``fmt``: "dequant", "fp8" or "fp4".
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, weight_format: str = "dequant",
                 parallel: Parallel = SINGLE) -> None:
        super().__init__()
        # expert parallel: this rank's range of experts and its slice of their intermediate dim
        e, i, d = cfg.n_routed_experts // parallel.ep_size, cfg.moe_intermediate_size // parallel.moe_tp_size, \
            cfg.hidden_size
        self.fmt = "dequant" if weight_format != "native" else "fp4" if cfg.expert_dtype == "fp4" else "fp8"
        for name, (n, k) in (("w1", (i, d)), ("w3", (i, d)), ("w2", (d, i))):
            if self.fmt == "dequant":
                w, s = torch.empty(e, n, k, dtype=dtype), None
            elif self.fmt == "fp4":
                w, s = torch.empty(e, n, k // 2, dtype=torch.uint8), torch.empty(e, n, k // 32)
            else:
                w = torch.empty(e, n, k, dtype=torch.float8_e4m3fn)
                s = torch.empty(e, -(-n // 128), -(-k // 128))
            setattr(self, name, nn.Parameter(w, requires_grad=False))
            if s is not None:
                setattr(self, f"{name}_scale", nn.Parameter(s, requires_grad=False))

    def stack(self) -> ExpertWeights:
        """The experts in their stored form (dense, or FP8/FP4 with their scales) for ``moe_experts``."""
        return ExpertWeights(self.w1, self.w3, self.w2, *(getattr(self, f"{n}_scale", None) for n in ("w1", "w3", "w2")))


class SharedExpert(nn.Module):
    """The always-on SwiGLU expert (Linear w1, w3 [I, D], w2 [D, I]); :class:`MoE` runs it in the routed experts'
    launches through :meth:`stack`."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, limit: float | None, opts: ModelOptions) -> None:
        super().__init__()
        i, d = cfg.moe_intermediate_size // opts.parallel.world_size, cfg.hidden_size  # split over every rank
        self.limit = limit
        self.w1, self.w3 = checkpoint_fp8_linear(d, i, dtype, opts), checkpoint_fp8_linear(d, i, dtype, opts)
        self.w2 = checkpoint_fp8_linear(i, d, dtype, opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit).to(x.dtype))

    def stack(self) -> ExpertWeights:
        """A stack of one expert (views, no copy): FP8 Linears give their 128x128 block scales."""
        lins = (self.w1, self.w3, self.w2)
        scales = [getattr(lin, "scale", None) for lin in lins]
        return ExpertWeights(*(lin.weight.unsqueeze(0) for lin in lins),
                             *(None if s is None else s.unsqueeze(0) for s in scales))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype, opts: ModelOptions) -> None:
        super().__init__()
        self.limit, self.act_quant = cfg.swiglu_limit, opts.act_quant
        self.ops = get_ops(resolve_ops(opts.ops, torch.get_default_device()))
        self.gate = Gate(cfg, cfg.is_hash_layer(layer_id), opts.ops)
        self.parallel = opts.parallel
        self.experts = Experts(cfg, dtype, opts.weight_format, opts.parallel)
        self.shared_experts = (
            SharedExpert(cfg, dtype, cfg.swiglu_limit if opts.shared_expert_clamp else None, opts)
            if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x: [T, D]; input_ids: [T] (hash routing). Sum accumulated in fp32, one rounding."""
        if self.parallel.dp_size > 1:  # data-parallel attention: every group's tokens meet here
            return moe_data_parallel(self, x, input_ids, self.parallel)
        weights, ids = self.gate(x, input_ids)
        if self.parallel.world_size > 1:
            return moe_parallel(self, x, weights, ids, self.parallel)
        sh = self.shared_experts
        return self.ops.moe_experts(x, self.experts.stack(), weights, ids, self.limit, self.act_quant,
                                    None if sh is None else sh.stack(), None if sh is None else sh.limit,
                                    out_dtype=x.dtype)
