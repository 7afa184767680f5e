"""ModelConfig: both config.json spellings, the released models' files, transformers' reading, and errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from oracle import tiny_config, tiny_config_b

from dsv4.config import (
    CSA,
    HCA,
    SLIDING,
    ConfigError,
    ModelConfig,
    QuantConfig,
    YarnScaling,
    flash_config,
    pro_config,
)

SHARED = Path("/work/shared/deepseek-v4")
PRESETS = {"flash": flash_config, "pro": pro_config}
HF_KIND = {SLIDING: "sliding_attention", CSA: "compressed_sparse_attention", HCA: "heavily_compressed_attention"}


def _shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} not present (reference files are not part of the repo)")
    return path


# ---- presets round-trip through both spellings ------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("spelling", ["official", "hf"])
def test_preset_round_trip(name: str, spelling: str) -> None:
    cfg = PRESETS[name]()
    d = cfg.to_official_dict() if spelling == "official" else cfg.to_hf_dict()
    d = json.loads(json.dumps(d))  # what a file holds: lists, not tuples
    back = ModelConfig.from_dict(d)
    assert back == cfg
    # the two spellings really are different spellings
    if spelling == "official":
        assert "compress_ratios" in d and "layer_types" not in d and d["qk_rope_head_dim"] == 64
    else:
        assert "layer_types" in d and "compress_ratios" not in d and "qk_rope_head_dim" not in d


@pytest.mark.parametrize("make", [tiny_config, tiny_config_b])
def test_tiny_configs_round_trip(make: Any) -> None:
    """HCA ratios 8 and 16 (short test sequences) in both spellings: official reads any ratio but 4 as HCA."""
    cfg = make()
    assert HCA in cfg.layer_kinds and set(cfg.compress_ratios) - {0, 4}
    for d in (cfg.to_hf_dict(), cfg.to_official_dict()):
        assert ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_unwritable_schedules_are_refused() -> None:
    # the official spelling cannot say "CSA with ratio 8" (ratio 4 is what marks CSA)
    with pytest.raises(ConfigError, match="compress_ratios"):
        tiny_config(compress_ratios=(0, 8, 8, 8)).to_official_dict()
    # transformers has one ratio per layer type
    two_hca = tiny_config(layer_kinds=(SLIDING, CSA, HCA, HCA), compress_ratios=(0, 4, 8, 16))
    with pytest.raises(ConfigError, match="compress_rates"):
        two_hca.to_hf_dict()
    assert ModelConfig.from_dict(two_hca.to_official_dict()) == two_hca


def test_presets_shapes() -> None:
    f, p = flash_config(), pro_config()
    assert f.num_layers == 43 and p.num_layers == 61
    assert f.layer_kinds[:4] == (SLIDING, SLIDING, CSA, HCA) and f.layer_kinds[-1] == CSA
    assert p.layer_kinds[:4] == (HCA, HCA, CSA, HCA)
    for c in (f, p):
        assert c.rope_dim == 64 and c.head_dim == 512 and c.num_hash_layers == 3 and c.num_mtp_layers == 1
        assert c.expert_dtype == "fp4" and c.quantization == QuantConfig("e4m3", "ue8m0", (128, 128))
        assert c.rope_scaling == YarnScaling(16.0, 65536, 32.0, 1.0)
        assert {r for k, r in zip(c.layer_kinds, c.compress_ratios, strict=True) if k == CSA} == {4}
        assert {r for k, r in zip(c.layer_kinds, c.compress_ratios, strict=True) if k == HCA} == {128}
    assert (p.hidden_size, p.num_heads, p.o_groups, p.n_routed_experts, p.index_topk) == (7168, 128, 16, 384, 1024)


# ---- transformers reads our dicts the way we do ---------------------------------------------------------------
def _check_hf_agrees(cfg: ModelConfig, h: Any) -> None:
    assert list(h.layer_types) == [HF_KIND[k] for k in cfg.layer_kinds]
    for i, (kind, ratio) in enumerate(zip(cfg.layer_kinds, cfg.compress_ratios, strict=True)):
        if kind != SLIDING:
            assert h.compress_rates[HF_KIND[kind]] == ratio, i
    n_hash = cfg.num_hash_layers
    assert list(h.mlp_layer_types) == ["hash_moe"] * n_hash + ["moe"] * (cfg.num_layers - n_hash)
    assert h.partial_rotary_factor * cfg.head_dim == cfg.rope_dim and h.qk_rope_head_dim == cfg.rope_dim
    main, comp = h.rope_parameters["main"], h.rope_parameters["compress"]
    assert main["rope_type"] == "default" and main["rope_theta"] == cfg.rope_theta
    assert main["partial_rotary_factor"] == comp["partial_rotary_factor"] == cfg.rope_dim / cfg.head_dim
    assert comp["rope_theta"] == cfg.compress_rope_theta
    if cfg.rope_scaling is None:
        assert comp["rope_type"] == "default"
    else:
        y = cfg.rope_scaling
        assert comp["rope_type"] == "yarn" and comp["attention_factor"] == 1.0  # V4: no YaRN mscale
        assert (comp["factor"], comp["original_max_position_embeddings"], comp["beta_fast"], comp["beta_slow"]) == \
            (y.factor, y.original_max_position_embeddings, y.beta_fast, y.beta_slow)
    sizes = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": 1, "head_dim": cfg.head_dim,
        "q_lora_rank": cfg.q_lora_rank, "o_groups": cfg.o_groups, "o_lora_rank": cfg.o_lora_rank,
        "sliding_window": cfg.sliding_window, "index_n_heads": cfg.index_n_heads,
        "index_head_dim": cfg.index_head_dim, "index_topk": cfg.index_topk,
        "moe_intermediate_size": cfg.moe_intermediate_size, "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
        "scoring_func": cfg.scoring_func, "routed_scaling_factor": cfg.routed_scaling_factor,
        "swiglu_limit": cfg.swiglu_limit, "hc_mult": cfg.hc_mult, "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "hc_eps": cfg.hc_eps, "rms_norm_eps": cfg.rms_norm_eps, "num_nextn_predict_layers": cfg.num_mtp_layers,
        "max_position_embeddings": cfg.max_position_embeddings,
    }
    assert {k: getattr(h, k) for k in sizes} == sizes


# transformers' legacy `compress_ratios` reader only knows 0/4/128, so the tiny HCA 8/16 configs go in the
# transformers spelling only.
@pytest.mark.parametrize("name, spelling", [("flash", "official"), ("flash", "hf"), ("pro", "official"),
                                            ("pro", "hf"), ("tiny", "hf"), ("tiny_b", "hf")])
def test_transformers_agrees(name: str, spelling: str) -> None:
    from transformers import DeepseekV4Config

    cfg = {**PRESETS, "tiny": tiny_config, "tiny_b": tiny_config_b}[name]()
    # official: the legacy keys compress_ratios, num_hash_layers, qk_rope_head_dim, rope_scaling
    d = cfg.to_official_dict() if spelling == "official" else cfg.to_hf_dict()
    h = DeepseekV4Config(**copy.deepcopy(d))
    _check_hf_agrees(cfg, h)
    # and what transformers writes back parses to the same config
    assert ModelConfig.from_dict(json.loads(h.to_json_string())) == cfg


def test_hf_spelling_with_custom_compress_rates() -> None:
    """A transformers-style config (no legacy keys) with CSA 4 and HCA 16."""
    d: dict[str, Any] = {
        "model_type": "deepseek_v4", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 5,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "q_lora_rank": 16, "o_groups": 2,
        "o_lora_rank": 16, "sliding_window": 8, "index_n_heads": 8, "index_head_dim": 16, "index_topk": 4,
        "moe_intermediate_size": 32, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "num_nextn_predict_layers": 1, "max_position_embeddings": 4096, "partial_rotary_factor": 0.25,
        "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                        "compressed_sparse_attention", "heavily_compressed_attention"],
        "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        "mlp_layer_types": ["hash_moe", "moe", "moe", "moe", "moe"],
        "rope_parameters": {
            "main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "partial_rotary_factor": 0.25,
                         "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32,
                         "beta_slow": 1, "attention_factor": 1.0},
        },
    }
    cfg = ModelConfig.from_dict(d)
    assert cfg.layer_kinds == (SLIDING, CSA, HCA, CSA, HCA) and cfg.compress_ratios == (0, 4, 16, 4, 16)
    assert cfg.num_hash_layers == 1 and cfg.rope_dim == 8 and cfg.compress_rope_theta == 160000.0
    assert cfg.rope_scaling == YarnScaling(4.0, 1024, 32.0, 1.0)
    assert ModelConfig.from_dict(cfg.to_hf_dict()) == cfg

    from transformers import DeepseekV4Config

    _check_hf_agrees(cfg, DeepseekV4Config(**copy.deepcopy(d)))
    # without compress_rates the transformers defaults (4, 128) apply, as in DeepseekV4Config
    del d["compress_rates"]
    assert ModelConfig.from_dict(d).compress_ratios == (0, 4, 128, 4, 128)
    # no YaRN on the compressed layers
    d["rope_parameters"]["compress"] = {"rope_type": "default", "rope_theta": 5e4, "partial_rotary_factor": 0.25}
    c2 = ModelConfig.from_dict(d)
    assert c2.rope_scaling is None and c2.compress_rope_theta == 5e4


def test_absent_keys_default_like_transformers() -> None:
    """A hand-written config with only the required keys: the defaults are transformers' defaults."""
    from transformers import DeepseekV4Config

    d = {k: v for k, v in _hf().items() if k in (
        "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
        "q_lora_rank", "o_groups", "o_lora_rank", "moe_intermediate_size", "n_routed_experts",
        "num_experts_per_tok", "layer_types", "compress_rates")}
    cfg = ModelConfig.from_dict(d)
    assert cfg.routed_scaling_factor == 1.5 and cfg.num_hash_layers == 3 and cfg.num_mtp_layers == 1
    assert cfg.rope_dim == 4 and cfg.rope_scaling is None  # 0.125 x head_dim 32; no YaRN unless asked
    _check_hf_agrees(cfg, DeepseekV4Config(**copy.deepcopy(d)))


# ---- the released models' files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_released_config_json_equals_preset(name: str) -> None:
    path = _shared_file(name, "config.json")
    cfg = ModelConfig.from_json(path)
    assert cfg == PRESETS[name]()
    assert ModelConfig.from_json(path.parent) == cfg  # a directory means its config.json
    raw = json.loads(path.read_text())
    # our official spelling writes back every key the file has with the same value
    ours = cfg.to_official_dict()
    assert {k: raw[k] for k in ours} == ours
    assert len(raw["compress_ratios"]) == cfg.num_layers + cfg.num_mtp_layers and raw["compress_ratios"][-1] == 0


def test_flash_config_json_details() -> None:
    cfg = ModelConfig.from_json(_shared_file("flash", "config.json"))
    assert cfg.num_layers == 43 and cfg.num_mtp_layers == 1
    assert cfg.compress_ratios == (0, 0) + (4, 128) * 20 + (4,)  # the trailing MTP 0 is not a main layer
    assert cfg.expert_dtype == "fp4"
    assert cfg.quantization == QuantConfig(fmt="e4m3", scale_fmt="ue8m0", block_size=(128, 128))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_official_inference_config_is_refused(name: str, tmp_path: Path) -> None:
    path = _shared_file(name, "inference_config.json")
    with pytest.raises(ConfigError, match=r"inference/config\.json.*top-level config\.json") as e:
        ModelConfig.from_json(path)
    assert str(path) in str(e.value)


def test_modelargs_spelling_is_refused() -> None:
    """The official inference/config.json (ModelArgs: `dim`, `n_layers`, ...), without the shared files."""
    d = {"vocab_size": 129280, "dim": 4096, "n_layers": 43, "n_heads": 64, "head_dim": 512,
         "compress_ratios": [0] * 44}
    with pytest.raises(ConfigError, match="ModelArgs"):
        ModelConfig.from_dict(d)


# ---- errors name the field ---------------------------------------------------------------------------------------
def _official() -> dict[str, Any]:
    return json.loads(json.dumps(flash_config().to_official_dict()))


def _hf() -> dict[str, Any]:
    return json.loads(json.dumps(tiny_config().to_hf_dict()))


def _set(key: str, value: Any) -> Any:
    return lambda d: d.__setitem__(key, value)


BAD_OFFICIAL: list[tuple[str, Any, str]] = [
    ("missing num_hidden_layers", lambda d: d.pop("num_hidden_layers"), "num_hidden_layers"),
    ("missing head_dim", lambda d: d.pop("head_dim"), "head_dim"),
    ("compress_ratios too short", lambda d: d.__setitem__("compress_ratios", d["compress_ratios"][:-3]),
     "compress_ratios"),
    ("compress_ratios too long", lambda d: d["compress_ratios"].extend([0, 0]), "compress_ratios"),
    ("compress_ratios not a list", _set("compress_ratios", "4,128"), "compress_ratios"),
    ("compress_ratios negative", lambda d: d["compress_ratios"].__setitem__(3, -4), "compress_ratios"),
    ("compress_ratios bool", lambda d: d["compress_ratios"].__setitem__(3, True), "compress_ratios"),
    ("MTP compress entry non-zero", lambda d: d["compress_ratios"].__setitem__(-1, 4), "compress_ratios"),
    ("missing compress_ratios", lambda d: d.pop("compress_ratios"), "compress_ratios"),
    ("negative hidden_size", _set("hidden_size", -4096), "hidden_size"),
    ("zero vocab_size", _set("vocab_size", 0), "vocab_size"),
    ("bool num_hidden_layers", _set("num_hidden_layers", True), "num_hidden_layers"),
    ("negative num_hidden_layers", _set("num_hidden_layers", -1), "num_hidden_layers"),
    ("str hidden_size", _set("hidden_size", "4096"), "hidden_size"),
    ("fractional head_dim", _set("head_dim", 511.5), "head_dim"),
    ("negative num_attention_heads", _set("num_attention_heads", -64), "num_attention_heads"),
    ("bool o_groups", _set("o_groups", True), "o_groups"),
    ("str n_shared_experts", _set("n_shared_experts", "one"), "n_shared_experts"),
    ("list n_shared_experts", _set("n_shared_experts", [1]), "n_shared_experts"),
    ("two shared experts", _set("n_shared_experts", 2), "n_shared_experts"),
    ("negative num_nextn_predict_layers", _set("num_nextn_predict_layers", -1), "num_nextn_predict_layers"),
    ("negative num_hash_layers", _set("num_hash_layers", -1), "num_hash_layers"),
    ("too many hash layers", _set("num_hash_layers", 44), "num_hash_layers"),
    ("str rope_theta", _set("rope_theta", "1e4"), "rope_theta"),
    ("zero compress_rope_theta", _set("compress_rope_theta", 0), "compress_rope_theta"),
    ("negative rms_norm_eps", _set("rms_norm_eps", -1e-6), "rms_norm_eps"),
    ("bool routed_scaling_factor", _set("routed_scaling_factor", True), "routed_scaling_factor"),
    ("o_groups not dividing heads", _set("o_groups", 7), "o_groups"),
    ("odd qk_rope_head_dim", _set("qk_rope_head_dim", 63), "qk_rope_head_dim"),
    ("qk_rope_head_dim > head_dim", _set("qk_rope_head_dim", 1024), "qk_rope_head_dim"),
    ("zero qk_rope_head_dim", _set("qk_rope_head_dim", 0), "qk_rope_head_dim"),
    ("missing qk_rope_head_dim", lambda d: d.pop("qk_rope_head_dim"), "qk_rope_head_dim"),
    ("unknown scoring_func", _set("scoring_func", "relu"), "scoring_func"),
    ("num_experts_per_tok > n_routed_experts", _set("num_experts_per_tok", 257), "num_experts_per_tok"),
    ("linear rope_scaling", _set("rope_scaling", {"type": "linear", "factor": 2.0}), "rope_scaling"),
    ("rope_scaling not an object", _set("rope_scaling", [16]), "rope_scaling"),
    ("rope_scaling without factor", lambda d: d["rope_scaling"].pop("factor"), "rope_scaling.factor"),
    ("rope_scaling str factor", lambda d: d["rope_scaling"].__setitem__("factor", "16"), "rope_scaling.factor"),
    ("rope_scaling negative factor", lambda d: d["rope_scaling"].__setitem__("factor", -16), "rope_scaling"),
    ("quantization fmt e5m2", lambda d: d["quantization_config"].__setitem__("fmt", "e5m2"),
     "quantization_config.fmt"),
    ("quantization scale_fmt", lambda d: d["quantization_config"].__setitem__("scale_fmt", "fp32"),
     "quantization_config.scale_fmt"),
    ("quantization method", lambda d: d["quantization_config"].__setitem__("quant_method", "awq"),
     "quantization_config.quant_method"),
    ("quantization block of one", lambda d: d["quantization_config"].__setitem__("weight_block_size", [128]),
     "quantization_config.weight_block_size"),
    ("quantization block of str", lambda d: d["quantization_config"].__setitem__("weight_block_size", ["a", 1]),
     "quantization_config.weight_block_size"),
    ("quantization block negative", lambda d: d["quantization_config"].__setitem__("weight_block_size", [-1, 128]),
     "quantization_config.weight_block_size"),
    ("quantization_config not an object", _set("quantization_config", "fp8"), "quantization_config"),
    ("unknown expert_dtype", _set("expert_dtype", "int4"), "expert_dtype"),
    ("model_type deepseek_v3", _set("model_type", "deepseek_v3"), "model_type"),
    ("num_key_value_heads 8", _set("num_key_value_heads", 8), "num_key_value_heads"),
    ("tied head", _set("tie_word_embeddings", True), "tie_word_embeddings"),
    ("empty eos_token_id", _set("eos_token_id", []), "eos_token_id"),
    ("str eos_token_id", _set("eos_token_id", "</s>"), "eos_token_id"),
    ("eos_token_id past vocab", _set("eos_token_id", 129280), "eos_token_id"),
    ("negative bos_token_id", _set("bos_token_id", -1), "bos_token_id"),
]


@pytest.mark.parametrize("mutate, needle", [(m, n) for _, m, n in BAD_OFFICIAL],
                         ids=[name for name, _, _ in BAD_OFFICIAL])
def test_bad_official_config(mutate: Any, needle: str) -> None:
    d = _official()
    mutate(d)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(d)
    assert f"`{needle}" in str(e.value), str(e.value)


BAD_HF: list[tuple[str, Any, str]] = [
    ("unknown layer type", lambda d: d["layer_types"].__setitem__(0, "full_attention"), "layer_types"),
    ("layer_types too short", lambda d: d["layer_types"].pop(), "layer_types"),
    ("layer_types not a list", _set("layer_types", "sliding_attention"), "layer_types"),
    ("compress_rates not an object", _set("compress_rates", [4, 8]), "compress_rates"),
    ("str compress rate", lambda d: d["compress_rates"].__setitem__("compressed_sparse_attention", "4"),
     "compress_rates.compressed_sparse_attention"),
    ("zero compress rate", lambda d: d["compress_rates"].__setitem__("heavily_compressed_attention", 0),
     "compress_rates.heavily_compressed_attention"),
    ("fractional compress rate", lambda d: d["compress_rates"].__setitem__("heavily_compressed_attention", 8.5),
     "compress_rates.heavily_compressed_attention"),
    ("CSA rate 1", lambda d: d["compress_rates"].__setitem__("compressed_sparse_attention", 1), "compress_rates"),
    ("unknown mlp layer type", lambda d: d["mlp_layer_types"].__setitem__(0, "dense"), "mlp_layer_types"),
    ("mlp_layer_types too short", lambda d: d["mlp_layer_types"].pop(), "mlp_layer_types"),
    ("hash layer after moe", _set("mlp_layer_types", ["moe", "hash_moe", "moe", "moe"]), "mlp_layer_types"),
    ("partial_rotary_factor not whole dims", lambda d: d["rope_parameters"]["main"].__setitem__(
        "partial_rotary_factor", 0.3), "rope_parameters.main.partial_rotary_factor"),
    ("partial_rotary_factor too big", lambda d: (d.__setitem__("partial_rotary_factor", 2.0), [
        d["rope_parameters"][k].__setitem__("partial_rotary_factor", 2.0) for k in ("main", "compress")]),
     "qk_rope_head_dim"),
    ("top-level partial_rotary_factor disagrees", _set("partial_rotary_factor", 0.5), "partial_rotary_factor"),
    ("compress partial_rotary_factor disagrees", lambda d: d["rope_parameters"]["compress"].__setitem__(
        "partial_rotary_factor", 0.5), "rope_parameters.compress.partial_rotary_factor"),
    ("str rope_theta", lambda d: d["rope_parameters"]["main"].__setitem__("rope_theta", "1e4"),
     "rope_parameters.main.rope_theta"),
    ("missing compress rope_theta", lambda d: d["rope_parameters"]["compress"].pop("rope_theta"),
     "rope_parameters.compress.rope_theta"),
    ("compress rope not an object", lambda d: d["rope_parameters"].__setitem__("compress", 3),
     "rope_parameters.compress"),
    ("non-yarn compress rope", lambda d: d["rope_parameters"]["compress"].__setitem__("rope_type", "linear"),
     "rope_parameters.compress"),
]


@pytest.mark.parametrize("mutate, needle", [(m, n) for _, m, n in BAD_HF], ids=[name for name, _, _ in BAD_HF])
def test_bad_hf_config(mutate: Any, needle: str) -> None:
    d = _hf()
    mutate(d)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(d)
    assert f"`{needle}" in str(e.value), str(e.value)


def test_integral_floats_are_accepted() -> None:
    """JSON writers sometimes emit 4096.0; that is still an integer."""
    d = _official()
    d["hidden_size"] = 4096.0
    assert ModelConfig.from_dict(d) == flash_config()


# ---- from_json -------------------------------------------------------------------------------------------
def test_from_json_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "config.json"
    with pytest.raises(ConfigError, match="not found") as e:
        ModelConfig.from_json(missing)
    assert str(missing) in str(e.value)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json(tmp_path)  # a directory without config.json
    assert str(tmp_path / "config.json") in str(e.value)

    cases = {"bad.json": b'{"hidden_size": 4096,', "list.json": b"[1, 2, 3]", "binary.json": b"\xff\xfe\x00garbage"}
    for fname, data in cases.items():
        p = tmp_path / fname
        p.write_bytes(data)
        with pytest.raises(ConfigError) as e:
            ModelConfig.from_json(p)
        assert str(p) in str(e.value), fname
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_json(tmp_path / "list.json")


def test_from_json_field_errors_name_path_and_field(tmp_path: Path) -> None:
    d = _official()
    d["o_groups"] = 7
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json(tmp_path)
    assert str(p) in str(e.value) and "`o_groups`" in str(e.value)
    d["o_groups"] = 8
    p.write_text(json.dumps(d))
    assert ModelConfig.from_json(p) == flash_config()
