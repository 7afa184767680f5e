"""Random weights for benchmarks/decode.py, drawn on the device: the same values for dsv4 and transformers.

Values are keyed by (seed, tensor name, chunk) and scaled as ``dsv4.checkpoint.random_tensor`` scales them;
FP8/FP4 variants round them through the checkpoint's blocks and keep them natively or dequantized, whichever
the model was built to hold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from dsv4.config import ModelConfig
from dsv4.ops.quant import (
    dequantize_fp4_block,
    dequantize_fp8_block,
    e8m0_to_float,
    quantize_fp4_block,
    quantize_fp8_block,
)
from dsv4.weights import checkpoint_tensors, fused_placements

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _seed(seed: int, name: str, part: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}:{part}".encode()).digest()[:8], "little") >> 1


def _draw(init: str, shape: tuple[int, ...], gen: torch.Generator, n_experts: int) -> torch.Tensor:
    """fp32 values with the scales of dsv4.checkpoint.random_tensor (activations stay O(1) through layers)."""
    def randn(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=DEV) * std

    if init == "tid2eid":
        return torch.rand(shape[0], n_experts, generator=gen, device=DEV).argsort(dim=-1)[:, : shape[1]]
    if init == "hc_scale":
        return 0.5 + torch.rand(shape, generator=gen, device=DEV)
    std = {"linear": shape[-1] ** -0.5, "embed": 1.0, "hc_fn": 0.5 * shape[-1] ** -0.5, "hc_base": 0.5, "ape": 0.5,
           "sink": 1.0, "bias": 0.05, "norm": 0.05}[init]
    return randn(std) + (1.0 if init == "norm" else 0.0)


def _store(target: torch.Tensor, scale: torch.Tensor | None, v: torch.Tensor, quant: str) -> None:
    """Write values ``v`` (fp32) into ``target``: as they are, or rounded through FP8 blocks / FP4 and kept
    natively (target fp8 / uint8 with ``scale``) or dequantized (target bf16 / fp32)."""
    if quant == "fp8":
        q, s = quantize_fp8_block(v.reshape(-1, v.shape[-1]))  # experts: I % 128 == 0, blocks stay inside one
        if target.dtype == torch.float8_e4m3fn:
            target.copy_(q.view(target.shape))
            scale.copy_(e8m0_to_float(s).view(scale.shape))
        else:
            target.copy_(dequantize_fp8_block(q, s).view(target.shape))
    elif quant == "fp4":
        packed, s = quantize_fp4_block(v, 32)
        if target.dtype in (torch.uint8, torch.int8):
            target.copy_(packed.view(target.dtype))
            scale.copy_(e8m0_to_float(s))
        else:
            target.copy_(dequantize_fp4_block(packed, s))
    else:
        target.copy_(v)


def fill_weights(tensors: dict[str, torch.Tensor], cfg: ModelConfig, weights: str, seed: int) -> list[str]:
    """Fill every checkpoint-table entry present in ``tensors`` (name -> tensor to write in place) with values
    keyed by (seed, name, chunk); routed experts in chunks of experts. Returns the names filled."""
    expert_quant = {"bf16": "none", "fp8": "fp8", "fp8-fp4": "fp4"}[weights]
    seen, filled = set(), []
    specs = checkpoint_tensors(cfg)
    # a dsv4 model holds the attention input's projections as rows of one fused parameter (dsv4/model/x_proj.py)
    native = any(t.dtype == torch.float8_e4m3fn for t in tensors.values())
    placed = fused_placements(specs, "native" if native else "dequant")
    for spec in specs.values():
        pl = placed.get(spec.name) if spec.param not in tensors else None
        if spec.param in seen or (spec.param not in tensors and pl is None):
            continue
        seen.add(spec.param)
        target = tensors[spec.param] if pl is None else tensors[pl.param].narrow(0, pl.row, spec.shape[0])
        quant = {"fp8": "fp8" if weights != "bf16" else "none", "expert": expert_quant}.get(spec.quant, "none")
        scale = None
        if pl is not None and pl.scale is not None and quant != "none":
            scale = tensors[pl.scale].narrow(0, pl.scale_row, -(-spec.shape[0] // 128))
        elif target.dtype in (torch.float8_e4m3fn, torch.uint8, torch.int8) and quant != "none":
            sname = spec.param[: -len(".weight")] + ".scale" if spec.param.endswith(".weight") else spec.param + "_scale"
            if sname not in tensors:
                raise KeyError(f"native weight {spec.param} has no scale tensor {sname}")
            scale = tensors[sname]
        if spec.expert is None:
            v = _draw(spec.init, spec.shape, torch.Generator(DEV).manual_seed(_seed(seed, spec.param, 0)),
                      cfg.n_routed_experts)
            _store(target, scale, v.to(spec.storage) if quant == "none" else v, quant)
        else:
            n, per = cfg.n_routed_experts, spec.shape[0] * spec.shape[1]
            step = max(1, (1 << 27) // per)  # 512 MiB of fp32 per chunk
            for e0 in range(0, n, step):
                e1 = min(n, e0 + step)
                gen = torch.Generator(DEV).manual_seed(_seed(seed, spec.param, e0))
                v = _draw(spec.init, (e1 - e0, *spec.shape), gen, n)
                _store(target[e0:e1], None if scale is None else scale[e0:e1],
                       v.to(spec.storage) if quant == "none" else v, quant)
        filled.append(spec.param if pl is None else pl.param)
    return filled


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def random_loader(weights: str, seed: int) -> Callable:
    """A stand-in for ``dsv4.weights.load_weights`` (same call) that fills the model with random values."""
    @torch.no_grad()
    def load(model: torch.nn.Module, cfg: ModelConfig, model_dir: object, **_: object) -> None:
        tensors = model_tensors(model)
        filled = set(fill_weights(tensors, cfg, weights, seed))
        left = [n for n, p in model.named_parameters() if n not in filled and p.is_floating_point()
                and not n.endswith(("scale", "_scale"))]
        for n in left:  # parameters the checkpoint table does not know (e.g. fused at load): plain N(0, 1/fan_in)
            p = tensors[n]
            p.copy_(torch.randn(p.shape, device=p.device) * p.shape[-1] ** -0.5)
        if left:
            print(f"# note: {len(left)} parameters outside the checkpoint table filled N(0, 1/fan_in): {left[:4]}")
    return load
