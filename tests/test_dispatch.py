"""The op dispatcher: chosen once at model build, shared by every layer, validated."""

from __future__ import annotations

import pytest
import torch
from oracle import tiny_config

from dsv4.model.deepseek_v4 import DeepseekV4
from dsv4.model.layers import ModelOptions
from dsv4.ops import attention, qkv
from dsv4.ops.dispatch import get_ops, resolve_ops


def test_auto_resolves_by_device():
    want = "triton" if torch.cuda.is_available() else "ref"
    assert resolve_ops("auto") == want
    assert get_ops("auto") is get_ops(want)


def test_bad_name_rejected():
    with pytest.raises(ValueError, match="ops must be one of"):
        resolve_ops("cuda")


def test_model_resolves_once_and_layers_share_the_set():
    m = DeepseekV4(tiny_config(), torch.float32, ModelOptions(quant_sim=False, ops="ref"), with_mtp=True)
    assert m.opts.ops == "ref"
    sets = {id(layer.attn.ops) for layer in m.layers} | {id(b.attn.ops) for b in m.mtp}
    assert len(sets) == 1
    ops = m.layers[0].attn.ops
    assert ops.paged_sparse_attention is attention.paged_sparse_attention and ops.q_norm_rope is qkv.q_norm_rope


def test_triton_set_has_the_reference_signatures():
    pytest.importorskip("triton")
    import inspect

    ref, tri = get_ops("ref"), get_ops("triton")
    for name in ("q_norm_rope", "kv_norm_rope_store", "store_ring", "paged_sparse_attention", "act_quant",
                 "act_quant_sim", "act_dequant"):
        p_ref = list(inspect.signature(getattr(ref, name)).parameters)
        p_tri = list(inspect.signature(getattr(tri, name)).parameters)
        assert p_tri[: len(p_ref)] == p_ref, name  # kernels may only add trailing tuning keywords


def test_auto_follows_the_model_device() -> None:
    # a model built on the CPU runs the references even on a machine with a GPU
    assert resolve_ops("auto", "cpu") == "ref"
    with torch.device("cpu"):
        from oracle import tiny_config

        from dsv4.model.deepseek_v4 import DeepseekV4
        from dsv4.model.layers import ModelOptions

        assert DeepseekV4(tiny_config(), opts=ModelOptions(ops="auto"), with_mtp=False).opts.ops == "ref"
