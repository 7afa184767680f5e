"""Checkpoint tensor table and loader for DeepSeek-V4 safetensors checkpoints (DSV4_SPEC section 7).

:func:`checkpoint_tensors` is the single declarative table: every tensor an official checkpoint holds for a
config (official name, logical shape, official storage dtype, whether it may be FP8/FP4-quantised, and the
model ``state_dict`` entry it fills). The model uses the official names; routed experts are stacked, so
``layers.{i}.ffn.experts.{e}.w1.weight [I, D]`` fills row ``e`` of the parameter
``layers.{i}.ffn.experts.w1 [E, I, D]``. The random-checkpoint writer reads the same table.

:func:`load_weights` reads official checkpoints and those written by transformers' ``save_pretrained``
(see :func:`canonical_name`), dequantises FP8/FP4 tensors and casts everything to the parameter dtype.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from dsv4.config import CSA, SLIDING, ModelConfig
from dsv4.ops.quant import dequantize_fp4_block, dequantize_fp8_block

INDEX_FILE = "model.safetensors.index.json"
FP4_BLOCK = 32


class WeightLoadError(RuntimeError):
    """A checkpoint that cannot be loaded into the model; the message names the tensor and the file."""


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor.

    ``shape`` is the logical (dequantised) shape; ``param`` the model state_dict key it fills, at index
    ``expert`` of dim 0 when the parameter stacks experts. ``storage`` is the official unquantised dtype
    (bf16, fp32, or int64 for ``tid2eid``). ``quant``: "fp8" for the FP8 modules of spec 7.3, "expert" for
    routed experts (FP4 or FP8 per ``cfg.expert_dtype``), "none" otherwise. ``init`` tells the random
    writer how to draw it.
    """

    name: str
    shape: tuple[int, ...]
    param: str
    storage: torch.dtype
    quant: str = "none"
    expert: int | None = None
    init: str = "linear"


def checkpoint_tensors(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor an official checkpoint for ``cfg`` holds, in a stable order, keyed by official name."""
    specs: dict[str, TensorSpec] = {}
    bf16, f32 = torch.bfloat16, torch.float32
    d, hc = cfg.hidden_size, cfg.hc_mult

    def add(name: str, shape: tuple[int, ...], storage: torch.dtype = bf16, quant: str = "none",
            init: str = "linear", param: str | None = None, expert: int | None = None) -> None:
        specs[name] = TensorSpec(name, shape, param or name, storage, quant, expert, init)

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
        add(f"{a}attn_sink", (cfg.num_heads,), f32, init="sink")
        add(f"{a}wq_a.weight", (ql, d), quant="fp8")
        add(f"{a}q_norm.weight", (ql,), init="norm")
        add(f"{a}wq_b.weight", (cfg.num_heads * hd, ql), quant="fp8")
        add(f"{a}wkv.weight", (hd, d), quant="fp8")
        add(f"{a}kv_norm.weight", (hd,), init="norm")
        g_rank = cfg.o_groups * cfg.o_lora_rank
        add(f"{a}wo_a.weight", (g_rank, cfg.num_heads * hd // cfg.o_groups), quant="fp8")
        add(f"{a}wo_b.weight", (d, g_rank), quant="fp8")
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
                add(f"{f}experts.{j}.{w}.weight", shape, quant="expert", param=f"{f}experts.{w}", expert=j)
        if cfg.n_shared_experts:
            si = cfg.n_shared_experts * inter
            for w, shape in (("w1", (si, d)), ("w2", (d, si)), ("w3", (si, d))):
                add(f"{f}shared_experts.{w}.weight", shape, quant="fp8")

    def compressor(p: str, width: int, norm_dim: int, ratio: int) -> None:
        add(f"{p}wkv.weight", (width, d))
        add(f"{p}wgate.weight", (width, d))
        add(f"{p}ape", (ratio, width), f32, init="ape")
        add(f"{p}norm.weight", (norm_dim,), init="norm")

    add("embed.weight", (cfg.vocab_size, d), init="embed")
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
    add("head.weight", (cfg.vocab_size, d))
    return specs


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The model state_dict entries the table fills: name -> (shape, official dtype); experts stacked [E, ...]."""
    return _param_shapes(checkpoint_tensors(cfg), cfg)


def _param_shapes(specs: dict[str, TensorSpec], cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for s in specs.values():
        shape = s.shape if s.expert is None else (cfg.n_routed_experts, *s.shape)
        out.setdefault(s.param, (shape, s.storage))
    return out


# ---- names --------------------------------------------------------------------------------------------
# transformers 5.17 save_pretrained writes official names under a `model.` prefix except for these (checked
# empirically); the rest are the renames official convert.py undoes for HF-style names.
_ALIASES = (
    (re.compile(r"^embed_tokens\.weight$"), "embed.weight"),
    (re.compile(r"^lm_head\.weight$"), "head.weight"),
    (re.compile(r"^hc_head\.hc_(fn|base|scale)$"), r"hc_head_\1"),
    (re.compile(r"\.self_attn\."), ".attn."),
    (re.compile(r"\.mlp\."), ".ffn."),
    (re.compile(r"^((?:layers|mtp)\.\d+\.attn)\.norm\.weight$"), r"\1.kv_norm.weight"),
    (re.compile(r"\.e_score_correction_bias$"), ".bias"),
    (re.compile(r"\.weight_scale_inv$"), ".scale"),
)


def canonical_name(key: str) -> str:
    """Map a checkpoint key (official or transformers-saved spelling) to its official name."""
    if key.startswith("model."):
        key = key[len("model."):]
    for pattern, repl in _ALIASES:
        key = pattern.sub(repl, key)
    return key


def _is_mtp_duplicate(name: str) -> bool:
    # MTP copies of the shared embedding / head (Base checkpoints); official convert.py drops them too.
    return name.startswith("mtp.") and ("emb" in name or name.endswith("head.weight"))


# ---- on-disk formats ----------------------------------------------------------------------------------
_FORMAT_OF = {"BF16": "float", "F16": "float", "F32": "float", "F8_E4M3": "fp8", "I8": "fp4",
              "I32": "int", "I64": "int"}
_SCALE_DTYPES = {"fp8": ("F8_E8M0", "U8", "F32", "BF16"), "fp4": ("F8_E8M0", "U8")}


def _accepted(spec: TensorSpec, cfg: ModelConfig) -> tuple[str, ...]:
    if spec.storage == torch.int64:
        return ("int",)
    if spec.quant == "fp8":
        return ("float", "fp8")
    if spec.quant == "expert":
        return ("float", "fp8", "fp4") if cfg.expert_dtype == "fp4" else ("float", "fp8")
    return ("float",)


def _fp8_block(cfg: ModelConfig) -> tuple[int, int]:
    return tuple(cfg.quantization.block_size) if cfg.quantization else (128, 128)  # type: ignore[return-value]


# ---- loader -------------------------------------------------------------------------------------------
def load_weights(model: torch.nn.Module, cfg: ModelConfig, model_dir: Path, progress: bool = True,
                 with_mtp: bool | None = None) -> None:
    """Fill every parameter/buffer of ``model`` (official names, see module doc) from ``model_dir``.

    Reads ``model.safetensors.index.json`` when present, else every ``*.safetensors`` in the directory,
    tensor by tensor. Quantised tensors are dequantised on the parameter's device in fp32, then cast to the
    parameter dtype. Raises :class:`WeightLoadError` on any mismatch. ``with_mtp`` (default: whether the model
    has ``mtp.*`` parameters) False skips the checkpoint's MTP tensors, as a model built without its draft
    block needs.
    """
    model_dir = Path(model_dir)
    if with_mtp is None:
        with_mtp = any(k.startswith("mtp.") for k in model.state_dict())
    specs = checkpoint_tensors(cfg if with_mtp else cfg.replace(num_mtp_layers=0))
    targets = _model_targets(model, _param_shapes(specs, cfg))
    with ExitStack() as stack:
        sources, handles = _open_sources(model_dir, stack)
        plan = _plan(specs, sources, model_dir)
        files = {path: i for i, path in enumerate(handles)}
        # File by file (table order within a file) keeps reads sequential on disk.
        order = sorted(specs, key=lambda n: files[plan[n][0][1]])
        for name in tqdm(order, desc="Loading weights", unit="tensor", disable=not progress):
            spec = specs[name]
            dst = targets[spec.param]
            value = _read(spec, plan[name], handles, cfg, dst.device)
            with torch.no_grad():
                (dst if spec.expert is None else dst[spec.expert]).copy_(value.to(dst.dtype))


def _model_targets(model: torch.nn.Module,
                   expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """Model state_dict entries by name, after checking they are exactly the table's, with its shapes."""
    by_id: dict[int, list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), []).append(name)
        tensors[name] = t
    targets: dict[str, torch.Tensor] = {}
    for names in by_id.values():
        # A tensor registered under several names (e.g. an MTP block holding the shared embedding) is
        # loaded once, through its table name.
        known = [n for n in names if n in expected]
        if not known:
            raise WeightLoadError(f"model state_dict entry {names[0]!r} is not filled by any checkpoint tensor")
        if len(known) > 1:
            raise WeightLoadError(f"model entries {known} share one tensor but are separate checkpoint tensors")
        targets[known[0]] = tensors[known[0]]
    for name, (shape, dtype) in expected.items():
        if name not in targets:
            raise WeightLoadError(f"model has no parameter or buffer {name!r}, which the checkpoint fills")
        t = targets[name]
        if tuple(t.shape) != shape:
            raise WeightLoadError(f"model entry {name!r} has shape {tuple(t.shape)}, expected {shape}")
        if t.is_floating_point() != dtype.is_floating_point:
            raise WeightLoadError(f"model entry {name!r} has dtype {t.dtype}, expected a {dtype}-like dtype")
    return targets


def _open_sources(model_dir: Path, stack: ExitStack) -> tuple[dict[str, Path], dict[Path, Any]]:
    """Map each checkpoint key to its file and open every file (headers only); checks the index."""
    if not model_dir.is_dir():
        raise WeightLoadError(f"model directory not found: {model_dir}")
    index = model_dir / INDEX_FILE
    handles: dict[Path, Any] = {}

    def open_file(path: Path, holds: list[str]) -> Any:
        if path not in handles:
            if not path.is_file():
                raise WeightLoadError(f"checkpoint file {path} (listed for tensor {holds[0]!r}) does not exist")
            try:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except Exception as e:  # safetensors raises its own error type for bad headers / truncation
                listed = f" (holds tensor {holds[0]!r}{f' and {len(holds) - 1} more' if len(holds) > 1 else ''})" \
                    if holds else ""
                raise WeightLoadError(f"cannot read checkpoint file {path}{listed}: {e}") from None
        return handles[path]

    sources: dict[str, Path] = {}
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (ValueError, KeyError, TypeError) as e:
            raise WeightLoadError(f"bad checkpoint index {index}: {type(e).__name__}: {e}") from None
        by_file: dict[Path, list[str]] = {}
        for key, fname in weight_map.items():
            by_file.setdefault(model_dir / fname, []).append(key)
        for path, keys in by_file.items():
            present = set(open_file(path, keys).keys())
            for key in keys:
                if key not in present:
                    raise WeightLoadError(f"tensor {key!r} is listed in {index} but missing from {path}")
                sources[key] = path
        return sources, handles
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no {INDEX_FILE} and no *.safetensors files in {model_dir}")
    for path in files:
        for key in open_file(path, []).keys():
            if key in sources:
                raise WeightLoadError(f"tensor {key!r} is stored twice: in {sources[key]} and in {path}")
            sources[key] = path
    return sources, handles


_Entry = tuple[str, Path]  # (checkpoint key, file)


def _plan(specs: dict[str, TensorSpec], sources: dict[str, Path],
          model_dir: Path) -> dict[str, tuple[_Entry, _Entry | None]]:
    """Pair each table tensor with its weight (and optional scale) entry; reject anything else."""
    found: dict[str, _Entry] = {}
    for key, path in sources.items():
        name = canonical_name(key)
        if name in found:
            k0, p0 = found[name]
            raise WeightLoadError(f"tensor {name!r} is stored twice: as {k0!r} in {p0} and as {key!r} in {path}")
        found[name] = (key, path)
    plan: dict[str, tuple[_Entry, _Entry | None]] = {}
    for name, (key, path) in found.items():
        if name in specs or (name.endswith(".scale") and name[:-len("scale")] + "weight" in specs):
            continue
        if name.startswith("mtp.") and not any(n.startswith("mtp.") for n in specs):
            continue  # the model was built without its MTP block
        if not _is_mtp_duplicate(name):
            hint = "no model parameter takes it"
            if name.startswith(".experts."):
                # Seen on device: transformers 5.17 saves quantised experts' scales under these names, one
                # set for the whole model, so every layer's but one is lost.
                hint = ("an expert scale saved by transformers' save_pretrained of a quantised model, which "
                        "drops the layer prefix and loses the scales: load the original checkpoint instead")
            raise WeightLoadError(f"unexpected tensor {key!r} in {path} ({hint})")
    missing = [n for n in specs if n not in found]
    if missing:
        files = sorted({str(p) for p in sources.values()})
        where = model_dir / INDEX_FILE if (model_dir / INDEX_FILE).exists() else \
            ", ".join(files) if len(files) <= 3 else f"the {len(files)} *.safetensors files in {model_dir}"
        hint = ""
        if all(n.startswith("mtp.") for n in missing) and not any(n.startswith("mtp.") for n in found):
            hint = ("; the checkpoint has no MTP block (transformers' save_pretrained drops it): build the "
                    "model with num_mtp_layers=0 to load it")
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightLoadError(f"missing tensor {missing[0]!r}{more}: not found in {where}{hint}")
    for name in specs:
        scale = found.get(name[:-len("weight")] + "scale") if name.endswith(".weight") else None
        plan[name] = (found[name], scale)
    return plan


def _read(spec: TensorSpec, entries: tuple[_Entry, _Entry | None], handles: dict[Path, Any],
          cfg: ModelConfig, device: torch.device) -> torch.Tensor:
    """Read one table tensor, check it, and return it dequantised (fp32 or the stored float/int dtype)."""
    (key, path), scale = entries
    where = f"tensor {key!r} in {path}"
    sl = handles[path].get_slice(key)
    st, shape = sl.get_dtype(), tuple(sl.get_shape())
    fmt = _FORMAT_OF.get(st)
    accepted = _accepted(spec, cfg)
    if fmt not in accepted:
        hint = " (packed FP4 experts need expert_dtype 'fp4' in config.json)" if fmt == "fp4" and \
            spec.quant == "expert" else ""
        raise WeightLoadError(f"{where} has dtype {st}; expected one of {_dtype_names(accepted)}{hint}")
    if fmt in ("fp8", "fp4") and scale is None:
        raise WeightLoadError(f"{where} is {st} but has no '.scale' tensor")
    if fmt in ("float", "int") and scale is not None:
        raise WeightLoadError(f"{where} is {st} (not quantised) but the checkpoint has a scale {scale[0]!r} "
                              f"in {scale[1]}")
    want = spec.shape
    if fmt == "fp4":  # quantised tensors are always 2-D weights [N, K]
        n, k = spec.shape
        want = (n, k // 2)
        if k % FP4_BLOCK:
            raise WeightLoadError(f"{where}: FP4 needs the input dim {k} to be a multiple of {FP4_BLOCK}")
    if shape != want:
        raise WeightLoadError(f"{where} has shape {shape}, expected {want}")
    t = _get(handles[path], key, where).to(device)
    if fmt == "float":
        return t
    if fmt == "int":
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= cfg.n_routed_experts):
            raise WeightLoadError(f"{where} holds expert ids outside [0, {cfg.n_routed_experts})")
        return t
    skey, spath = scale  # type: ignore[misc]
    n, k = spec.shape
    swhere = f"scale tensor {skey!r} in {spath}"
    ssl = handles[spath].get_slice(skey)
    sdt, sshape = ssl.get_dtype(), tuple(ssl.get_shape())
    if sdt not in _SCALE_DTYPES[fmt]:
        raise WeightLoadError(f"{swhere} has dtype {sdt}; expected one of {_SCALE_DTYPES[fmt]}")
    if fmt == "fp8":
        bn, bk = _fp8_block(cfg)
        swant = (-(-n // bn), -(-k // bk))
    else:
        swant = (n, k // FP4_BLOCK)
    if sshape != swant:
        raise WeightLoadError(f"{swhere} has shape {sshape}, expected {swant} for weight {spec.name!r}")
    s = _get(handles[spath], skey, swhere).to(device)
    return dequantize_fp8_block(t, s, (bn, bk)) if fmt == "fp8" else dequantize_fp4_block(t, s)


def _get(handle: Any, key: str, where: str) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except Exception as e:  # e.g. a file rewritten under us
        raise WeightLoadError(f"cannot read {where}: {e}") from None


def _dtype_names(formats: tuple[str, ...]) -> list[str]:
    return [dt for dt, f in _FORMAT_OF.items() if f in formats]
