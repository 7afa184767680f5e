"""Runtime knobs: one frozen :class:`EngineConfig`, and the command line generated from its fields.

Every field carries its help text (and, where the values are a closed set, its choices) in
``field(metadata=...)``; :func:`add_cli_args` turns any such dataclass into argparse flags, so a new
knob is one new field. Flag names follow SGLang/vLLM where they exist (``--model-path`` is an alias of
``--model``).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("auto", "bfloat16", "float32")
KV_CACHE_DTYPES = ("auto", "bf16", "fp8")
OPS = ("auto", "ref", "triton")
WEIGHT_FORMATS = ("dequant", "native")
SPEC_ALGORITHMS = (None, "MTP")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _opt(help: str, **extra: Any) -> dict[str, Any]:
    return {"help": help, **extra}


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = field(default=None, metadata=_opt(
        "model directory (config.json, *.safetensors, tokenizer.json); default: the embedded tiny model",
        aliases=("--model-path",), metavar="PATH"))
    dtype: str = field(default="auto", metadata=_opt(
        "activation/weight dtype; auto = bfloat16 on GPU, float32 on CPU", choices=DTYPES))
    device: str = field(default="auto", metadata=_opt(
        "auto (cuda if available, else cpu), cpu, cuda or cuda:N", metavar="DEVICE"))
    seed: int = field(default=0, metadata=_opt(
        "random seed: a request without a seed of its own samples from a stream seeded with a hash of SEED "
        "and its request id (`dsv4 generate` gives prompt i the seed SEED+i)", metavar="SEED"))
    max_running_requests: int = field(default=64, metadata=_opt(
        "most requests decoded together in one batch"))
    max_model_len: int | None = field(default=None, metadata=_opt(
        "longest prompt + output in tokens; default: the model's max_position_embeddings"))
    max_total_tokens: int | None = field(default=None, metadata=_opt(
        "context tokens the compressed-KV pools hold across all running requests; default: on CUDA what "
        "--mem-fraction of the free memory holds, on CPU max_running_requests x min(max_model_len, 8192)"))
    mem_fraction: float = field(default=0.85, metadata=_opt(
        "on CUDA without --max-total-tokens: the fraction of the GPU memory still free after the weights "
        "that the caches may take (the rest is left for activations); ignored on CPU",
        aliases=("--mem-fraction-static",)))
    page_size: int = field(default=64, metadata=_opt("compressed entries per cache page"))
    chunked_prefill_size: int = field(default=2048, metadata=_opt(
        "most prompt tokens prefilled in one forward; longer prompts are prefilled in chunks"))
    kv_cache_dtype: str = field(default="auto", metadata=_opt(
        "dtype of the KV caches (window ring and compressed entries): auto = the activation dtype; bf16; fp8 = "
        "e4m3 nope dims with a power-of-two scale per 64 and the rope dims in the activation dtype (583 instead "
        "of 1024 bytes per V4 entry; rounds like the official FP8 KV simulation)",
        choices=KV_CACHE_DTYPES))
    quant_sim: bool = field(default=True, metadata=_opt(
        "simulate the official model's quantisation where it changes numerics (FP8 round trip of the "
        "KV cache, FP4 indexer), so outputs match DeepSeek's reference inference"))
    served_model_name: str | None = field(default=None, metadata=_opt(
        "the model name the server reports and accepts; default: the model directory's name", metavar="NAME"))
    ops: str = field(default="auto", metadata=_opt(
        "kernel implementations: auto = Triton on GPU, reference on CPU; ref = PyTorch references everywhere; "
        "triton = fail where a Triton kernel is missing", choices=OPS))
    weight_format: str = field(default="dequant", metadata=_opt(
        "how FP8/FP4 checkpoint weights are held: dequant = dequantized to --dtype at load; native = kept as "
        "stored (FP8 block-scaled linears, FP8/FP4 routed experts) and run by native GEMMs (quantized "
        "checkpoints only)", choices=WEIGHT_FORMATS))

    disable_cuda_graph: bool = field(default=False, metadata=_opt(
        "run decode steps eagerly instead of replaying captured CUDA graphs (CUDA only; debugging)"))
    disable_pdl: bool = field(default=False, metadata=_opt(
        "launch the Triton kernels without programmatic dependent launch (sm_90+ GPUs: each kernel's launch and "
        "ramp-up otherwise overlap the previous kernel's tail; debugging)"))
    cuda_graph_max_bs: int | None = field(default=None, metadata=_opt(
        "largest decode batch replayed from a CUDA graph (buckets 1, 2, 4, 8, then every 16); larger batches run "
        "eagerly; default: min(max_running_requests, 256)"))

    speculative_algorithm: str | None = field(default=None, metadata=_opt(
        "speculative decoding: MTP = the checkpoint's NextN block drafts, the model verifies them in one pass",
        choices=SPEC_ALGORITHMS))
    speculative_num_steps: int = field(default=3, metadata=_opt(
        "draft tokens proposed per step (chained MTP steps)"))
    speculative_num_draft_tokens: int | None = field(default=None, metadata=_opt(
        "tokens per verify = speculative-num-steps + 1 (accepted for SGLang compatibility; must agree)"))

    tp_size: int = field(default=1, metadata=_opt(
        "tensor parallel ranks: query heads, the output projection and the vocabulary split over them (the K=V "
        "head and the compressors replicated); one process per GPU, launched by this command",
        aliases=("--tensor-parallel-size",)))
    ep_size: int = field(default=1, metadata=_opt(
        "expert parallel ranks: the routed experts split into this many ranges; ranks = max(tp-size, ep-size), "
        "the smaller dividing the larger", aliases=("--expert-parallel-size",)))
    dp_size: int = field(default=1, metadata=_opt(
        "data-parallel attention groups (with --enable-dp-attention): the max(tp-size, ep-size) ranks form this "
        "many attention groups, each running its own requests with caches of its own; must divide the ranks",
        aliases=("--data-parallel-size",)))
    enable_dp_attention: bool = field(default=False, metadata=_opt(
        "attention and its caches data parallel over --dp-size groups, the MoE expert parallel over every rank "
        "(each group's tokens gathered for the experts)"))
    nnodes: int = field(default=1, metadata=_opt("machines the ranks are spread over (equal shares)"))
    node_rank: int = field(default=0, metadata=_opt("this machine's index among --nnodes"))
    dist_init_addr: str | None = field(default=None, metadata=_opt(
        "HOST:PORT of node 0's torch.distributed rendezvous; default: a free port on 127.0.0.1 (one node)",
        metavar="HOST:PORT"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise _bad(f.name, f"must be one of {', '.join(map(str, choices))}", getattr(self, f.name))
        if not _DEVICE_RE.match(self.device):
            raise _bad("device", "must be auto, cpu, cuda or cuda:N", self.device)
        if self.model is not None and not self.model:
            raise _bad("model", "must be a path or None", self.model)
        if self.speculative_num_draft_tokens is not None and \
                self.speculative_num_draft_tokens != self.speculative_num_steps + 1:
            raise _bad("speculative_num_draft_tokens", "must be speculative_num_steps + 1 (chained drafts)",
                       self.speculative_num_draft_tokens)
        for name in ("max_running_requests", "chunked_prefill_size", "page_size", "speculative_num_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _bad(name, "must be an integer >= 1", v)
        for name in ("max_model_len", "max_total_tokens", "cuda_graph_max_bs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise _bad(name, "must be None or an integer >= 1", v)
        if (isinstance(self.mem_fraction, bool) or not isinstance(self.mem_fraction, (int, float))
                or not 0 < self.mem_fraction <= 1):
            raise _bad("mem_fraction", "must be in (0, 1]", self.mem_fraction)
        if self.served_model_name is not None and (not isinstance(self.served_model_name, str)
                                                   or not self.served_model_name.strip()):
            raise _bad("served_model_name", "must be a non-empty name or None", self.served_model_name)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise _bad("seed", "must be an integer >= 0", self.seed)
        for name in ("tp_size", "ep_size", "dp_size", "nnodes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _bad(name, "must be an integer >= 1", v)
        if isinstance(self.node_rank, bool) or not isinstance(self.node_rank, int) or \
                not 0 <= self.node_rank < self.nnodes:
            raise _bad("node_rank", f"must be in [0, --nnodes {self.nnodes})", self.node_rank)
        world = max(self.tp_size, self.ep_size)
        if world % self.tp_size or world % self.ep_size:
            raise _bad("ep_size", f"and --tp-size {self.tp_size}: the smaller must divide the larger", self.ep_size)
        if self.dp_size > 1 and not self.enable_dp_attention:
            raise _bad("dp_size", "> 1 needs --enable-dp-attention (data-parallel attention is the only data "
                       "parallelism)", self.dp_size)
        if self.enable_dp_attention and self.dp_size == 1:
            raise _bad("dp_size", "must be > 1 with --enable-dp-attention", self.dp_size)
        if world % self.dp_size:
            raise _bad("dp_size", f"must divide the {world} ranks of max(--tp-size, --ep-size)", self.dp_size)
        if world % self.nnodes:
            raise _bad("nnodes", f"must divide the {world} ranks of max(--tp-size, --ep-size)", self.nnodes)
        if self.nnodes > 1 and not self.dist_init_addr:
            raise _bad("dist_init_addr", "is needed with --nnodes > 1 (node 0's HOST:PORT)", self.dist_init_addr)
        if world > 1 and self.speculative_algorithm is not None:
            raise _bad("speculative_algorithm", "is not supported yet with --tp-size/--ep-size > 1",
                       self.speculative_algorithm)

    # ---- resolved values (torch imported lazily: building a config must stay cheap) ------------------
    def torch_device(self) -> Any:
        """The ``torch.device`` to run on ("auto" picks cuda when available)."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def world_size(self) -> int:
        """Processes the parallel layout needs: max(tp_size, ep_size)."""
        return max(self.tp_size, self.ep_size)

    @property
    def attn_dp_size(self) -> int:
        """Data-parallel attention groups: --dp-size with --enable-dp-attention, else 1."""
        return self.dp_size if self.enable_dp_attention else 1

    def graph_max_bs(self) -> int:
        """Largest decode batch replayed from a CUDA graph by one process; 0 = no graphs (CPU,
        --disable-cuda-graph) or data-parallel attention, whose buckets dsv4.distributed.dp_attention.graph_max_bs
        sizes (each rank captures the same ones)."""
        if self.disable_cuda_graph or self.torch_device().type != "cuda" or self.attn_dp_size > 1:
            return 0
        return min(self.cuda_graph_max_bs or 256, self.max_running_requests)

    def torch_dtype(self) -> Any:
        """The activation ``torch.dtype`` ("auto": bfloat16 on GPU, float32 on CPU, where bf16 is slow)."""
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return {"bfloat16": torch.bfloat16, "float32": torch.float32}[self.dtype]


class EngineConfigError(ValueError):
    """A bad engine setting; the message names the flag."""


def _bad(name: str, why: str, value: object) -> EngineConfigError:
    return EngineConfigError(f"--{name.replace('_', '-')} {why}, got {value!r}")


# ---- CLI generation ---------------------------------------------------------------------------------
def _base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, optional) for annotations like ``int``, ``str | None``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"unsupported CLI annotation {tp!r}")
        return rest[0], True
    return tp, False


_METAVARS: dict[type, str] = {int: "N", float: "X"}


def _optional(kind: type) -> Any:
    """argparse type for ``X | None``: the word 'none' gives None."""

    def parse(s: str) -> Any:
        return None if s.lower() == "none" else kind(s)

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" errors
    return parse


def add_cli_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                 title: str | None = None) -> None:
    """Add one flag per field of dataclass ``cls`` (``foo_bar`` -> ``--foo-bar``; dest is the field name).

    bool fields get ``--flag/--no-flag``; ``X | None`` fields accept ``none``; ``choices``, ``aliases``
    and ``metavar`` come from the field's metadata. ``skip`` leaves fields out (the caller owns them);
    ``title`` names the help section.
    """
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title or f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        md = f.metadata
        flags = [f"--{f.name.replace('_', '-')}", *md.get("aliases", ())]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help = md.get("help", "")
        if "default" not in help:
            help += " (default: %(default)s)"
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": help}
        kind, optional = _base_type(hints[f.name])
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _optional(kind) if optional else kind
            if "choices" in md:
                kw["choices"] = md["choices"]
            else:
                kw["metavar"] = md.get("metavar", _METAVARS.get(kind, f.name.upper()))
        group.add_argument(*flags, **kw)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build dataclass ``cls`` from the parsed flags that :func:`add_cli_args` added (others ignored)."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    return cls(**kw)


def from_cli(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from parsed flags; raises :class:`EngineConfigError` for bad values."""
    return config_from_args(EngineConfig, args)
