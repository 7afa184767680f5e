"""Checkpoint tensor table and loader for DeepSeek-V4 safetensors checkpoints (DSV4_SPEC section 7).

:func:`checkpoint_tensors` (dsv4/weight_table.py) is the single declarative table: every tensor an official checkpoint holds for a
config (official name, logical shape, official storage dtype, whether it may be FP8/FP4-quantised, and the
model ``state_dict`` entry it fills). The model uses the official names; routed experts are stacked, so
``layers.{i}.ffn.experts.{e}.w1.weight [I, D]`` fills row ``e`` of the parameter
``layers.{i}.ffn.experts.w1 [E, I, D]``. The projections of each attention's input x are a *fused group*
(``group``/``part`` in the table, layout in dsv4/model/x_proj.py): ``layers.{i}.attn.wq_a.weight``,
``...attn.wkv.weight``, ``...attn.compressor.wkv.weight`` etc. fill consecutive rows of the one parameter
``layers.{i}.attn.x_proj.weight`` (:func:`fused_placements`); the loader checks every row of it is filled exactly
once. The random-checkpoint writer reads the same table.

:func:`load_weights` reads official checkpoints and those written by transformers' ``save_pretrained``
(see :func:`canonical_name`). With ``weight_format="dequant"`` it dequantises FP8/FP4 tensors and casts
everything to the parameter dtype; with ``"native"`` the FP8 linears and the routed experts keep their stored
bytes (see :func:`native_parameters` for the formats) and only their scales are converted, exactly, to fp32.

Under tensor/expert parallelism (``parallel``, dsv4/distributed/parallel.py) each rank's model holds slices
(the ``split`` column of the table, see dsv4/distributed/shard.py) and only its own routed experts; the loader
reads just those bytes from the files (safetensors slices), widened to whole quantisation blocks where a slice
cuts one.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from tqdm import tqdm

from dsv4.config import ModelConfig
from dsv4.distributed.parallel import SINGLE, Parallel
from dsv4.distributed.shard import Shard, local_expert, shard_of
from dsv4.ops.quant import dequantize_fp4_block, dequantize_fp8_block, e8m0_to_float
from dsv4.weight_table import (  # noqa: F401  (re-exported: the table is part of this module's interface)
    Placement,
    TensorSpec,
    checkpoint_tensors,
    fused_placements,
    spec_view,
)

INDEX_FILE = "model.safetensors.index.json"
FP4_BLOCK = 32
WEIGHT_FORMATS = ("dequant", "native")
NATIVE_FP8_BLOCK = (128, 128)  # what the native FP8 GEMM kernels assume


class WeightLoadError(RuntimeError):
    """A checkpoint that cannot be loaded into the model; the message names the tensor and the file."""


class WeightFormatError(ValueError):
    """A weight format the model's checkpoint cannot give (e.g. "native" for an unquantised checkpoint)."""


def _local_spec(spec: TensorSpec, par: Parallel) -> TensorSpec:
    sh = shard_of(spec, par)
    if sh is None:
        return spec
    shape = list(spec.shape)
    shape[sh.dim] = sh.size
    return replace(spec, shape=tuple(shape))


def parameter_shapes(cfg: ModelConfig, weight_format: str = "dequant",
                     parallel: Parallel = SINGLE) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The model state_dict entries the table fills: name -> (shape, dtype); experts stacked [E, ...].

    "dequant": the official unquantised dtype of each tensor. "native": see :func:`native_parameters`.
    ``parallel``: the shapes of that rank's slices (its E / ep experts).
    """
    specs = checkpoint_tensors(cfg)
    return {k: (p.shape, p.dtype) for k, p in _param_shapes(specs, cfg, weight_format, parallel).items()}


def check_weight_format(cfg: ModelConfig, weight_format: str) -> None:
    """Raise :class:`WeightFormatError` unless ``cfg``'s checkpoint can be loaded in ``weight_format``."""
    if weight_format not in WEIGHT_FORMATS:
        raise WeightFormatError(f"weight format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    if weight_format == "dequant":
        return
    if cfg.quantization is None:
        raise WeightFormatError("weight format 'native' keeps FP8/FP4 checkpoint weights as stored, but this "
                                "checkpoint is not quantized (config.json has no quantization_config): use 'dequant'")
    if tuple(cfg.quantization.block_size) != NATIVE_FP8_BLOCK:
        raise WeightFormatError(f"weight format 'native' needs FP8 blocks of {NATIVE_FP8_BLOCK}, the checkpoint "
                                f"has {tuple(cfg.quantization.block_size)}: use 'dequant'")
    if cfg.expert_dtype not in ("fp8", "fp4"):
        raise WeightFormatError(f"weight format 'native' needs FP8 or FP4 routed experts, config.json says "
                                f"expert_dtype {cfg.expert_dtype!r}: use 'dequant'")


def keeps_native(spec: TensorSpec, weight_format: str) -> bool:
    """Whether ``spec`` is loaded as stored (FP8 linears, wo_a included, and routed experts) under ``weight_format``."""
    if weight_format != "native":
        return False
    return spec.quant in ("expert", "fp8")


def native_parameters(spec: TensorSpec, cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The parameters a natively kept tensor fills: its weight as stored and its scales in fp32.

    FP8 linear ``<m>.weight [N, K]``: ``<m>.weight`` float8_e4m3fn [N, K] and ``<m>.scale`` fp32
    [ceil(N/128), ceil(K/128)]. Routed expert ``experts.{e}.w1.weight`` (row e of ``experts.w1``): FP8 experts
    ``experts.w1`` float8_e4m3fn [E, N, K] and ``experts.w1_scale`` fp32 [E, ceil(N/128), ceil(K/128)]; FP4
    experts ``experts.w1`` uint8 [E, N, K/2] (two e2m1 codes per byte, column 2j in the low nibble) and
    ``experts.w1_scale`` fp32 [E, N, K/32].
    """
    n, k = spec.shape
    fp4 = spec.quant == "expert" and cfg.expert_dtype == "fp4"
    bn, bk = NATIVE_FP8_BLOCK
    shape, dtype = ((n, k // 2), torch.uint8) if fp4 else ((n, k), torch.float8_e4m3fn)
    sshape = (n, k // FP4_BLOCK) if fp4 else (-(-n // bn), -(-k // bk))
    if spec.expert is None:
        return {spec.param: (shape, dtype), _scale_param(spec): (sshape, torch.float32)}
    e = cfg.n_routed_experts
    return {spec.param: ((e, *shape), dtype), _scale_param(spec): ((e, *sshape), torch.float32)}


def _scale_param(spec: TensorSpec) -> str:
    return spec.param + "_scale" if spec.expert is not None else spec.param[: -len("weight")] + "scale"


class _Param(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype
    exact: bool  # the model's tensor must have exactly this dtype (native bytes), not just a float/int one


def _param_shapes(specs: dict[str, TensorSpec], cfg: ModelConfig, weight_format: str,
                  par: Parallel = SINGLE) -> dict[str, _Param]:
    check_weight_format(cfg, weight_format)
    out: dict[str, _Param] = {}
    n_experts = cfg.n_routed_experts // par.ep_size
    placed = fused_placements(specs, weight_format)
    for s in specs.values():
        s = _local_spec(s, par)
        pl = placed.get(s.name)
        if pl is not None and pl.param != s.param:  # rows of a fused parameter: it grows to hold them
            native = keeps_native(s, weight_format)
            _grow(out, pl.param, pl.row + s.shape[0], s.shape[1], torch.float8_e4m3fn if native else s.storage, native)
            if native:
                bn, bk = NATIVE_FP8_BLOCK
                _grow(out, pl.scale, -(-(pl.row + s.shape[0]) // bn), -(-s.shape[1] // bk), torch.float32, True)
            continue
        if keeps_native(s, weight_format):
            for name, (shape, dtype) in native_parameters(s, cfg).items():
                if s.expert is not None:
                    shape = (n_experts, *shape[1:])
                out.setdefault(name, _Param(shape, dtype, True))
            continue
        shape = s.shape if s.expert is None else (n_experts, *s.shape)
        out.setdefault(s.param, _Param(shape, s.storage, False))
    return out


def _grow(out: dict[str, _Param], name: str, rows: int, cols: int, dtype: torch.dtype, exact: bool) -> None:
    have = out.get(name)
    out[name] = _Param((max(rows, have.shape[0] if have else 0), cols), dtype, exact)


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
                 with_mtp: bool | None = None, weight_format: str = "dequant", parallel: Parallel = SINGLE) -> None:
    """Fill every parameter/buffer of ``model`` (official names, see module doc) from ``model_dir``.

    Reads ``model.safetensors.index.json`` when present, else every ``*.safetensors`` in the directory,
    tensor by tensor. "dequant": quantised tensors are dequantised on the parameter's device in fp32, then cast
    to the parameter dtype. "native": FP8 linears and routed experts are copied byte for byte and
    their scales converted to fp32 (:func:`native_parameters`); the model must hold exactly those dtypes.
    Raises :class:`WeightLoadError` on any mismatch (:class:`WeightFormatError` when the checkpoint is not
    quantised for "native"). ``with_mtp`` (default: whether the model has ``mtp.*`` parameters) False skips
    the checkpoint's MTP tensors, as a model built without its draft block needs. ``parallel``: the model is
    that rank's (its slices, its experts); only those bytes are read.
    """
    model_dir = Path(model_dir)
    if with_mtp is None:
        with_mtp = any(k.startswith("mtp.") for k in model.state_dict())
    specs = checkpoint_tensors(cfg if with_mtp else cfg.replace(num_mtp_layers=0))
    targets = _model_targets(model, _param_shapes(specs, cfg, weight_format, parallel))
    with ExitStack() as stack:
        sources, handles = _open_sources(model_dir, stack)
        plan = _plan(specs, sources, model_dir)
        files = {path: i for i, path in enumerate(handles)}
        # File by file (table order within a file) keeps reads sequential on disk.
        order = sorted(specs, key=lambda n: files[plan[n][0][1]])
        placed = fused_placements(specs, weight_format)
        ledger = _RowLedger()
        for name in tqdm(order, desc="Loading weights", unit="tensor", disable=not progress):
            spec = specs[name]
            expert = None if spec.expert is None else local_expert(spec.expert, cfg.n_routed_experts, parallel)
            if spec.expert is not None and expert is None:
                continue  # another rank's expert
            pl = placed.get(name, Placement(spec.param, 0, _scale_param(spec)))
            fused = pl.param != spec.param
            dst = targets[pl.param]
            shard = shard_of(spec, parallel)
            if keeps_native(spec, weight_format):
                value, scale = _read_native(spec, plan[name], handles, cfg, dst.device, shard)
                _fill(ledger.rows(targets, pl.scale, pl.scale_row, scale.shape[0], name, fused), expert, scale)
            else:
                value = _read(spec, plan[name], handles, cfg, dst.device, shard)
            _fill(ledger.rows(targets, pl.param, pl.row, value.shape[0], name, fused), expert, value)
        ledger.check(targets)


class _RowLedger:
    """Which rows of each fused parameter (one filled by several checkpoint tensors) were loaded, to check every
    row is filled exactly once."""

    def __init__(self) -> None:
        self.spans: dict[str, list[tuple[int, int, str]]] = {}

    def rows(self, targets: dict[str, torch.Tensor], param: str, row: int, n: int, name: str,
             fused: bool) -> torch.Tensor:
        """``targets[param]``, or its rows ``[row, row + n)`` when ``param`` is ``fused`` (recorded for
        :meth:`check`)."""
        dst = targets[param]
        if not fused:
            return dst
        self.spans.setdefault(param, []).append((row, row + n, name))
        return dst.narrow(0, row, n)

    def check(self, targets: dict[str, torch.Tensor]) -> None:
        for param, spans in self.spans.items():
            end = 0
            for a, b, name in sorted(spans):
                if a != end:
                    what = f"{name!r} starts at row {a}, rows {end}..{a - 1} are not loaded" if a > end else \
                        f"{name!r} loads rows {a}..{b - 1}, overlapping rows already loaded"
                    raise WeightLoadError(f"fused parameter {param!r}: {what}")
                end = b
            if end != targets[param].shape[0]:
                raise WeightLoadError(f"fused parameter {param!r}: rows {end}..{targets[param].shape[0] - 1} are not "
                                      f"loaded by any checkpoint tensor")


def _fill(dst: torch.Tensor, expert: int | None, value: torch.Tensor) -> None:
    with torch.no_grad():
        dst = dst if expert is None else dst[expert]
        if value.shape[0] < dst.shape[0]:  # the last vocabulary shard: its padding rows stay zero
            dst[value.shape[0]:].zero_()
            dst = dst[: value.shape[0]]
        dst.copy_(value.to(dst.dtype))


def _model_targets(model: torch.nn.Module, expected: dict[str, _Param]) -> dict[str, torch.Tensor]:
    """Model state_dict entries by name, after checking they are exactly the table's, with its shapes."""
    by_id: dict[int, list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), []).append(name)
        tensors[name] = t
    targets: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for names in by_id.values():
        # A tensor registered under several names (e.g. an MTP block holding the shared embedding) is
        # loaded once, through its table name.
        known = [n for n in names if n in expected]
        if not known:
            unknown.append(names[0])
            continue
        if len(known) > 1:
            raise WeightLoadError(f"model entries {known} share one tensor but are separate checkpoint tensors")
        targets[known[0]] = tensors[known[0]]
    # a model built for another weight format differs first in the natively kept entries (and the fused x
    # projections, laid out per format): name those before the entries they leave unfilled
    for name, (shape, dtype, exact) in expected.items():
        if exact and name not in targets:
            raise WeightLoadError(f"model has no parameter or buffer {name!r}, which the checkpoint fills as {dtype} "
                                  f"{list(shape)} (was the model built for another weight format?)")
    if unknown:
        raise WeightLoadError(f"model state_dict entry {unknown[0]!r} is not filled by any checkpoint tensor")
    for name, (shape, dtype, exact) in expected.items():
        if name not in targets:
            raise WeightLoadError(f"model has no parameter or buffer {name!r}, which the checkpoint fills")
        t = targets[name]
        if tuple(t.shape) != shape:
            raise WeightLoadError(f"model entry {name!r} has shape {tuple(t.shape)}, expected {shape}")
        if exact and t.dtype != dtype:
            raise WeightLoadError(f"model entry {name!r} has dtype {t.dtype}, expected {dtype} (weight format "
                                  f"'native' keeps the checkpoint's bytes)")
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
          cfg: ModelConfig, device: torch.device, shard: Shard | None = None) -> torch.Tensor:
    """Read one table tensor (``shard`` of it), check it, and return it dequantised (fp32 or the stored
    float/int dtype)."""
    fmt, t, s, (lo, hi) = _read_stored(spec, entries, handles, cfg, device, _accepted(spec, cfg), shard=shard)
    if s is not None:
        t = dequantize_fp8_block(t, s, _fp8_block(cfg)) if fmt == "fp8" else dequantize_fp4_block(t, s)
    if shard is None or hi - lo == t.shape[shard.dim]:
        return t
    return t.narrow(shard.dim, lo, hi - lo)  # the slice inside the whole blocks that were read


def _read_native(spec: TensorSpec, entries: tuple[_Entry, _Entry | None], handles: dict[Path, Any],
                 cfg: ModelConfig, device: torch.device, shard: Shard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one natively kept tensor (``shard`` of it): (its stored bytes: float8_e4m3fn, or uint8 packed FP4;
    its scales as fp32, converted exactly). A shard must cut only at quantisation block edges."""
    want = "fp4" if spec.quant == "expert" and cfg.expert_dtype == "fp4" else "fp8"
    fmt, t, s, (lo, hi) = _read_stored(spec, entries, handles, cfg, device, (want,), native=True, shard=shard)
    if shard is not None and (lo != 0 or t.shape[shard.dim] * (2 if fmt == "fp4" and shard.dim == 1 else 1) != hi):
        raise WeightLoadError(f"tensor {spec.name!r}: this rank's slice [{shard.start}, {shard.stop}) of dim "
                              f"{shard.dim} cuts a quantisation block, which weight format 'native' cannot hold: "
                              f"use fewer ranks or weight format 'dequant'")
    return (t.view(torch.uint8) if fmt == "fp4" else t), e8m0_to_float(s)  # type: ignore[arg-type]


def _blocks(shard: Shard | None, n: int, block: int) -> tuple[int, int]:
    """The run of whole ``block``-wide blocks of a dim of length ``n`` that covers ``shard``: [a, b)."""
    if shard is None:
        return 0, n
    return shard.start // block * block, min(n, -(-shard.stop // block) * block)


def _get_part(handle: Any, key: str, where: str, dim: int, a: int, b: int, full: int) -> torch.Tensor:
    """Elements [a, b) along ``dim`` (0 or 1) of a stored tensor, read from the file without the rest."""
    if (a, b) == (0, full):
        return _get(handle, key, where)
    try:
        sl = handle.get_slice(key)
        return sl[a:b] if dim == 0 else sl[:, a:b]
    except Exception as e:
        raise WeightLoadError(f"cannot read {where}: {e}") from None


def _read_stored(spec: TensorSpec, entries: tuple[_Entry, _Entry | None], handles: dict[Path, Any],
                 cfg: ModelConfig, device: torch.device, accepted: tuple[str, ...], native: bool = False,
                 shard: Shard | None = None) -> tuple[str, torch.Tensor, torch.Tensor | None, tuple[int, int]]:
    """Check one table tensor (format in ``accepted``, shapes, its scale) and read it as stored: (format,
    tensor, scale tensor or None, (lo, hi)). With a ``shard`` only the whole quantisation blocks that cover
    it are read; ``[lo, hi)`` is the shard's place along its dim inside what was read (in logical elements)."""
    (key, path), scale = entries
    where = f"tensor {key!r} in {path}"
    sl = handles[path].get_slice(key)
    st, shape = sl.get_dtype(), tuple(sl.get_shape())
    fmt = _FORMAT_OF.get(st)
    if fmt not in accepted:
        hint = " (packed FP4 experts need expert_dtype 'fp4' in config.json)" if fmt == "fp4" and \
            spec.quant == "expert" else ""
        if native:
            hint += (f" (weight format 'native' keeps it as stored, so it must be {accepted[0].upper()} as "
                     f"config.json says; weight format 'dequant' loads it)")
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
    dim = 0 if shard is None else shard.dim
    # the read run along the shard's dim: whole FP8 blocks, whole FP4 scale groups (packed in pairs) along K
    block = 1 if fmt in ("float", "int") else _fp8_block(cfg)[dim] if fmt == "fp8" else 1 if dim == 0 else FP4_BLOCK
    a, b = _blocks(shard, spec.shape[dim], block)
    span = (0, spec.shape[dim]) if shard is None else (shard.start - a, shard.stop - a)
    pack = 2 if fmt == "fp4" and dim == 1 else 1
    t = _get_part(handles[path], key, where, dim, a // pack, b // pack, shape[dim]).to(device)
    if fmt == "float":
        return fmt, t, None, span
    if fmt == "int":
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= cfg.n_routed_experts):
            raise WeightLoadError(f"{where} holds expert ids outside [0, {cfg.n_routed_experts})")
        return fmt, t, None, span
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
    per = block if fmt == "fp8" or dim == 1 else 1  # logical elements per scale along dim
    s = _get_part(handles[spath], skey, swhere, dim, a // per, -(-b // per), sshape[dim]).to(device)
    return fmt, t, s, span


def _get(handle: Any, key: str, where: str) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except Exception as e:  # e.g. a file rewritten under us
        raise WeightLoadError(f"cannot read {where}: {e}") from None


def _dtype_names(formats: tuple[str, ...]) -> list[str]:
    return [dt for dt, f in _FORMAT_OF.items() if f in formats]
