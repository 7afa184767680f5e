"""Deterministic random DeepSeek-V4 checkpoints with official tensor names (for tests and demos).

The tensor list comes from :func:`dsv4.weights.checkpoint_tensors`, so a written checkpoint always loads
with :func:`dsv4.weights.load_weights`. Each tensor is drawn from its own CPU generator seeded by
``(seed, name)``, so the output is byte-identical for a seed and independent of sharding.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dsv4.config import ConfigError, ModelConfig, QuantConfig
from dsv4.ops.quant import quantize_fp4_block, quantize_fp8_block
from dsv4.weights import FP4_BLOCK, INDEX_FILE, TensorSpec, checkpoint_tensors

SINGLE_FILE = "model.safetensors"


def write_random_checkpoint(
    cfg: ModelConfig, out_dir: str | Path, seed: int = 0, quantize: bool | None = None,
    shard_bytes: int = 1 << 30, tokenizer: Any = None,
) -> Path:
    """Write random weights for ``cfg`` into ``out_dir`` (created; must hold no checkpoint yet).

    ``quantize`` (default: ``cfg.quantization is not None``) stores the FP8 modules of spec 7.3 as e4m3 +
    ``.scale`` (ue8m0, or fp32 when the config's scale_fmt is None) and the routed experts as packed FP4 +
    e8m0 ``[N, K/32]`` scales (``expert_dtype="fp4"``) or FP8 blocks (otherwise: a config.json with a
    quantization_config cannot say "bf16 experts"). Unquantised tensors use the official dtypes (bf16,
    fp32 for hc_*/attn_sink/ape/gate.bias, int64 tid2eid). config.json (see :func:`config_json`) always
    describes the files written.
    Shards hold at most ``shard_bytes`` (one oversized tensor gets its own shard); more than one shard
    means ``model-0000N-of-0000M.safetensors`` plus ``model.safetensors.index.json``. ``tokenizer`` may be
    a tokenizer.json path, a directory whose ``tokenizer*.json`` files are copied, or an object with a
    ``save(path)`` method (a ``tokenizers.Tokenizer``). Returns ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX_FILE).exists() or any(out.glob("*.safetensors")):
        raise FileExistsError(f"{out} already holds a checkpoint")
    if quantize is None:
        quantize = cfg.quantization is not None
    expert_fmt = ("fp4" if cfg.expert_dtype == "fp4" else "fp8") if quantize else "bf16"
    file_cfg = cfg.replace(quantization=(cfg.quantization or QuantConfig()) if quantize else None,
                           expert_dtype=expert_fmt)
    specs = list(checkpoint_tensors(cfg).values())
    if expert_fmt == "fp4" and cfg.hidden_size % FP4_BLOCK:
        raise ConfigError(f"config field `hidden_size`: must be a multiple of {FP4_BLOCK} for fp4 experts")
    fmts = {s.name: _format(s, quantize, expert_fmt) for s in specs}

    shards: list[list[TensorSpec]] = []
    size = 0
    for s in specs:
        n = _nbytes(s, fmts[s.name], file_cfg)
        if not shards or (size + n > shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    weight_map: dict[str, str] = {}
    total = 0
    for shard, fname in zip(shards, names, strict=True):
        tensors: dict[str, torch.Tensor] = {}
        for s in shard:
            tensors.update(_materialize(s, fmts[s.name], seed, file_cfg))
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = fname
            total += t.numel() * t.element_size()
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config_json(file_cfg), indent=2, sort_keys=True) + "\n")
    _copy_tokenizer(tokenizer, out)
    return out


def config_json(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents: the official spelling, or transformers' when the official one cannot say it.

    Besides what ``to_official_dict`` refuses (CSA ratios other than 4), compress ratios outside {0, 4, 128}
    also take transformers' spelling: its legacy ``compress_ratios`` parser only knows those three.
    """
    if set(cfg.compress_ratios) <= {0, 4, 128}:
        try:
            return cfg.to_official_dict()
        except ConfigError:
            pass
    return cfg.to_hf_dict()


def _format(spec: TensorSpec, quantize: bool, expert_fmt: str) -> str:
    if quantize and spec.quant == "fp8":
        return "fp8"
    if quantize and spec.quant == "expert":
        return expert_fmt
    return "plain"


def _nbytes(spec: TensorSpec, fmt: str, cfg: ModelConfig) -> int:
    numel = 1
    for d in spec.shape:
        numel *= d
    if fmt == "plain":
        return numel * torch.tensor([], dtype=spec.storage).element_size()
    n, k = spec.shape
    if fmt == "fp4":
        return numel // 2 + numel // FP4_BLOCK
    bn, bk = cfg.quantization.block_size  # type: ignore[union-attr]
    scale_bytes = 1 if cfg.quantization.scale_fmt == "ue8m0" else 4  # type: ignore[union-attr]
    return numel + (-(-n // bn)) * (-(-k // bk)) * scale_bytes


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_tensor(spec: TensorSpec, seed: int, cfg: ModelConfig) -> torch.Tensor:
    """The fp32 (int64 for tid2eid) value the writer draws for ``spec``, before storage rounding.

    Scales keep activations O(1) through many layers: linears N(0, 1/fan_in), norms 1 + N(0, 0.05^2),
    small hyper-connection projections with nonzero bases and positive scales.
    """
    g = torch.Generator(device="cpu").manual_seed(_tensor_seed(seed, spec.name))
    shape = spec.shape

    def randn(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    if spec.init == "tid2eid":
        # A random permutation prefix per token: valid expert ids, distinct within a row.
        v, k = shape
        return torch.rand(v, cfg.n_routed_experts, generator=g).argsort(dim=-1)[:, :k].contiguous()
    if spec.init == "linear":
        return randn(shape[-1] ** -0.5)
    if spec.init == "embed":
        return randn(1.0)
    if spec.init == "norm":
        return 1.0 + randn(0.05)
    if spec.init == "hc_fn":
        return randn(0.5 * shape[-1] ** -0.5)
    if spec.init in ("hc_base", "ape"):
        return randn(0.5)
    if spec.init == "hc_scale":
        return 0.5 + torch.rand(shape, generator=g, dtype=torch.float32)
    if spec.init == "sink":
        return randn(1.0)
    if spec.init == "bias":
        return randn(0.05)
    raise ValueError(f"unknown init {spec.init!r} for {spec.name}")


def _materialize(spec: TensorSpec, fmt: str, seed: int, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Stored tensors for ``spec``: ``{name: value}`` plus ``{<module>.scale: scale}`` when quantised."""
    value = random_tensor(spec, seed, cfg)
    if fmt == "plain":
        return {spec.name: value.to(spec.storage).contiguous()}
    scale_name = spec.name[: -len("weight")] + "scale"
    if fmt == "fp4":
        q, s = quantize_fp4_block(value, FP4_BLOCK)
    else:
        q, s = quantize_fp8_block(value, cfg.quantization.block_size,  # type: ignore[union-attr]
                                  cfg.quantization.scale_fmt)  # type: ignore[union-attr]
    return {spec.name: q.contiguous(), scale_name: s.contiguous()}


def _copy_tokenizer(tokenizer: Any, out: Path) -> None:
    if tokenizer is None:
        return
    if hasattr(tokenizer, "save"):
        tokenizer.save(str(out / "tokenizer.json"))
        return
    src = Path(tokenizer)
    if src.is_dir():
        files = sorted(src.glob("tokenizer*.json"))
        if not files:
            raise FileNotFoundError(f"no tokenizer*.json files in {src}")
        for f in files:
            shutil.copyfile(f, out / f.name)
    elif src.is_file():
        shutil.copyfile(src, out / "tokenizer.json")
    else:
        raise FileNotFoundError(f"tokenizer not found: {src}")
