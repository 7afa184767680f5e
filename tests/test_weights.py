"""Checkpoint table, random writer and loader, against a stand-in module with the official names."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv4.checkpoint import random_tensor, write_random_checkpoint
from dsv4.config import CSA, HCA, SLIDING, ModelConfig, QuantConfig, flash_config, pro_config
from dsv4.embedded import embedded_model_config, embedded_model_dir, random_model_dir
from dsv4.ops.quant import dequantize_fp4_block, dequantize_fp8_block, quantize_fp4_block, quantize_fp8_block
from dsv4.weights import (
    TensorSpec,
    WeightLoadError,
    canonical_name,
    checkpoint_tensors,
    fused_placements,
    load_weights,
    parameter_shapes,
    spec_view,
)

TINY = embedded_model_config()
# Dims above and not multiple of 128, so FP8 scales have several (partial) blocks.
WIDE = TINY.replace(hidden_size=160, moe_intermediate_size=160, n_routed_experts=4, q_lora_rank=192,
                    num_layers=3, layer_kinds=(SLIDING, CSA, HCA), compress_ratios=(0, 4, 8), num_hash_layers=1)


class StandIn(torch.nn.Module):
    """A module with exactly the state_dict the table describes (NaN / -1 filled until loaded)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        for name, (shape, official) in parameter_shapes(cfg).items():
            *path, leaf = name.split(".")
            mod: torch.nn.Module = self
            for part in path:
                if part not in mod._modules:
                    mod.add_module(part, torch.nn.Module())
                mod = mod._modules[part]  # type: ignore[assignment]
            if official.is_floating_point:
                mod.register_parameter(leaf, torch.nn.Parameter(torch.full(shape, float("nan"), dtype=dtype)))
            else:
                mod.register_buffer(leaf, torch.full(shape, -1, dtype=torch.int64))


def reference(spec: TensorSpec, fmt: str, cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    """What loading must produce for ``spec``: the writer's draw after its storage rounding."""
    v = random_tensor(spec, seed, cfg)
    if fmt == "fp8":
        q = cfg.quantization or QuantConfig()
        return dequantize_fp8_block(*quantize_fp8_block(v, q.block_size, q.scale_fmt), q.block_size)
    if fmt == "fp4":
        return dequantize_fp4_block(*quantize_fp4_block(v))
    return v.to(spec.storage).to(torch.float32 if spec.storage.is_floating_point else torch.int64)


def by_name(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The loaded model's tensors under their checkpoint names (fused rows and stacked experts included)."""
    sd, specs = model.state_dict(), checkpoint_tensors(cfg)
    placed = fused_placements(specs)
    out = {n: spec_view(sd, s, placed) for n, s in specs.items() if s.expert is None}
    return {**sd, **out}


def check_loaded(model: StandIn, cfg: ModelConfig, quantize: bool, seed: int = 0) -> None:
    sd = model.state_dict()
    specs = checkpoint_tensors(cfg)
    placed = fused_placements(specs)
    for spec in specs.values():
        fmt = "plain"
        if quantize and spec.quant == "fp8":
            fmt = "fp8"
        elif quantize and spec.quant == "expert":
            fmt = "fp4" if cfg.expert_dtype == "fp4" else "fp8"
        got = spec_view(sd, spec, placed)
        want = reference(spec, fmt, cfg, seed).to(got.dtype)
        assert torch.equal(got, want), spec.name


def load(cfg: ModelConfig, path: Path, dtype: torch.dtype = torch.float32) -> StandIn:
    m = StandIn(cfg, dtype)
    load_weights(m, cfg, path, progress=False)
    return m


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


# ---- table ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cfg", "count"), [(flash_config(), 69187), (pro_config(), 145116)])
def test_table_reproduces_official_tensor_counts(cfg: ModelConfig, count: int) -> None:
    specs = checkpoint_tensors(cfg)
    stored = len(specs) + sum(s.quant != "none" for s in specs.values())  # weights plus their .scale
    assert stored == count
    s = specs["layers.2.attn.compressor.ape"]
    assert s.shape == (4, 1024) and s.storage == torch.float32
    assert specs["layers.0.ffn.gate.tid2eid"].shape == (129280, 6)
    assert "layers.3.ffn.gate.bias" in specs and "layers.3.ffn.gate.tid2eid" not in specs


def test_parameter_shapes_stack_experts() -> None:
    shapes = parameter_shapes(TINY)
    assert shapes["layers.0.ffn.experts.w1"] == ((8, 32, 64), torch.bfloat16)
    assert shapes["layers.0.ffn.experts.w2"] == ((8, 64, 32), torch.bfloat16)
    assert shapes["mtp.0.ffn.experts.w3"][0] == (8, 32, 64)
    assert shapes["layers.2.attn.compressor.ape"][0] == (16, 64)  # HCA: one window half
    assert shapes["layers.1.attn.compressor.ape"][0] == (4, 128)  # CSA: two overlapping halves
    assert shapes["layers.1.attn.wo_a.weight"][0] == (64, 128)
    assert "mtp.0.ffn.gate.bias" in shapes and "mtp.0.attn.compressor.ape" not in shapes


# ---- round trips --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cfg", "quantize", "shard_bytes"),
    [
        (TINY, False, 1 << 30),
        (WIDE.replace(quantization=QuantConfig(), expert_dtype="fp4"), True, 1 << 30),
        (WIDE.replace(quantization=QuantConfig(), expert_dtype="fp8"), True, 1 << 30),
        (WIDE.replace(quantization=QuantConfig(), expert_dtype="fp4"), True, 48 << 10),
        (TINY, False, 64 << 10),
        (WIDE.replace(quantization=QuantConfig(scale_fmt=None), expert_dtype="fp8"), True, 1 << 30),
    ],
    ids=["bf16", "fp8+fp4", "fp8+fp8", "fp8+fp4-sharded", "bf16-sharded", "fp8-fp32-scales"],
)
def test_write_load_round_trip(tmp_path: Path, cfg: ModelConfig, quantize: bool, shard_bytes: int) -> None:
    out = write_random_checkpoint(cfg, tmp_path / "ckpt", seed=3, quantize=quantize, shard_bytes=shard_bytes)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if shard_bytes < 1 << 20:
        assert len(files) > 2 and (out / "model.safetensors.index.json").exists()
        assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    else:
        assert files == ["model.safetensors"]
    assert ModelConfig.from_json(out) == cfg  # config.json describes the files
    if quantize:
        dtypes = {}
        for fname in files:
            with safe_open(str(out / fname), "pt") as f:
                dtypes.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
        assert dtypes["layers.1.attn.wq_b.weight"] == "F8_E4M3"
        assert dtypes["layers.1.attn.wq_b.scale"] == ("F8_E8M0" if cfg.quantization.scale_fmt else "F32")
        want = "I8" if cfg.expert_dtype == "fp4" else "F8_E4M3"
        assert dtypes["layers.0.ffn.experts.1.w2.weight"] == want
        assert dtypes["layers.1.attn.compressor.wkv.weight"] == "BF16"
    check_loaded(load(cfg, out), cfg, quantize, seed=3)


def test_load_into_bf16_params(tmp_path: Path) -> None:
    cfg = WIDE.replace(quantization=QuantConfig(), expert_dtype="fp4")
    out = write_random_checkpoint(cfg, tmp_path / "ckpt")
    m = load(cfg, out, torch.bfloat16)
    assert m.state_dict()["layers.0.attn.x_proj.weight"].dtype == torch.bfloat16
    check_loaded(m, cfg, True)  # FP8/FP4 values times pow2 scales are exact in bf16


def test_determinism(tmp_path: Path) -> None:
    a = write_random_checkpoint(TINY, tmp_path / "a", seed=5, shard_bytes=200 << 10)
    b = write_random_checkpoint(TINY, tmp_path / "b", seed=5, shard_bytes=200 << 10)
    c = write_random_checkpoint(TINY, tmp_path / "c", seed=6, shard_bytes=200 << 10)
    assert tree_hash(a) == tree_hash(b) != tree_hash(c)
    with pytest.raises(FileExistsError):
        write_random_checkpoint(TINY, a)


def test_random_init_is_sane() -> None:
    specs = checkpoint_tensors(TINY)
    tid = random_tensor(specs["layers.0.ffn.gate.tid2eid"], 0, TINY)
    assert tid.dtype == torch.int64 and int(tid.min()) >= 0 and int(tid.max()) < 8
    assert all(len(set(row)) == 2 for row in tid.tolist())
    for name in ("layers.0.hc_attn_base", "layers.0.attn.attn_sink", "layers.1.attn.compressor.ape",
                 "layers.3.ffn.gate.bias", "hc_head_scale"):
        assert (random_tensor(specs[name], 0, TINY) != 0).all(), name


def test_embedded_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = random_model_dir()
    assert embedded_model_dir() == d  # DSV4_EMBEDDED=random (conftest)
    assert d.parent == tmp_path / "dsv4" and d.name.startswith("embedded-")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert random_model_dir() == d and (d / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "dsv4").iterdir()] == [d.name]  # no temp dirs left behind
    cfg = ModelConfig.from_json(d)
    assert cfg == TINY and cfg.layer_kinds == (SLIDING, CSA, HCA, CSA) and cfg.compress_ratios == (0, 4, 16, 4)
    assert "layer_types" in json.loads((d / "config.json").read_text())  # ratio 16: transformers spelling
    check_loaded(load(cfg, d), cfg, False)


# ---- transformers interop -----------------------------------------------------------------------------
def _hf_model(cfg: ModelConfig) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**cfg.to_hf_dict()))
    with torch.no_grad():
        for name, t in m.state_dict(keep_vars=True).items():
            if name.endswith("tid2eid"):
                t.copy_(torch.randint(0, cfg.n_routed_experts, t.shape))
            else:
                t.normal_()
    return m


def test_load_transformers_save_pretrained(tmp_path: Path) -> None:
    hf = _hf_model(TINY)
    hf.save_pretrained(tmp_path / "hf")
    keys = set(load_file(tmp_path / "hf" / "model.safetensors"))
    assert {"model.embed_tokens.weight", "model.hc_head.hc_fn", "model.layers.0.attn.norm.weight"} <= keys
    assert not any(canonical_name(k) == k for k in keys if k.startswith("model.embed"))
    # transformers drops the MTP block: loading into a model with one names it and says what to do.
    with pytest.raises(WeightLoadError, match=r"mtp\.0\..*num_mtp_layers=0"):
        load(TINY, tmp_path / "hf")
    cfg = TINY.replace(num_mtp_layers=0)
    ours = by_name(load(cfg, tmp_path / "hf"), cfg)
    theirs = hf.state_dict()
    i = cfg.moe_intermediate_size
    pairs = {
        "embed.weight": "model.embed_tokens.weight",
        "head.weight": "lm_head.weight",
        "norm.weight": "model.norm.weight",
        "hc_head_fn": "model.hc_head.hc_fn",
        "hc_head_scale": "model.hc_head.hc_scale",
        "layers.1.attn.kv_norm.weight": "model.layers.1.self_attn.kv_norm.weight",
        "layers.1.attn.compressor.norm.weight": "model.layers.1.self_attn.compressor.kv_norm.weight",
        "layers.1.attn.indexer.compressor.ape": "model.layers.1.self_attn.compressor.indexer.position_bias",
        "layers.1.attn.indexer.wq_b.weight": "model.layers.1.self_attn.compressor.indexer.q_b_proj.weight",
        # rows of the fused x projection
        "layers.1.attn.wq_a.weight": "model.layers.1.self_attn.q_a_proj.weight",
        "layers.1.attn.wkv.weight": "model.layers.1.self_attn.kv_proj.weight",
        "layers.1.attn.compressor.wgate.weight": "model.layers.1.self_attn.compressor.gate_proj.weight",
        "layers.1.attn.indexer.weights_proj.weight": "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight",
        "layers.1.attn.indexer.compressor.wkv.weight": "model.layers.1.self_attn.compressor.indexer.kv_proj.weight",
        "layers.2.hc_ffn_fn": "model.layers.2.ffn_hc.fn",
        "layers.2.ffn.gate.bias": "model.layers.2.mlp.gate.e_score_correction_bias",
        "layers.0.ffn.gate.tid2eid": "model.layers.0.mlp.gate.tid2eid",
        "layers.3.ffn.shared_experts.w2.weight": "model.layers.3.mlp.shared_experts.down_proj.weight",
        "layers.3.ffn.experts.w2": "model.layers.3.mlp.experts.down_proj",
    }
    for a, b in pairs.items():
        assert torch.equal(ours[a], theirs[b]), a
    gate_up = theirs["model.layers.0.mlp.experts.gate_up_proj"]
    assert torch.equal(ours["layers.0.ffn.experts.w1"], gate_up[:, :i])
    assert torch.equal(ours["layers.0.ffn.experts.w3"], gate_up[:, i:])


def test_transformers_reads_our_checkpoint(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    out = write_random_checkpoint(TINY, tmp_path / "ckpt")
    hf, info = transformers.DeepseekV4ForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = by_name(load(TINY, out), TINY)
    theirs = hf.state_dict()
    assert torch.equal(ours["layers.1.attn.wq_a.weight"], theirs["model.layers.1.self_attn.q_a_proj.weight"])
    assert torch.equal(ours["layers.2.attn.compressor.ape"], theirs["model.layers.2.self_attn.compressor.position_bias"])


# ---- errors -------------------------------------------------------------------------------------------
QCFG = TINY.replace(quantization=QuantConfig(), expert_dtype="fp4")


def edit(path: Path, fn: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def expect_error(cfg: ModelConfig, path: Path, *needles: str, model: torch.nn.Module | None = None) -> str:
    with pytest.raises(WeightLoadError) as e:
        load_weights(model if model is not None else StandIn(cfg), cfg, path, progress=False)
    msg = str(e.value)
    for n in needles:
        assert n in msg, (n, msg)
    return msg


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_random_checkpoint(QCFG, tmp_path / "q")


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    return write_random_checkpoint(TINY, tmp_path / "s", shard_bytes=64 << 10)


def test_error_truncated_file(ckpt: Path, sharded: Path) -> None:
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    expect_error(QCFG, ckpt, str(f))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    name, fname = sorted(index.items())[0]
    g = sharded / fname
    g.write_bytes(g.read_bytes()[:-7])
    expect_error(TINY, sharded, str(g), "holds tensor")


def test_error_missing_unexpected_duplicate(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    original = load_file(f)
    edit(f, lambda t: t.pop("layers.1.attn.wkv.weight"))
    expect_error(QCFG, ckpt, "missing tensor 'layers.1.attn.wkv.weight'", str(f))
    save_file(original, f)
    edit(f, lambda t: t.update({"layers.0.attn.extra.weight": torch.zeros(2)}))
    expect_error(QCFG, ckpt, "unexpected tensor 'layers.0.attn.extra.weight'", str(f))
    save_file(original, f)
    # What transformers 5.17 writes for quantised experts' scales (seen on a GPU run).
    edit(f, lambda t: t.update({".experts.0.w1.weight": torch.zeros(64, 2).to(torch.float8_e8m0fnu)}))
    expect_error(QCFG, ckpt, "'.experts.0.w1.weight'", str(f), "save_pretrained")
    save_file(original, f)
    edit(f, lambda t: t.update({"model.embed_tokens.weight": t["embed.weight"].clone()}))
    expect_error(QCFG, ckpt, "'embed.weight' is stored twice", "model.embed_tokens.weight", str(f))
    save_file(original, f)
    save_file({"norm.weight": original["norm.weight"]}, ckpt / "extra.safetensors")
    expect_error(QCFG, ckpt, "'norm.weight' is stored twice", str(ckpt / "extra.safetensors"))


def test_error_shape_and_dtype(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    original = load_file(f)
    cases = [
        ("layers.0.attn.q_norm.weight", torch.ones(31, dtype=torch.bfloat16), "shape (31,)"),
        ("layers.0.attn_norm.weight", torch.ones(64, dtype=torch.int32), "dtype I32"),
        ("layers.0.ffn.gate.tid2eid", torch.zeros(512, 2), "dtype F32"),
        ("layers.0.ffn.gate.weight", torch.zeros(8, 64, dtype=torch.float8_e4m3fn), "dtype F8_E4M3"),
        ("layers.0.attn.wq_a.scale", torch.zeros(2, 1), "shape (2, 1)"),
        ("layers.0.ffn.experts.0.w1.scale", torch.zeros(32, 2, dtype=torch.float32), "dtype F32"),
    ]
    for key, value, needle in cases:
        edit(f, lambda t, k=key, v=value: t.update({k: v}))
        expect_error(QCFG, ckpt, f"'{key}'", str(f), needle)
        save_file(original, f)
    edit(f, lambda t: t.pop("layers.0.attn.wq_a.scale"))
    expect_error(QCFG, ckpt, "'layers.0.attn.wq_a.weight'", str(f), "no '.scale'")
    save_file(original, f)
    edit(f, lambda t: t.update({"layers.0.attn_norm.scale": torch.ones(1)}))
    expect_error(QCFG, ckpt, "'layers.0.attn_norm.weight'", str(f), "not quantised")
    save_file(original, f)
    # Packed FP4 experts only with expert_dtype fp4 in the config.
    expect_error(QCFG.replace(expert_dtype="fp8"), ckpt, "'layers.0.ffn.experts.0.w1.weight'", str(f), "fp4")


def test_tid2eid_int32_and_range(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    key = "layers.1.ffn.gate.tid2eid"
    edit(f, lambda t: t.update({key: t[key].to(torch.int32)}))
    m = load(QCFG, ckpt)
    assert torch.equal(m.state_dict()[key], reference(checkpoint_tensors(QCFG)[key], "plain", QCFG))
    edit(f, lambda t: t[key].__setitem__((3, 1), 8))
    expect_error(QCFG, ckpt, f"'{key}'", str(f), "outside [0, 8)")


def test_aliases_and_mtp_duplicates(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"

    def rename(t: dict[str, torch.Tensor]) -> None:
        for k in [k for k in t if k.endswith(".scale")]:
            t[k[: -len("scale")] + "weight_scale_inv"] = t.pop(k)
        t["mtp.0.emb.tok_emb.weight"] = t["embed.weight"].clone()
        t["mtp.0.head.weight"] = t["head.weight"].clone()
        t["lm_head.weight"] = t.pop("head.weight")
        t["model.layers.0.attn.norm.weight"] = t.pop("layers.0.attn.kv_norm.weight")

    edit(f, rename)
    check_loaded(load(QCFG, ckpt), QCFG, True)


def test_error_files_and_index(sharded: Path, tmp_path: Path) -> None:
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    fname = sorted(index["weight_map"].values())[-1]
    name = next(k for k, v in index["weight_map"].items() if v == fname)
    (sharded / fname).rename(tmp_path / "moved")
    expect_error(TINY, sharded, str(sharded / fname), "does not exist", name)
    (tmp_path / "moved").rename(sharded / fname)
    index_path.write_text("{not json")
    expect_error(TINY, sharded, str(index_path), "bad checkpoint index")
    index_path.write_text(json.dumps({"weight_map": ["x"]}))
    expect_error(TINY, sharded, str(index_path))
    index["weight_map"]["layers.0.attn.ghost.weight"] = fname
    index_path.write_text(json.dumps(index))
    expect_error(TINY, sharded, "'layers.0.attn.ghost.weight'", str(index_path), str(sharded / fname))
    expect_error(TINY, tmp_path / "nowhere", "model directory not found", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    expect_error(TINY, tmp_path / "empty", "no model.safetensors.index.json", str(tmp_path / "empty"))


def test_error_model_mismatch(sharded: Path) -> None:
    m = StandIn(TINY)
    m.register_parameter("extra", torch.nn.Parameter(torch.zeros(1)))
    expect_error(TINY, sharded, "'extra'", model=m)
    m = StandIn(TINY)
    del m.layers._modules["0"].attn_norm._parameters["weight"]
    expect_error(TINY, sharded, "'layers.0.attn_norm.weight'", model=m)
    m = StandIn(TINY.replace(num_hash_layers=1))
    expect_error(TINY, sharded, "'layers.1.ffn.gate.bias'", model=m)
    # Progress bar on: still loads.
    m = StandIn(TINY)
    load_weights(m, TINY, sharded, progress=True)
    check_loaded(m, TINY, False)


def test_tokenizer_copied(tmp_path: Path) -> None:
    (tmp_path / "tok.json").write_text('{"model": {}}')
    out = write_random_checkpoint(TINY, tmp_path / "t", tokenizer=tmp_path / "tok.json")
    assert (out / "tokenizer.json").read_text() == '{"model": {}}'
