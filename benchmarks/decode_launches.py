"""Count the kernel launches of one decode step (and of the prefill before it) on the CPU, and say where each
PyTorch one comes from, so that launch overhead can be cut without a GPU.

    python benchmarks/decode_launches.py [--ops triton] [--prefill 64] [--batch 1] [--where]

The model is benchmarks/decode.py's 4-layer shape (sliding, CSA, HCA, CSA) at its tiny CPU widths, in bf16 (so
the casts a bf16 GPU model does show up), with quant_sim on as the engine runs it; the step is what the CUDA-graph
runner captures: the forward, then the logits of its rows. ``--ops triton`` runs the Triton kernels in the
interpreter (``TRITON_INTERPRET=1`` is set here): each kernel launch counts once, and the aten ops the interpreter
runs to emulate it count not at all.

PyTorch launches are counted below autograd and the composite ops, with a ``TorchDispatchMode``: what it sees is
what the CUDA backend would launch (``F.linear`` arrives as ``mm``, ``.float()`` as ``_to_copy``). Views, ``empty``
and shape queries launch nothing and are not counted. ``mm_fp32`` upcasts its operands off CUDA; it counts as
the single fp32-output GEMM it is on a GPU. Host syncs (``.item()``) and tensors built from host data in the
step are listed apart: a captured step must have neither. The count does not depend on the widths except where
a wrapper picks a plan by shape (split-K, block sizes, chunks): at the Flash widths the GPU may launch a few more
or fewer (2026-12-04: 337 here for the decode step the H200 profile counted as 353 launches).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

aten = torch.ops.aten
# ops that only allocate or describe: no kernel on a GPU (views are recognised by their schema)
FREE = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.sym_size.int,
        aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default,
        aten.detach.default, aten.alias.default, aten.resolve_conj.default, aten.resolve_neg.default,
        aten.is_same_size.default, aten.new_empty.default, aten.new_empty_strided.default,
        aten._unsafe_view.default,  # a view the schema does not mark as one
        aten.scalar_tensor.default}  # a Python scalar wrapped as a CPU 0-dim tensor: a kernel argument on a GPU
# not launches, listed apart: a host sync (.item()), and a tensor built from host data in the step (on a GPU a
# host-to-device copy: it breaks CUDA-graph capture or bakes the value into the graph)
SYNCS = {aten._local_scalar_dense.default: "host sync", aten.lift_fresh.default: "host tensor"}


class Launches(TorchDispatchMode):
    """Records each aten op that would launch a kernel, with its innermost dsv4 call site; ``quiet`` > 0 mutes it
    (inside an interpreted Triton kernel, or a CPU-only emulation counted by hand)."""

    def __init__(self) -> None:
        super().__init__()
        self.quiet = 0
        self.ops: list[tuple[str, str]] = []  # (name, call site)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.quiet and func not in FREE and not func.is_view:
            self.ops.append((SYNCS.get(func, f"aten.{func.__name__}"), site()))
        return out

    def add(self, name: str) -> None:
        if not self.quiet:
            self.ops.append((name, site()))


MODE: Launches | None = None


def site() -> str:
    """``file:line (function)`` of the innermost frame under dsv4/ (else under benchmarks/)."""
    f, fallback = sys._getframe(2), None
    while f is not None:
        path = f.f_code.co_filename
        if "/dsv4/" in path and "python_dispatch" not in path:
            return f"{path.split('/dsv4/', 1)[1]}:{f.f_lineno} ({f.f_code.co_name})"
        if fallback is None and "/benchmarks/" in path and f.f_code.co_name not in ("add", "__torch_dispatch__"):
            fallback = f"benchmarks/{path.split('/benchmarks/', 1)[1]}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    return fallback or "?"


def patch_triton() -> None:
    """Count every interpreted kernel launch as ``triton:<name>`` and mute the aten ops it runs."""
    import triton.runtime.interpreter as interp
    from interp_patch import apply

    apply()
    run = interp.InterpretedFunction.run

    def traced(self, *args, **kw):
        if MODE is None:
            return run(self, *args, **kw)
        MODE.add(f"triton:{self.fn.__name__}")
        MODE.quiet += 1
        try:
            return run(self, *args, **kw)
        finally:
            MODE.quiet -= 1

    interp.InterpretedFunction.run = traced


def patch_mm_fp32() -> None:
    """Count ``mm_fp32`` on 16-bit operands as its one CUDA GEMM (``torch.mm(out_dtype=float32)``), not the CPU's
    two upcasts and an fp32 GEMM."""
    import dsv4.distributed.vocab as vocab
    import dsv4.model.x_proj as x_proj
    from dsv4.ops import mm_fp32 as mod

    plain = mod.mm_fp32

    def counted(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if MODE is None or (x.dtype == torch.float32 and w.dtype == torch.float32) or x.dtype != w.dtype:
            return plain(x, w)
        MODE.add("aten.mm (fp32 out)")
        MODE.quiet += 1
        try:
            return plain(x, w)
        finally:
            MODE.quiet -= 1

    for m in (mod, x_proj, vocab):
        m.mm_fp32 = counted


def count(fn) -> list[tuple[str, str]]:
    global MODE
    MODE = Launches()
    try:
        with MODE:
            fn()
        return MODE.ops
    finally:
        MODE = None


def report(label: str, ops: list[tuple[str, str]], where: bool) -> dict:
    by_name = collections.Counter(n for n, _ in ops)
    syncs = [f"{n} at {s}" for n, s in ops if n in SYNCS.values()]
    kern = sum(v for k, v in by_name.items() if k.startswith("triton:"))
    torch_n = sum(by_name.values()) - kern - len(syncs)
    print(f"# {label}: {kern + torch_n} launches = {kern} Triton + {torch_n} PyTorch"
          + (f"; not graph-safe: {sorted(set(syncs))}" if syncs else ""))
    for k, v in by_name.most_common():
        print(f"{v:4d}  {k}")
    if where:
        print(f"## PyTorch launches of {label} by call site")
        sites = collections.Counter((s, n) for n, s in ops if not n.startswith("triton:") and n not in SYNCS.values())
        for (s, n), v in sorted(sites.items()):
            print(f"{v:4d}  {n:34s} {s}")
    return dict(label=label, launches=kern + torch_n, triton=kern, torch=torch_n, syncs=len(syncs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default="triton", choices=("triton", "ref"))
    ap.add_argument("--prefill", type=int, default=64, help="prompt tokens before the decode step")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--where", action="store_true", help="list every PyTorch launch's call site")
    args = ap.parse_args()
    if args.ops == "triton":
        patch_triton()
    patch_mm_fp32()
    from decode import model_config
    from decode_weights import random_loader

    from dsv4.cache.manager import CacheManager
    from dsv4.cache.model_cache import ModelCache
    from dsv4.engine.forward_batch import ForwardBatch
    from dsv4.model.deepseek_v4 import DeepseekV4
    from dsv4.model.layers import ModelOptions

    torch.manual_seed(0)
    cfg = model_config(args.layers, "bf16")
    dt = torch.bfloat16
    model = DeepseekV4(cfg, dt, ModelOptions(quant_sim=True, ops=args.ops), with_mtp=False).eval()
    random_loader("bf16", 0)(model, cfg, None)
    b, ctx = args.batch, args.prefill
    cache = ModelCache(cfg, b + 1, ctx + 8, (b + 1) * (ctx + 8), page_size=16, dtype=dt, device="cpu", with_mtp=False)
    mgr = CacheManager(cache)
    slots = [mgr.alloc() for _ in range(b)]
    for s in slots:
        mgr.reserve(s, ctx + 4)
    ids = torch.randint(cfg.vocab_size, (b, ctx + 2)).tolist()

    def step(fb: ForwardBatch) -> None:  # what cuda_graph.py captures: model_runner._forward_eager
        streams = model(fb, cache)
        model.logits(streams[fb.logits_rows])

    results = []
    with torch.no_grad():
        pre = ForwardBatch.build(slots, [0] * b, [r[:ctx] for r in ids])
        results.append(report(f"prefill {b}x{ctx} (ops {args.ops})", count(lambda: step(pre)), args.where))
        step(ForwardBatch.build(slots, [ctx] * b, [[r[ctx]] for r in ids]))  # one decode step before the counted one
        dec = ForwardBatch.build(slots, [ctx + 1] * b, [[r[ctx + 1]] for r in ids])
        results.append(report(f"decode batch {b} (ops {args.ops})", count(lambda: step(dec)), args.where))
    import json

    print(json.dumps(dict(layers=args.layers, results=results)))


if __name__ == "__main__":
    main()
