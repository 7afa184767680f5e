"""Native weights (weight_format "native"): FP8 linears and FP8/FP4 routed experts keep the checkpoint's bytes,
with their scales converted exactly to fp32; the model's logits equal the dequantized + act_quant path; errors
name the tensor, the file or the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from harness import new_cache, rel_err, run_chunks
from safetensors.torch import load_file, save_file

from dsv4 import LLM, EngineConfig, SamplingParams
from dsv4.checkpoint import write_random_checkpoint
from dsv4.config import CSA, HCA, SLIDING, ModelConfig, QuantConfig
from dsv4.embedded import embedded_model_config
from dsv4.model.deepseek_v4 import DeepseekV4
from dsv4.model.layers import ModelOptions
from dsv4.ops.quant import dequantize_fp8_block, e8m0_to_float
from dsv4.weights import (
    WeightFormatError,
    WeightLoadError,
    check_weight_format,
    checkpoint_tensors,
    fused_placements,
    keeps_native,
    load_weights,
    parameter_shapes,
)

TINY = embedded_model_config()
# widths above 128 and not multiples of it: several FP8 scale blocks, partial edge blocks
WIDE = TINY.replace(hidden_size=160, moe_intermediate_size=160, n_routed_experts=4, q_lora_rank=192,
                    num_layers=3, layer_kinds=(SLIDING, CSA, HCA), compress_ratios=(0, 4, 8), num_hash_layers=1)
# wq_a 256 + wkv 128 rows: whole 128-row scale blocks, so the native FP8 parts share one fused weight
ALIGNED = WIDE.replace(q_lora_rank=256, head_dim=128)
NATIVE_DTYPES = (torch.float8_e4m3fn, torch.uint8)


class StandIn(torch.nn.Module):
    """A module with exactly the state_dict the native table describes (poisoned until loaded)."""

    def __init__(self, cfg: ModelConfig, weight_format: str = "native") -> None:
        super().__init__()
        for name, (shape, dtype) in parameter_shapes(cfg, weight_format).items():
            *path, leaf = name.split(".")
            mod: torch.nn.Module = self
            for part in path:
                if part not in mod._modules:
                    mod.add_module(part, torch.nn.Module())
                mod = mod._modules[part]  # type: ignore[assignment]
            if dtype in NATIVE_DTYPES:
                t = torch.full(shape, 0x7F, dtype=torch.uint8).view(dtype)  # e4m3 NaN / an unlikely byte
            elif dtype.is_floating_point:
                t = torch.full(shape, float("nan"))
            else:
                t = torch.full(shape, -1, dtype=torch.int64)
            mod.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))


def _load(cfg: ModelConfig, path: Path, weight_format: str = "native") -> dict[str, torch.Tensor]:
    m = StandIn(cfg, weight_format)
    load_weights(m, cfg, path, progress=False, weight_format=weight_format)
    return m.state_dict()


def _part(sd: dict[str, torch.Tensor], spec, placed: dict, scale: bool = False) -> torch.Tensor:
    """What checkpoint tensor ``spec`` (or its scale) filled: its rows of a fused parameter, its expert, or all."""
    pl = placed.get(spec.name)
    if pl is not None:
        if scale:
            return sd[pl.scale][pl.scale_row: pl.scale_row + -(-spec.shape[0] // 128)]
        return sd[pl.param][pl.row: pl.row + spec.shape[0]]
    name = spec.param
    if scale:
        name = spec.param + "_scale" if spec.expert is not None else spec.param[: -len("weight")] + "scale"
    return sd[name] if spec.expert is None else sd[name][spec.expert]


def _stored(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in path.glob("*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize(
    "cfg,shard_bytes",
    [
        (WIDE.replace(quantization=QuantConfig(), expert_dtype="fp4"), 1 << 30),
        (WIDE.replace(quantization=QuantConfig(), expert_dtype="fp8"), 48 << 10),
        (WIDE.replace(quantization=QuantConfig(scale_fmt=None), expert_dtype="fp8"), 1 << 30),
        (ALIGNED.replace(quantization=QuantConfig(), expert_dtype="fp8"), 1 << 30),
    ],
    ids=["fp8+fp4", "fp8+fp8-sharded", "fp8-fp32-scales", "fp8-fused-x-proj"],
)
def test_native_load_keeps_bytes(tmp_path: Path, cfg: ModelConfig, shard_bytes: int) -> None:
    ckpt = write_random_checkpoint(cfg, tmp_path / "ckpt", seed=int(torch.randint(0, 1 << 30, ())),
                                   shard_bytes=shard_bytes)
    got = _load(cfg, ckpt)
    dequant = _load(cfg, ckpt, "dequant")
    stored = _stored(ckpt)
    specs = checkpoint_tensors(cfg)
    placed, placed_dq = fused_placements(specs, "native"), fused_placements(specs, "dequant")
    n_native = 0
    for spec in specs.values():
        if not keeps_native(spec, "native"):
            assert torch.equal(_part(got, spec, placed), _part(dequant, spec, placed_dq)), spec.name
            continue
        n_native += 1
        w, s = _part(got, spec, placed), _part(got, spec, placed, scale=True)
        file_w = stored[spec.name]
        file_s = stored[spec.name[: -len("weight")] + "scale"]
        assert w.dtype == (torch.uint8 if file_w.dtype == torch.int8 else torch.float8_e4m3fn), spec.name
        assert torch.equal(w.view(torch.uint8), file_w.view(torch.uint8)), spec.name
        assert s.dtype == torch.float32 and torch.equal(s, e8m0_to_float(file_s)), spec.name
    # every FP8 module (wo_a too: weight-only, see fp8_grouped_linear), every expert matrix
    assert n_native == sum(s.quant in ("expert", "fp8") for s in checkpoint_tensors(cfg).values())
    assert got["layers.1.attn.wo_a.weight"].dtype == torch.float8_e4m3fn and "layers.1.attn.wo_a.scale" in got


def test_native_parameter_table() -> None:
    cfg = WIDE.replace(quantization=QuantConfig(), expert_dtype="fp4")
    shapes = parameter_shapes(cfg, "native")
    assert shapes["layers.0.attn.wq_a.weight"] == ((192, 160), torch.float8_e4m3fn)
    assert shapes["layers.0.attn.wq_a.scale"] == ((2, 2), torch.float32)
    assert shapes["layers.1.attn.indexer.wq_b.scale"][0] == (2, 2)  # 8 heads x 32 = 256 rows
    assert shapes["mtp.0.e_proj.weight"] == ((160, 160), torch.float8_e4m3fn)
    assert shapes["mtp.0.ffn.shared_experts.w2.scale"][0] == (2, 2)
    assert shapes["layers.0.ffn.experts.w1"] == ((4, 160, 80), torch.uint8)
    assert shapes["layers.0.ffn.experts.w2_scale"] == ((4, 160, 5), torch.float32)
    assert shapes["layers.0.attn.wo_a.weight"][1] == torch.float8_e4m3fn and "layers.0.attn.wo_a.scale" in shapes
    fp8 = parameter_shapes(cfg.replace(expert_dtype="fp8"), "native")
    assert fp8["layers.2.ffn.experts.w2"] == ((4, 160, 160), torch.float8_e4m3fn)
    assert fp8["layers.2.ffn.experts.w2_scale"] == ((4, 2, 2), torch.float32)


def _model(cfg: ModelConfig, ckpt: Path, weight_format: str, ops: str) -> DeepseekV4:
    opts = ModelOptions(quant_sim=True, act_quant=True, ops=ops, weight_format=weight_format)
    m = DeepseekV4(cfg, torch.float32, opts, with_mtp=False).eval()
    load_weights(m, cfg, ckpt, progress=False, weight_format=weight_format)
    return m


def _logits(m: DeepseekV4, cfg: ModelConfig, ids: list[int], chunks: list[int]) -> torch.Tensor:
    cache, mgr = new_cache(cfg, max_seq=64)
    with torch.no_grad():
        return run_chunks(m, cache, mgr, mgr.alloc(), ids, chunks)


@pytest.mark.parametrize("expert_dtype", ["fp8", "fp4"])
def test_native_model_logits_equal_dequant(tmp_path: Path, expert_dtype: str) -> None:
    cfg = TINY.replace(quantization=QuantConfig(), expert_dtype=expert_dtype)
    ckpt = write_random_checkpoint(cfg, tmp_path / "ckpt", seed=int(torch.randint(0, 1 << 30, ())))
    native = _model(cfg, ckpt, "native", "ref")
    assert native.layers[0].attn.wq_b.weight.dtype == torch.float8_e4m3fn
    assert native.layers[1].attn.indexer.wq_b.scale.dtype == torch.float32
    assert native.layers[0].ffn.experts.w1.dtype == (torch.uint8 if expert_dtype == "fp4" else torch.float8_e4m3fn)
    ids = torch.randint(0, cfg.vocab_size, (30,)).tolist()
    chunks = [20, 1, 1, 8]
    want = _logits(_model(cfg, ckpt, "dequant", "ref"), cfg, ids, chunks)
    got = _logits(native, cfg, ids, chunks)
    # the same products summed in another order (fp32)
    assert rel_err(got, want).max() <= 1e-5


def test_native_model_triton_kernel(tmp_path: Path) -> None:
    """The FP8 GEMM kernel (interpreter on CPU) inside the model, against the native reference path."""
    pytest.importorskip("triton")
    # one sliding layer keeps the interpreter's share (every other kernel runs in it too) small
    cfg = TINY.replace(quantization=QuantConfig(), expert_dtype="fp8", num_layers=1, layer_kinds=(SLIDING,),
                       compress_ratios=(0,), num_hash_layers=1)
    ckpt = write_random_checkpoint(cfg, tmp_path / "ckpt", seed=int(torch.randint(0, 1 << 30, ())))
    ref = _model(cfg, ckpt, "native", "ref")
    tri = _model(cfg, ckpt, "native", "triton")
    assert tri.layers[0].attn.wq_a.fp8_ops.name == "triton"
    ids = torch.randint(0, cfg.vocab_size, (6,)).tolist()
    assert rel_err(_logits(tri, cfg, ids, [5, 1]), _logits(ref, cfg, ids, [5, 1])).max() <= 1e-5


# ---- errors -------------------------------------------------------------------------------------------
def test_native_needs_a_quantized_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(WeightFormatError, match="not quantized"):
        check_weight_format(TINY, "native")
    with pytest.raises(WeightFormatError, match="block"):
        check_weight_format(TINY.replace(quantization=QuantConfig(block_size=(64, 64)), expert_dtype="fp8"), "native")
    with pytest.raises(WeightFormatError, match="one of"):
        check_weight_format(TINY, "fp8")
    with pytest.raises(ValueError, match="weight_format"):
        ModelOptions(weight_format="fp8")
    assert ModelOptions(weight_format="native").act_quant  # native GEMMs always quantize their inputs
    ckpt = write_random_checkpoint(TINY, tmp_path / "bf16")
    with pytest.raises(WeightFormatError, match="not quantized"):
        load_weights(StandIn(TINY, "dequant"), TINY, ckpt, progress=False, weight_format="native")
    # the engine says so before building anything
    with pytest.raises(ValueError, match="not quantized"):
        LLM(EngineConfig(model=str(ckpt), weight_format="native", device="cpu"))


def test_native_errors_name_tensor_and_file(tmp_path: Path) -> None:
    cfg = TINY.replace(quantization=QuantConfig(), expert_dtype="fp4")
    ckpt = write_random_checkpoint(cfg, tmp_path / "q")
    f = ckpt / "model.safetensors"
    original = load_file(f)

    # a model built for dequantized weights cannot take native bytes
    m = DeepseekV4(cfg, torch.float32, ModelOptions(ops="ref"), with_mtp=False)
    with pytest.raises(WeightLoadError, match=r"'layers\.0\.attn\.wq_a\.weight'.*float8_e4m3fn"):
        load_weights(m, cfg, ckpt, progress=False, weight_format="native")

    # an FP8 module stored dequantized loads with "dequant" only
    t = dict(original)
    key = "layers.1.attn.wkv.weight"
    t[key] = dequantize_fp8_block(t[key], t.pop("layers.1.attn.wkv.scale")).to(torch.bfloat16)
    save_file(t, f)
    with pytest.raises(WeightLoadError) as e:
        load_weights(StandIn(cfg), cfg, ckpt, progress=False, weight_format="native")
    for needle in (f"'{key}'", str(f), "BF16", "native"):
        assert needle in str(e.value)
    _load(cfg, ckpt, "dequant")

    # FP4 experts in config.json but FP8 expert tensors on disk
    save_file(original, f)
    fp8_dir = write_random_checkpoint(cfg.replace(expert_dtype="fp8"), tmp_path / "fp8experts")
    with pytest.raises(WeightLoadError, match=r"experts\.0\.w1\.weight.*F8_E4M3.*FP4"):
        load_weights(StandIn(cfg), cfg, fp8_dir, progress=False, weight_format="native")


def test_engine_native_generates_like_dequant(tmp_path: Path) -> None:
    cfg = TINY.replace(quantization=QuantConfig(), expert_dtype="fp4", num_mtp_layers=0)
    ckpt = write_random_checkpoint(cfg, tmp_path / "q", seed=7)
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    prompts: list[str | list[int]] = [[0, 5, 9, 200, 31], [0] + list(range(40, 70))]
    outs = {}
    for fmt in ("dequant", "native"):
        llm = LLM(EngineConfig(model=str(ckpt), weight_format=fmt, device="cpu", max_running_requests=2))
        outs[fmt] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs["native"] == outs["dequant"]
