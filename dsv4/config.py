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
# ModelConfig field -> its config.json key, so error messages name what the user wrote.
_JSON_NAMES = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_mtp_layers": "num_nextn_predict_layers",
    "rope_dim": "qk_rope_head_dim",
    "eos_token_ids": "eos_token_id",
}


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
            return ConfigError(f"config field `{_JSON_NAMES.get(name, name)}`: {why}")

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
        for name, ids in (("eos_token_id", self.eos_token_ids), ("bos_token_id", (self.bos_token_id,))):
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
                raise bad(name, f"must be token ids in [0, vocab_size={self.vocab_size}), got {ids!r}")
        if self.rope_scaling is not None:
            y = self.rope_scaling
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                       for v in (y.factor, y.original_max_position_embeddings, y.beta_fast, y.beta_slow)):
                raise bad("rope_scaling", f"factor, original_max_position_embeddings and betas must be positive, "
                          f"got {y}")
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
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(d).__name__}")
        try:
            return _parse(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

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
def _req(d: dict[str, Any], *names: str, default: Any = ..., prefix: str = "") -> Any:
    """The first of ``names`` present (not null) in ``d``; ``prefix`` names the enclosing object in errors."""
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    if default is ...:
        raise ConfigError(f"config field `{prefix}{names[0]}` is missing")
    return default


def _num(d: dict[str, Any], *names: str, default: Any = ..., kind: type = int, prefix: str = "") -> Any:
    v = _req(d, *names, default=default, prefix=prefix)
    if kind is int:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise ConfigError(f"config field `{prefix}{names[0]}` must be an integer, got {v!r}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"config field `{prefix}{names[0]}` must be a number, got {v!r}")
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
    pre = f"{field_name}."
    return YarnScaling(
        factor=_num(rs, "factor", kind=float, prefix=pre),
        original_max_position_embeddings=_num(rs, "original_max_position_embeddings", prefix=pre),
        beta_fast=_num(rs, "beta_fast", default=32.0, kind=float, prefix=pre),
        beta_slow=_num(rs, "beta_slow", default=1.0, kind=float, prefix=pre),
    )


def _parse(d: dict[str, Any]) -> ModelConfig:
    if "dim" in d and "hidden_size" not in d:
        raise ConfigError("this is DeepSeek's inference/config.json (ModelArgs); point at the model's "
                          "top-level config.json instead")
    if d.get("model_type", "deepseek_v4") != "deepseek_v4":
        raise ConfigError(f"config field `model_type` must be 'deepseek_v4', got {d.get('model_type')!r}")
    n = _num(d, "num_hidden_layers")
    if n <= 0:
        raise ConfigError(f"config field `num_hidden_layers` must be positive, got {n}")
    # Defaults of absent keys are DeepseekV4Config's (and ModelConfig's), so both read a config alike.
    n_mtp = _num(d, "num_nextn_predict_layers", default=1)
    if n_mtp < 0:
        raise ConfigError(f"config field `num_nextn_predict_layers` must be >= 0, got {n_mtp}")
    head_dim = _num(d, "head_dim")

    # layer schedule
    if d.get("layer_types") is not None:
        lt = d["layer_types"]
        if not isinstance(lt, list) or any(t not in _HF_TO_KIND for t in lt):
            raise ConfigError(f"config field `layer_types` must list {tuple(_HF_TO_KIND)}, got {lt!r}")
        if len(lt) < n:
            raise ConfigError(f"config field `layer_types` has {len(lt)} entries for {n} layers")
        kinds = tuple(_HF_TO_KIND[t] for t in lt[:n])
        rates = _req(d, "compress_rates", default={})
        if not isinstance(rates, dict):
            raise ConfigError(f"config field `compress_rates` must be an object, got {rates!r}")
        rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128, **rates}
        for key in ("compressed_sparse_attention", "heavily_compressed_attention"):
            r = rates[key]
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                raise ConfigError(f"config field `compress_rates.{key}` must be a positive integer, got {r!r}")
        ratios = tuple(0 if k == SLIDING else rates[_KIND_TO_HF[k]] for k in kinds)
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
        if len(mt) < n:
            raise ConfigError(f"config field `mlp_layer_types` has {len(mt)} entries for {n} layers")
        n_hash = sum(1 for t in mt[:n] if t == "hash_moe")
        if list(mt[:n]) != ["hash_moe"] * n_hash + ["moe"] * (n - n_hash):
            raise ConfigError("config field `mlp_layer_types`: hash layers must come first")
    else:
        n_hash = _num(d, "num_hash_layers", default=3)

    # rope
    if isinstance(d.get("rope_parameters"), dict) and isinstance(d["rope_parameters"].get("main"), dict):
        rp = d["rope_parameters"]
        main, comp = rp["main"], rp.get("compress", rp["main"])
        if not isinstance(comp, dict):
            raise ConfigError(f"config field `rope_parameters.compress` must be an object, got {comp!r}")
        rope_theta = _num(main, "rope_theta", kind=float, prefix="rope_parameters.main.")
        compress_theta = _num(comp, "rope_theta", kind=float, prefix="rope_parameters.compress.")
        top = _num(d, "partial_rotary_factor", default=0.125, kind=float)
        partial = _num(main, "partial_rotary_factor", default=top, kind=float, prefix="rope_parameters.main.")
        # NOTE: transformers sizes q/k's rope part from the top-level factor but builds cos/sin from the
        # nested ones; a config where they differ means different models to different readers.
        for where, other in (("partial_rotary_factor", d), ("rope_parameters.compress.partial_rotary_factor", comp)):
            v = other.get("partial_rotary_factor")
            if v is not None and v != partial:
                raise ConfigError(f"config field `{where}` ({v!r}) disagrees with "
                                  f"`rope_parameters.main.partial_rotary_factor` ({partial!r})")
        rope_dim = _rope_dim(head_dim, partial, "rope_parameters.main.partial_rotary_factor")
        yarn = _parse_yarn(comp, "rope_parameters.compress")
    else:
        rope_theta = _num(d, "rope_theta", default=10000.0, kind=float)
        compress_theta = _num(d, "compress_rope_theta", default=160000.0, kind=float)
        if d.get("qk_rope_head_dim") is not None:
            rope_dim = _num(d, "qk_rope_head_dim")
        elif d.get("partial_rotary_factor") is not None or d.get("layer_types") is not None:
            # transformers spelling: DeepseekV4Config defaults the factor to 64 / 512
            partial = _num(d, "partial_rotary_factor", default=0.125, kind=float)
            rope_dim = _rope_dim(head_dim, partial, "partial_rotary_factor")
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
        if (not isinstance(bs, list) or len(bs) != 2
                or any(isinstance(b, bool) or not isinstance(b, int) for b in bs)):
            raise ConfigError(f"config field `quantization_config.weight_block_size` must be [rows, cols], got {bs!r}")
        quant = QuantConfig(fmt=qc.get("fmt", "e4m3"), scale_fmt=qc.get("scale_fmt"), block_size=(bs[0], bs[1]))

    eos = _req(d, "eos_token_id", default=1)
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    if any(isinstance(t, bool) or not isinstance(t, int) for t in eos_ids):
        raise ConfigError(f"config field `eos_token_id` must be a token id or a list of them, got {eos!r}")
    expert_dtype = d.get("expert_dtype") or ("fp8" if quant is not None else "bf16")
    n_shared = _num(d, "n_shared_experts", default=1)
    if n_shared > 1:
        raise ConfigError(f"config field `n_shared_experts`: at most 1 is supported, got {n_shared}")
    if d.get("num_key_value_heads", 1) != 1:
        raise ConfigError(f"config field `num_key_value_heads` must be 1 for DeepSeek-V4, got {d['num_key_value_heads']!r}")
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
        n_shared_experts=n_shared,
        num_experts_per_tok=_num(d, "num_experts_per_tok"),
        num_hash_layers=n_hash,
        scoring_func=_req(d, "scoring_func", default="sqrtsoftplus"),
        routed_scaling_factor=_num(d, "routed_scaling_factor", default=1.5, kind=float),
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


def _rope_dim(head_dim: int, partial: float, field_name: str) -> int:
    """head_dim * partial_rotary_factor, which must be a whole number of dims."""
    dims = head_dim * partial
    if not math.isfinite(dims) or abs(dims - round(dims)) > 1e-6:
        raise ConfigError(f"config field `{field_name}`: head_dim {head_dim} x {partial} = {dims} is not a whole "
                          "number of rope dims")
    return int(round(dims))


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
