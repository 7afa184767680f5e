"""The checkpoint tensor table of DeepSeek-V4 (DSV4_SPEC section 7): every tensor an official checkpoint holds for
a config, with its official name, logical shape, storage dtype, quantisation, the model ``state_dict`` entry it
fills and its tensor-parallel split; the attention input's fused projection group and where each of its tensors'
rows go. The loader (dsv4/weights.py) and the random-checkpoint writer (dsv4/checkpoint.py) both read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dsv4.config import CSA, SLIDING, ModelConfig
from dsv4.model.x_proj import XPart, x_layout, x_parts


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor.

    ``shape`` is the logical (dequantised) shape; ``param`` the model state_dict key it fills, at index
    ``expert`` of dim 0 when the parameter stacks experts. ``storage`` is the official unquantised dtype
    (bf16, fp32, or int64 for ``tid2eid``). ``quant``: "fp8" for the FP8 modules of spec 7.3, "expert" for
    routed experts (FP4 or FP8 per ``cfg.expert_dtype``), "none" otherwise. ``init`` tells the random
    writer how to draw it. ``split``: how tensor/expert parallelism cuts it, a group and a dim
    (dsv4/distributed/shard.py). ``group``: the attention prefix (``layers.{i}.attn.``) of the fused x projection
    this tensor is part ``part`` of (its row order there), "" for a tensor with a parameter of its own.
    """

    name: str
    shape: tuple[int, ...]
    param: str
    storage: torch.dtype
    quant: str = "none"
    expert: int | None = None
    init: str = "linear"
    split: str = ""
    group: str = ""
    part: int = 0


class Placement(NamedTuple):
    """Rows ``[row, row + n)`` of parameter ``param`` that a grouped checkpoint tensor fills (n: its rows); for a
    natively kept FP8 tensor also its 128-row scale blocks from ``scale_row`` of ``scale``."""

    param: str
    row: int
    scale: str | None = None
    scale_row: int = 0


def checkpoint_tensors(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor an official checkpoint for ``cfg`` holds, in a stable order, keyed by official name."""
    specs: dict[str, TensorSpec] = {}
    bf16, f32 = torch.bfloat16, torch.float32
    d, hc = cfg.hidden_size, cfg.hc_mult

    def add(name: str, shape: tuple[int, ...], storage: torch.dtype = bf16, quant: str = "none",
            init: str = "linear", param: str | None = None, expert: int | None = None, split: str = "") -> None:
        group, part = "", 0
        m = _X_PART.match(name)
        if m and m[2] in x_order.get(m[1], {}):
            group, part = m[1], x_order[m[1]][m[2]]
            assert not split, f"{name}: a fused projection part must be replicated"  # its rows are all loaded
        specs[name] = TensorSpec(name, shape, param or name, storage, quant, expert, init, split, group, part)

    x_order: dict[str, dict[str, int]] = {}  # attention prefix -> {x projection part: its row order}

    def hyper_head(p: str) -> None:
        add(f"{p}hc_head_fn", (hc, hc * d), f32, init="hc_fn")
        add(f"{p}hc_head_base", (hc,), f32, init="hc_base")
        add(f"{p}hc_head_scale", (1,), f32, init="hc_scale")

    def block(p: str, layer_id: int) -> None:
        kind, ratio = cfg.layer_kind(layer_id), cfg.layer_ratio(layer_id)
        for sub in ("attn", "ffn"):
            add(f"{p}hc_{sub}_fn", (cfg.mix_hc, hc * d), f32, init="hc_fn")
            add(f"{p}hc_{sub}_base", (cfg.mix_hc,), f32, init="hc_base")
            add(f"{p}hc_{sub}_scale", (3,), f32, init="hc_scale")
        add(f"{p}attn_norm.weight", (d,), init="norm")
        add(f"{p}ffn_norm.weight", (d,), init="norm")
        a, hd, ql = f"{p}attn.", cfg.head_dim, cfg.q_lora_rank
        x_order[a] = {part.name: j for j, part in enumerate(x_parts(cfg, layer_id))}
        add(f"{a}attn_sink", (cfg.num_heads,), f32, init="sink", split="tp0")
        add(f"{a}wq_a.weight", (ql, d), quant="fp8")
        add(f"{a}q_norm.weight", (ql,), init="norm")
        add(f"{a}wq_b.weight", (cfg.num_heads * hd, ql), quant="fp8", split="tp0")
        add(f"{a}wkv.weight", (hd, d), quant="fp8")
        add(f"{a}kv_norm.weight", (hd,), init="norm")
        g_rank = cfg.o_groups * cfg.o_lora_rank
        add(f"{a}wo_a.weight", (g_rank, cfg.num_heads * hd // cfg.o_groups), quant="fp8", split="tp0")
        add(f"{a}wo_b.weight", (d, g_rank), quant="fp8", split="tp1")
        if kind != SLIDING:
            c = 2 if kind == CSA else 1  # CSA compressors keep two overlapping window halves
            compressor(f"{a}compressor.", c * hd, hd, ratio)
        if kind == CSA:
            ni, di = cfg.index_n_heads, cfg.index_head_dim
            add(f"{a}indexer.wq_b.weight", (ni * di, ql), quant="fp8")
            add(f"{a}indexer.weights_proj.weight", (ni, d))
            compressor(f"{a}indexer.compressor.", 2 * di, di, ratio)
        f, e, inter = f"{p}ffn.", cfg.n_routed_experts, cfg.moe_intermediate_size
        add(f"{f}gate.weight", (e, d))
        if cfg.is_hash_layer(layer_id):
            add(f"{f}gate.tid2eid", (cfg.vocab_size, cfg.num_experts_per_tok), torch.int64, init="tid2eid")
        else:
            add(f"{f}gate.bias", (e,), f32, init="bias")
        for w, shape in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d))):
            for j in range(e):
                add(f"{f}experts.{j}.{w}.weight", shape, quant="expert", param=f"{f}experts.{w}", expert=j,
                    split="moe1" if w == "w2" else "moe0")
        if cfg.n_shared_experts:
            si = cfg.n_shared_experts * inter
            for w, shape in (("w1", (si, d)), ("w2", (d, si)), ("w3", (si, d))):
                add(f"{f}shared_experts.{w}.weight", shape, quant="fp8", split="world1" if w == "w2" else "world0")

    def compressor(p: str, width: int, norm_dim: int, ratio: int) -> None:
        add(f"{p}wkv.weight", (width, d))
        add(f"{p}wgate.weight", (width, d))
        add(f"{p}ape", (ratio, width), f32, init="ape")
        add(f"{p}norm.weight", (norm_dim,), init="norm")

    add("embed.weight", (cfg.vocab_size, d), init="embed", split="vocab0")
    for i in range(cfg.num_layers):
        block(f"layers.{i}.", i)
    for j, layer_id in enumerate(cfg.mtp_layer_ids):
        p = f"mtp.{j}."
        add(f"{p}e_proj.weight", (d, d), quant="fp8")
        add(f"{p}h_proj.weight", (d, d), quant="fp8")
        for n in ("enorm", "hnorm", "norm"):
            add(f"{p}{n}.weight", (d,), init="norm")
        hyper_head(p)
        block(p, layer_id)
    add("norm.weight", (d,), init="norm")
    hyper_head("")
    add("head.weight", (cfg.vocab_size, d), split="vocab0")
    return specs


_X_PART = re.compile(r"^(.*\.attn\.)(.+)\.weight$")


def fused_placements(specs: dict[str, TensorSpec], weight_format: str = "dequant") -> dict[str, Placement]:
    """Where each grouped tensor of ``specs`` goes (:class:`Placement`, absolute names), keyed by tensor name:
    dsv4.model.x_proj.x_layout of its group's parts under ``weight_format``."""
    groups: dict[str, list[TensorSpec]] = {}
    for s in specs.values():
        if s.group:
            groups.setdefault(s.group, []).append(s)
    out: dict[str, Placement] = {}
    for prefix, members in groups.items():
        members.sort(key=lambda s: s.part)
        parts = {s.name[len(prefix): -len(".weight")]: s for s in members}
        layout = x_layout([XPart(n, s.shape[0], s.quant == "fp8", False) for n, s in parts.items()],
                          weight_format == "native")
        for n, pl in layout.items():
            out[parts[n].name] = Placement(prefix + pl.param, pl.row, pl.scale and prefix + pl.scale, pl.scale_row)
    return out


def spec_view(state: dict[str, torch.Tensor], spec: TensorSpec, placed: dict[str, Placement]) -> torch.Tensor:
    """The view of a model state dict that checkpoint tensor ``spec`` fills: its rows of a fused parameter (``placed``
    from :func:`fused_placements`), its expert of a stacked one, or the whole parameter."""
    pl = placed.get(spec.name)
    if pl is not None:
        return state[pl.param][pl.row : pl.row + spec.shape[0]]
    t = state[spec.param]
    return t if spec.expert is None else t[spec.expert]
