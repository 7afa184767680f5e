"""Choose the implementation of the hot ops once, when the model is built: Triton kernels on CUDA, the
PyTorch references elsewhere (``ModelOptions.ops``: "auto" | "ref" | "triton").

The model holds the :class:`OpSet` it was given and calls through it; nothing decides per call. Each entry
of the Triton set has the same signature as its reference (the kernel modules sit beside the references in
``dsv4/ops``). "triton" on a machine without a GPU runs the kernels in Triton's interpreter (tests only:
``TRITON_INTERPRET=1`` must be set before triton is imported).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

OPS_CHOICES = ("auto", "ref", "triton")


@dataclass(frozen=True)
class OpSet:
    """The model's hot ops. Signatures: see the references named in each field's comment."""

    name: str
    q_norm_rope: Callable  # dsv4.ops.qkv.q_norm_rope
    kv_norm_rope_store: Callable  # dsv4.ops.qkv.kv_norm_rope_store
    store_ring: Callable  # dsv4.ops.qkv.store_ring
    paged_sparse_attention: Callable  # dsv4.ops.attention.paged_sparse_attention
    act_quant: Callable  # dsv4.ops.quant.act_quant
    act_quant_sim: Callable  # dsv4.ops.quant.act_quant_sim
    act_dequant: Callable  # dsv4.ops.quant.act_dequant
    fp8_linear: Callable  # dsv4.ops.fp8_gemm.fp8_linear
    fp8_grouped_linear: Callable  # dsv4.ops.fp8_gemm.fp8_grouped_linear
    route_scored: Callable  # dsv4.ops.moe.route_scored
    route_hash: Callable  # dsv4.ops.moe.route_hash
    moe_experts: Callable  # dsv4.ops.moe.moe_experts
    rms_norm: Callable  # dsv4.ops.norm.rms_norm
    rms_norm_quant: Callable  # dsv4.ops.norm.rms_norm_quant
    rms_norm_quant_sim: Callable  # dsv4.ops.norm.rms_norm_quant_sim
    hc_pre_norm: Callable  # dsv4.ops.hyper.hc_pre_norm
    hc_post: Callable  # dsv4.ops.hyper.hc_post
    hc_post_pre_norm: Callable  # dsv4.ops.hyper.hc_post_pre_norm
    hc_head: Callable  # dsv4.ops.hyper.hc_head
    compress_update: Callable  # dsv4.ops.compressor.compress_update
    indexer_topk: Callable  # dsv4.ops.indexer.indexer_topk
    indexer_q: Callable  # dsv4.ops.indexer.indexer_q


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_ops(name: str, device: torch.device | str | None = None) -> str:
    """"auto" -> "triton" when the model lives on a CUDA device (``device``; None means "whatever CUDA is
    available", the old rule) and triton is present, else "ref"; the others are checked."""
    if name not in OPS_CHOICES:
        raise ValueError(f"ops must be one of {OPS_CHOICES}, got {name!r}")
    if name == "auto":
        on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        return "triton" if on_cuda and triton_available() else "ref"
    if name == "triton" and not triton_available():
        raise RuntimeError("ops='triton' needs the triton package")
    return name


def get_ops(name: str = "auto") -> OpSet:
    """The op set for ``name`` (resolved as :func:`resolve_ops` does); one shared object per implementation."""
    return _build(resolve_ops(name))


@functools.cache
def _build(name: str) -> OpSet:
    if name == "ref":
        from dsv4.ops import attention, compressor, fp8_gemm, hyper, indexer, moe, norm, qkv, quant

        return OpSet("ref", qkv.q_norm_rope, qkv.kv_norm_rope_store, qkv.store_ring,
                     attention.paged_sparse_attention, quant.act_quant, quant.act_quant_sim, quant.act_dequant,
                     fp8_linear=fp8_gemm.fp8_linear, fp8_grouped_linear=fp8_gemm.fp8_grouped_linear,
                     hc_pre_norm=hyper.hc_pre_norm, hc_post=hyper.hc_post, hc_post_pre_norm=hyper.hc_post_pre_norm,
                     hc_head=hyper.hc_head, compress_update=compressor.compress_update,
                     route_scored=moe.route_scored, route_hash=moe.route_hash,
                     moe_experts=moe.moe_experts, rms_norm=norm.rms_norm,
                     rms_norm_quant=norm.rms_norm_quant, rms_norm_quant_sim=norm.rms_norm_quant_sim,
                     indexer_topk=indexer.indexer_topk, indexer_q=indexer.indexer_q)
    from dsv4.ops import (
        attention_mq_triton,
        compressor_triton,
        fp8_gemm_triton,
        hyper_triton,
        indexer_triton,
        moe_triton,
        norm_triton,
        qkv_triton,
        quant_triton,
        routing_triton,
    )

    return OpSet("triton", qkv_triton.q_norm_rope, qkv_triton.kv_norm_rope_store, qkv_triton.store_ring,
                 attention_mq_triton.paged_sparse_attention, quant_triton.act_quant, quant_triton.act_quant_sim,
                 quant_triton.act_dequant, fp8_linear=fp8_gemm_triton.fp8_linear,
                 fp8_grouped_linear=fp8_gemm_triton.fp8_grouped_linear,
                 hc_pre_norm=hyper_triton.hc_pre_norm, hc_post=hyper_triton.hc_post,
                 hc_post_pre_norm=hyper_triton.hc_post_pre_norm, hc_head=hyper_triton.hc_head,
                 compress_update=compressor_triton.compress_update,
                 route_scored=routing_triton.route_scored, route_hash=routing_triton.route_hash,
                 moe_experts=moe_triton.moe_experts,
                 rms_norm=norm_triton.rms_norm, rms_norm_quant=norm_triton.rms_norm_quant,
                 rms_norm_quant_sim=norm_triton.rms_norm_quant_sim, indexer_topk=indexer_triton.indexer_topk,
                 indexer_q=indexer_triton.indexer_q)
