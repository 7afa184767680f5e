"""Model configuration parsed from a DeepSeek-V4 ``config.json``.

Both spellings load into one frozen :class:`ModelConfig`:

* official (DeepSeek's HF repo): ``compress_ratios`` (one entry per main layer plus the trailing MTP
  entries), ``num_hash_layers``, ``qk_rope_head_dim``, ``rope_scaling`` (YaRN), ``compress_rope_theta``;
* transformers (``DeepseekV4Config.to_dict()``): ``layer_types``, ``compress_rates``,
  ``mlp_layer_types``, ``rope_parameters`` (``main`` / ``compress``), ``partial_rotary_factor``.

Layer kinds: ``sliding`` (window only), ``csa`` (overlapping compressor + Lightning Indexer) and ``hca``
(non-overlapping compressor, all entries visible). In the official spelling ratio 4 is CSA and any other
positive ratio is HCA, as in DeepSeek's code; the transformers spelling names the kind explicitly.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

SLIDING, CSA, HCA = "sliding", "csa", "hca"
LAYER_KINDS = (SLIDING, CSA, HCA)
_HF_TO_KIND = {
    "sliding_attention": SLIDING,
    "compressed_sparse_attention": CSA,
    "heavily_compressed_attention": HCA,
}
_KIND_TO_HF = {v: k for k, v in _HF_TO_KIND.items()}
SCORING_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")
EXPERT_DTYPES = ("bf16", "fp8", "fp4")


class ConfigError(ValueError):
    """An invalid or unsupported config.json; the message names the field."""


@dataclass(frozen=True)
class YarnScaling:
    """YaRN frequency blend applied on compressed layers only (no mscale; DSV4_SPEC 3.6)."""

    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class QuantConfig:
    """Official block-FP8 weight format: e4m3 weights with one scale per 128x128 block."""

    fmt: str = "e4m3"
    scale_fmt: str | None = "ue8m0"
    block_size: tuple[int, int] = (128, 128)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_layers: int = 43
    num_heads: int = 64
    head_dim: int = 512
    rope_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    layer_kinds: tuple[str, ...] = ()
    compress_ratios: tuple[int, ...] = ()  # per main layer; 0 for sliding layers
    num_mtp_layers: int = 1
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: YarnScaling | None = field(default_factory=YarnScaling)
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 0
    eos_token_ids: tuple[int, ...] = (1,)
    quantization: QuantConfig | None = None
    expert_dtype: str = "bf16"

    # ---- derived -------------------------------------------------------------------------------------
    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    @property
    def mix_hc(self) -> int:
        return (2 + self.hc_mult) * self.hc_mult

    @property
    def mtp_layer_ids(self) -> tuple[int, ...]:
        return tuple(range(self.num_layers, self.num_layers + self.num_mtp_layers))

    def layer_kind(self, layer_id: int) -> str:
        """Kind of a main layer, or of an MTP layer (ids >= num_layers: always sliding)."""
        return self.layer_kinds[layer_id] if layer_id < self.num_layers else SLIDING

    def layer_ratio(self, layer_id: int) -> int:
        return self.compress_ratios[layer_id] if layer_id < self.num_layers else 0

    def is_hash_layer(self, layer_id: int) -> bool:
        return layer_id < self.num_hash_layers

    # ---- validation ----------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"config field `{name}`: {why}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "q_lora_rank",
                     "o_groups", "o_lora_rank", "sliding_window", "index_n_heads", "index_head_dim",
                     "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "hc_mult",
                     "hc_sinkhorn_iters", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, f"must be a positive integer, got {v!r}")
        for name in ("num_mtp_layers", "num_hash_layers", "n_shared_experts", "index_topk"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, f"must be a non-negative integer, got {v!r}")
        if self.rope_dim <= 0 or self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise bad("qk_rope_head_dim", f"must be even and in (0, head_dim={self.head_dim}], got {self.rope_dim}")
        if self.rope_dim > self.index_head_dim:
            raise bad("index_head_dim", f"must be >= qk_rope_head_dim={self.rope_dim}, got {self.index_head_dim}")
        if self.num_heads % self.o_groups:
            raise bad("o_groups", f"must divide num_attention_heads={self.num_heads}, got {self.o_groups}")
        if len(self.layer_kinds) != self.num_layers:
            raise bad("compress_ratios/layer_types",
                      f"needs {self.num_layers} main-layer entries, got {len(self.layer_kinds)}")
        if len(self.compress_ratios) != self.num_layers:
            raise bad("compress_ratios", f"needs {self.num_layers} entries, got {len(self.compress_ratios)}")
        for i, (kind, ratio) in enumerate(zip(self.layer_kinds, self.compress_ratios, strict=True)):
            if kind not in LAYER_KINDS:
                raise bad("layer_types", f"layer {i}: unknown kind {kind!r}")
            if (kind == SLIDING) != (ratio == 0) or ratio < 0:
                raise bad("compress_ratios", f"layer {i} ({kind}) has ratio {ratio}")
            if kind == CSA and ratio < 2:
                raise bad("compress_rates", f"layer {i}: CSA ratio must be >= 2, got {ratio}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise bad("num_experts_per_tok", f"{self.num_experts_per_tok} > n_routed_experts {self.n_routed_experts}")
        if self.num_hash_layers > self.num_layers:
            raise bad("num_hash_layers", f"{self.num_hash_layers} > num_hidden_layers {self.num_layers}")
        if self.scoring_func not in SCORING_FUNCS:
            raise bad("scoring_func", f"must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        if self.expert_dtype not in EXPERT_DTYPES:
            raise bad("expert_dtype", f"must be one of {EXPERT_DTYPES}, got {self.expert_dtype!r}")
        if self.expert_dtype == "fp4" and self.moe_intermediate_size % 32:
            raise bad("moe_intermediate_size", "must be a multiple of 32 for fp4 experts")
        if not self.eos_token_ids:
            raise bad("eos_token_id", "must name at least one token")
        if self.quantization is not None:
            q = self.quantization
            if q.fmt != "e4m3":
                raise bad("quantization_config.fmt", f"only e4m3 is supported, got {q.fmt!r}")
            if q.scale_fmt not in (None, "ue8m0"):
                raise bad("quantization_config.scale_fmt", f"must be ue8m0 or absent, got {q.scale_fmt!r}")
            if len(q.block_size) != 2 or any(b <= 0 for b in q.block_size):
                raise bad("quantization_config.weight_block_size", f"bad block {q.block_size}")
        for name in ("rope_theta", "compress_rope_theta", "routed_scaling_factor", "hc_eps", "rms_norm_eps"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise bad(name, f"must be a positive number, got {v!r}")

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return _parse(d)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return _parse(d)

    def replace(self, **kw: Any) -> ModelConfig:
        return replace(self, **kw)

    # ---- writing -------------------------------------------------------------------------------------
    def to_official_dict(self) -> dict[str, Any]:
        """config.json in DeepSeek's spelling (what the official checkpoints ship)."""
        for k, r in zip(self.layer_kinds, self.compress_ratios, strict=True):
            if k == CSA and r != 4 or k == HCA and r == 4:
                raise ConfigError("compress_ratios: the official spelling can only say CSA with ratio 4; "
                                  "write this config with to_hf_dict()")
        d = self._common_dict()
        d["compress_ratios"] = list(self.compress_ratios) + [0] * self.num_mtp_layers
        d["num_hash_layers"] = self.num_hash_layers
        d["qk_rope_head_dim"] = self.rope_dim
        d["rope_theta"] = self.rope_theta
        d["compress_rope_theta"] = self.compress_rope_theta
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"type": "yarn", **asdict(self.rope_scaling)}
        return d

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json in transformers' spelling (DeepseekV4Config)."""
        rates: dict[str, int] = {}
        for k, r in zip(self.layer_kinds, self.compress_ratios, strict=True):
            if k == SLIDING:
                continue
            if rates.setdefault(_KIND_TO_HF[k], r) != r:
                raise ConfigError(f"compress_rates: transformers needs one ratio per layer type, {k} has several")
        rates.setdefault("compressed_sparse_attention", 4)
        rates.setdefault("heavily_compressed_attention", 128)
        d = self._common_dict()
        partial = self.rope_dim / self.head_dim
        compress: dict[str, Any] = {"rope_type": "default", "rope_theta": self.compress_rope_theta,
                                    "partial_rotary_factor": partial}
        if self.rope_scaling is not None:
            compress.update(rope_type="yarn", attention_factor=1.0, **asdict(self.rope_scaling))
        d.update(
            layer_types=[_KIND_TO_HF[k] for k in self.layer_kinds],
            compress_rates=rates,
            mlp_layer_types=["hash_moe" if self.is_hash_layer(i) else "moe" for i in range(self.num_layers)],
            partial_rotary_factor=partial,
            rope_theta=self.rope_theta,
            compress_rope_theta=self.compress_rope_theta,
            rope_parameters={
                "main": {"rope_type": "default", "rope_theta": self.rope_theta, "partial_rotary_factor": partial},
                "compress": compress,
            },
        )
        return d

    def _common_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "moe_intermediate_size": self.moe_intermediate_size,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "scoring_func": self.scoring_func,
            "norm_topk_prob": True,
            "routed_scaling_factor": self.routed_scaling_factor,
            "swiglu_limit": self.swiglu_limit,
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
            "rms_norm_eps": self.rms_norm_eps,
            "num_nextn_predict_layers": self.num_mtp_layers,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "torch_dtype": "bfloat16",
        }
        if self.expert_dtype != "bf16":
            d["expert_dtype"] = self.expert_dtype
        if self.quantization is not None:
            q = self.quantization
            d["quantization_config"] = {"quant_method": "fp8", "fmt": q.fmt, "activation_scheme": "dynamic",
                                        "weight_block_size": list(q.block_size)}
            if q.scale_fmt:
                d["quantization_config"]["scale_fmt"] = q.scale_fmt
        return d


# ---- parsing ------------------------------------------------------------------------------------------
def _req(d: dict[str, Any], *names: str, default: Any = ...) -> Any:
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    if default is ...:
        raise ConfigError(f"config field `{names[0]}` is missing")
    return default


def _num(d: dict[str, Any], *names: str, default: Any = ..., kind: type = int) -> Any:
    v = _req(d, *names, default=default)
    if kind is int:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise ConfigError(f"config field `{names[0]}` must be an integer, got {v!r}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"config field `{names[0]}` must be a number, got {v!r}")
    return float(v)


def _parse_yarn(rs: Any, field_name: str) -> YarnScaling | None:
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ConfigError(f"config field `{field_name}` must be an object, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind != "yarn":
        raise ConfigError(f"config field `{field_name}`: only yarn scaling is supported, got {kind!r}")
    try:
        return YarnScaling(
            factor=float(rs["factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
            beta_fast=float(rs.get("beta_fast", 32)),
            beta_slow=float(rs.get("beta_slow", 1)),
        )
    except KeyError as e:
        raise ConfigError(f"config field `{field_name}` is missing {e.args[0]!r}") from None


def _parse(d: dict[str, Any]) -> ModelConfig:
    if "dim" in d and "hidden_size" not in d:
        raise ConfigError("this is DeepSeek's inference/config.json (ModelArgs); point at the model's "
                          "top-level config.json instead")
    if d.get("model_type", "deepseek_v4") != "deepseek_v4":
        raise ConfigError(f"config field `model_type` must be 'deepseek_v4', got {d.get('model_type')!r}")
    n = _num(d, "num_hidden_layers")
    if n <= 0:
        raise ConfigError(f"config field `num_hidden_layers` must be positive, got {n}")
    n_mtp = _num(d, "num_nextn_predict_layers", default=0)
    head_dim = _num(d, "head_dim")

    # layer schedule
    if d.get("layer_types") is not None:
        lt = d["layer_types"]
        if not isinstance(lt, list) or any(t not in _HF_TO_KIND for t in lt):
            raise ConfigError(f"config field `layer_types` must list {tuple(_HF_TO_KIND)}, got {lt!r}")
        if len(lt) < n:
            raise ConfigError(f"config field `layer_types` has {len(lt)} entries for {n} layers")
        kinds = tuple(_HF_TO_KIND[t] for t in lt[:n])
        rates = dict(_req(d, "compress_rates", default={}) or {})
        rates.setdefault("compressed_sparse_attention", 4)
        rates.setdefault("heavily_compressed_attention", 128)
        ratios = tuple(0 if k == SLIDING else int(rates[_KIND_TO_HF[k]]) for k in kinds)
    elif d.get("compress_ratios") is not None:
        cr = d["compress_ratios"]
        if not isinstance(cr, list) or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in cr):
            raise ConfigError(f"config field `compress_ratios` must be a list of non-negative ints, got {cr!r}")
        if len(cr) not in (n, n + n_mtp):
            raise ConfigError(f"config field `compress_ratios` has {len(cr)} entries; expected "
                              f"num_hidden_layers ({n}) or that plus num_nextn_predict_layers ({n_mtp})")
        ratios = tuple(cr[:n])
        kinds = tuple(SLIDING if r == 0 else CSA if r == 4 else HCA for r in ratios)
        if any(r != 0 for r in cr[n:]):
            raise ConfigError(f"config field `compress_ratios`: MTP entries {cr[n:]} must be 0 (sliding-only)")
    else:
        raise ConfigError("config field `compress_ratios` (or `layer_types`) is missing")

    # MoE schedule
    if d.get("mlp_layer_types") is not None:
        mt = d["mlp_layer_types"]
        if not isinstance(mt, list) or any(t not in ("hash_moe", "moe") for t in mt):
            raise ConfigError(f"config field `mlp_layer_types` must list 'hash_moe'/'moe', got {mt!r}")
        n_hash = sum(1 for t in mt[:n] if t == "hash_moe")
        if list(mt[:n]) != ["hash_moe"] * n_hash + ["moe"] * (n - n_hash):
            raise ConfigError("config field `mlp_layer_types`: hash layers must come first")
    else:
        n_hash = _num(d, "num_hash_layers", default=0)

    # rope
    if isinstance(d.get("rope_parameters"), dict) and isinstance(d["rope_parameters"].get("main"), dict):
        rp = d["rope_parameters"]
        main, comp = rp["main"], rp.get("compress", rp["main"])
        rope_theta = float(_req(main, "rope_theta"))
        compress_theta = float(_req(comp, "rope_theta"))
        partial = float(_req(main, "partial_rotary_factor", default=d.get("partial_rotary_factor") or 0.125))
        rope_dim = int(round(head_dim * partial))
        yarn = _parse_yarn(comp, "rope_parameters.compress")
    else:
        rope_theta = _num(d, "rope_theta", default=10000.0, kind=float)
        compress_theta = _num(d, "compress_rope_theta", default=160000.0, kind=float)
        if d.get("qk_rope_head_dim") is not None:
            rope_dim = _num(d, "qk_rope_head_dim")
        elif d.get("partial_rotary_factor") is not None:
            rope_dim = int(round(head_dim * float(d["partial_rotary_factor"])))
        else:
            raise ConfigError("config field `qk_rope_head_dim` is missing")
        yarn = _parse_yarn(d.get("rope_scaling"), "rope_scaling")

    qc = d.get("quantization_config")
    quant = None
    if qc is not None:
        if not isinstance(qc, dict):
            raise ConfigError("config field `quantization_config` must be an object")
        if qc.get("quant_method", "fp8") != "fp8":
            raise ConfigError(f"config field `quantization_config.quant_method`: only fp8 is supported, "
                              f"got {qc.get('quant_method')!r}")
        bs = qc.get("weight_block_size", [128, 128])
        if not isinstance(bs, list) or len(bs) != 2:
            raise ConfigError(f"config field `quantization_config.weight_block_size` must be [rows, cols], got {bs!r}")
        quant = QuantConfig(fmt=qc.get("fmt", "e4m3"), scale_fmt=qc.get("scale_fmt"), block_size=(int(bs[0]), int(bs[1])))

    eos = _req(d, "eos_token_id", default=1)
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    expert_dtype = d.get("expert_dtype") or ("fp8" if quant is not None else "bf16")
    if (d.get("n_shared_experts") or 0) > 1:
        raise ConfigError(f"config field `n_shared_experts`: at most 1 is supported, got {d['n_shared_experts']}")
    if d.get("num_key_value_heads", 1) != 1:
        raise ConfigError(f"config field `num_key_value_heads` must be 1 for DeepSeek-V4, got {d['num_key_value_heads']}")
    if d.get("tie_word_embeddings"):
        raise ConfigError("config field `tie_word_embeddings`: DeepSeek-V4 has an untied head")

    return ModelConfig(
        vocab_size=_num(d, "vocab_size"),
        hidden_size=_num(d, "hidden_size"),
        num_layers=n,
        num_heads=_num(d, "num_attention_heads"),
        head_dim=head_dim,
        rope_dim=rope_dim,
        q_lora_rank=_num(d, "q_lora_rank"),
        o_groups=_num(d, "o_groups"),
        o_lora_rank=_num(d, "o_lora_rank"),
        sliding_window=_num(d, "sliding_window", default=128),
        layer_kinds=kinds,
        compress_ratios=ratios,
        num_mtp_layers=n_mtp,
        rope_theta=rope_theta,
        compress_rope_theta=compress_theta,
        rope_scaling=yarn,
        max_position_embeddings=_num(d, "max_position_embeddings", default=1048576),
        index_n_heads=_num(d, "index_n_heads", default=64),
        index_head_dim=_num(d, "index_head_dim", default=128),
        index_topk=_num(d, "index_topk", default=512),
        moe_intermediate_size=_num(d, "moe_intermediate_size", "intermediate_size"),
        n_routed_experts=_num(d, "n_routed_experts", "num_local_experts"),
        n_shared_experts=_num(d, "n_shared_experts", default=1),
        num_experts_per_tok=_num(d, "num_experts_per_tok"),
        num_hash_layers=n_hash,
        scoring_func=_req(d, "scoring_func", default="sqrtsoftplus"),
        routed_scaling_factor=_num(d, "routed_scaling_factor", default=1.0, kind=float),
        swiglu_limit=_num(d, "swiglu_limit", default=10.0, kind=float),
        hc_mult=_num(d, "hc_mult", default=4),
        hc_sinkhorn_iters=_num(d, "hc_sinkhorn_iters", default=20),
        hc_eps=_num(d, "hc_eps", default=1e-6, kind=float),
        rms_norm_eps=_num(d, "rms_norm_eps", default=1e-6, kind=float),
        bos_token_id=_num(d, "bos_token_id", default=0),
        eos_token_ids=eos_ids,
        quantization=quant,
        expert_dtype=expert_dtype,
    )


# ---- presets: the exact shapes of the released models ------------------------------------------------
_FP8 = QuantConfig()


def flash_config() -> ModelConfig:
    """DeepSeek-V4-Flash (284B total, 13B active)."""
    ratios = (0, 0) + (4, 128) * 20 + (4,)
    return ModelConfig(
        layer_kinds=tuple(SLIDING if r == 0 else CSA if r == 4 else HCA for r in ratios),
        compress_ratios=ratios, quantization=_FP8, expert_dtype="fp4",
    )


def pro_config() -> ModelConfig:
    """DeepSeek-V4-Pro (1.6T total, 49B active)."""
    ratios = (128, 128) + (4, 128) * 29 + (4,)
    return ModelConfig(
        hidden_size=7168, num_layers=61, num_heads=128, q_lora_rank=1536, o_groups=16, index_topk=1024,
        moe_intermediate_size=3072, n_routed_experts=384, routed_scaling_factor=2.5,
        layer_kinds=tuple(CSA if r == 4 else HCA for r in ratios),
        compress_ratios=ratios, quantization=_FP8, expert_dtype="fp4",
    )


PRESETS = {"flash": flash_config, "pro": pro_config}
