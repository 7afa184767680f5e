"""Whole-model decode and prefill on a Flash-shaped model with N layers, against the floor and transformers.

    python benchmarks/decode.py [--weights bf16|fp8|fp8-fp4] [--layers 4] [--quick] [--no-hf]
    python benchmarks/decode.py --profile          # torch.profiler breakdown of one decode step
    python benchmarks/decode.py                    # without CUDA: a tiny-width smoke run on the CPU (seconds)

The model is V4-Flash's widths (hidden 4096, 64 heads x 512, 256 experts of 2048, top-6, vocab 129280) with
``--layers`` layers (sliding, CSA, HCA, CSA, ... alternating after the first), bf16, built by the engine's
own :class:`ModelRunner` with random weights drawn on the device (a checkpoint of this size would take
minutes to write). ``fp8`` rounds every FP8 linear and the experts through 128x128 FP8 blocks, ``fp8-fp4``
the experts through FP4 instead, and the model holds them natively (``--weight-format native``). transformers
5.17 eager gets the same values in bf16.

Decode contexts are filled by writing random contents straight into the caches (rings, compressor tails,
paged pools) and starting the requests at that prefix length: a real prefill of 64k x 256 tokens would take
longer than the whole run. Each step decodes one token per request at the next position; time per step is
the median over several steps (CUDA events). Floors (METHOD.md): ``max(bytes / copy bandwidth, FLOPs /
matmul peak)``, both measured here; decode bytes count every weight the step reads (routed experts: the
distinct experts the step actually routed to, counted in an extra eager pass) plus every cache byte read.
Card first, progress lines as points finish, a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # decode_weights, decode_cost

from decode_cost import Cost, nbytes  # noqa: E402
from decode_profile import profile_report, profiled  # noqa: E402
from decode_weights import DEV, fill_weights, model_tensors, random_loader  # noqa: E402

from dsv4.cache.model_cache import ModelCache  # noqa: E402
from dsv4.config import CSA, HCA, SLIDING, ModelConfig, QuantConfig, flash_config  # noqa: E402
from dsv4.engine import model_runner as runner_mod  # noqa: E402
from dsv4.engine.engine_config import EngineConfig  # noqa: E402
from dsv4.engine.forward_batch import ForwardBatch  # noqa: E402
from dsv4.model.deepseek_v4 import DeepseekV4  # noqa: E402
from dsv4.model.layers import ModelOptions  # noqa: E402
from dsv4.ops import attention_mq_triton as attn_mq  # noqa: E402
from dsv4.ops import pdl  # noqa: E402

CUDA = torch.cuda.is_available()
GiB = 1 << 30
if CUDA:
    BATCHES, CONTEXTS, PREFILLS = (1, 16, 64, 256), (512, 8192, 65536), (1024, 4096)
    HF_BATCHES, HF_CTX, PROFILE_CTX = (1, 16), 512, 8192
    WARM, MIN_STEPS, MAX_STEPS, REPS, POINT_S, RESERVE = 2, 3, 10, 3, 1.5, 8 * GiB
else:  # tiny widths: the whole sweep in seconds, same code path
    BATCHES, CONTEXTS, PREFILLS = (1, 2), (40, 136), (16, 64)
    HF_BATCHES, HF_CTX, PROFILE_CTX = (1, 2), 40, 40
    WARM, MIN_STEPS, MAX_STEPS, REPS, POINT_S, RESERVE = 1, 2, 2, 1, 0.0, 0
HEADROOM = 2 * (WARM + MAX_STEPS) + 2  # positions past the context a point may decode (profile: twice)
VARIANTS = ("bf16", "fp8", "fp8-fp4")


# ---- the model ----------------------------------------------------------------------------------------
def model_config(layers: int, weights: str) -> ModelConfig:
    """Flash widths (tiny ones without CUDA), ``layers`` layers: sliding, then CSA/HCA alternating."""
    kinds = tuple([SLIDING] + [(CSA, HCA)[i % 2] for i in range(layers - 1)])
    ratios = tuple({SLIDING: 0, CSA: 4, HCA: 128}[k] for k in kinds)
    base = flash_config()
    if not CUDA:
        base = dataclasses.replace(
            base, vocab_size=512, hidden_size=128, num_heads=4, head_dim=128, q_lora_rank=128, o_groups=2,
            o_lora_rank=64, sliding_window=16, index_n_heads=8, index_head_dim=64, index_topk=8,
            moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=2)
    quant = QuantConfig() if weights != "bf16" else None
    expert = {"bf16": "bf16", "fp8": "fp8", "fp8-fp4": "fp4"}[weights]
    return dataclasses.replace(base, num_layers=layers, layer_kinds=kinds, compress_ratios=ratios,
                               num_hash_layers=min(base.num_hash_layers, layers), num_mtp_layers=0,
                               quantization=quant, expert_dtype=expert)


# ---- timing -------------------------------------------------------------------------------------------
class Clock:
    """Marks on the device timeline (CUDA events) or the host clock; intervals in ms."""

    def __init__(self) -> None:
        self.marks: list = []

    def mark(self) -> None:
        if CUDA:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        if CUDA:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        c = Clock()
        c.mark()
        fn()
        c.mark()
        times += c.intervals()
    return statistics.median(times)


def copy_gbps() -> float:
    """Device-to-device copy (2 GiB on CUDA, as benchmarks/kernels.py): (read + write bytes) / time."""
    x = torch.empty((2 * GiB if CUDA else 1 << 24) // 2, dtype=torch.int16, device=DEV).random_()
    y = torch.empty_like(x)
    t = median_ms(lambda: y.copy_(x), 20)
    return 2 * nbytes(x) / t / 1e6


def matmul_tflops() -> float:
    """Dense matmul peak: bf16 8192^3 on CUDA (fp32 512^3 on the CPU)."""
    n, dt = (8192, torch.bfloat16) if CUDA else (512, torch.float32)
    a, b = torch.randn(n, n, device=DEV, dtype=dt), torch.randn(n, n, device=DEV, dtype=dt)
    return 2 * n**3 / median_ms(lambda: a @ b, 20) / 1e9


@contextmanager
def expert_counter(model: torch.nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Record each MoE router's expert ids [T, k] (forward hooks on ``layers.N.ffn.gate``) while inside."""
    ids: dict[int, torch.Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "layers" and parts[2:] == ["ffn", "gate"]:
            def hook(m: torch.nn.Module, inp: object, out: object, lid: int = int(parts[1])) -> None:
                outs = out if isinstance(out, (tuple, list)) else (out,)
                for o in outs:
                    if isinstance(o, torch.Tensor) and not o.is_floating_point():
                        ids[lid] = o
            handles.append(mod.register_forward_hook(hook))
    try:
        yield ids
    finally:
        for h in handles:
            h.remove()


def distinct_experts(model: torch.nn.Module, run: Callable[[], object], cfg: ModelConfig, tokens: int) -> list[int]:
    """Distinct routed experts per layer in one eager forward ``run()``; if the router could not be observed,
    the expectation under uniform routing, ``E (1 - (1 - k/E)^tokens)``."""
    with expert_counter(model) as ids, torch.no_grad():
        run()
    return [int(ids[i].unique().numel()) if i in ids else expected_experts(cfg, tokens) for i in range(cfg.num_layers)]


def expected_experts(cfg: ModelConfig, tokens: int) -> int:
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    return round(e * (1 - (1 - k / e) ** tokens))


# ---- dsv4 ----------------------------------------------------------------------------------------------
def plan_points(args: argparse.Namespace, cfg: ModelConfig, ecfg_kw: dict) -> tuple[list, list[str]]:
    """Decode points whose caches fit next to the weights (sizes from a meta-device build); skip reasons."""
    points = [(b, c) for c in args.contexts for b in args.batches]
    if not CUDA:
        return points, []
    opts = {"weight_format": ecfg_kw["weight_format"]} if "weight_format" in ecfg_kw else {}
    with torch.device("meta"):
        w = sum(nbytes(t) for t in model_tensors(DeepseekV4(cfg, torch.bfloat16, ModelOptions(ops="ref", **opts),
                                                            with_mtp=False)).values())
    free = torch.cuda.mem_get_info()[0]
    budget = free - w - RESERVE
    kept, skipped = [], []
    for b, c in points:
        need = cache_bytes(cfg, b, c + HEADROOM, b * (c + HEADROOM))
        if need > budget:
            skipped.append(f"decode b={b} ctx={c}: cache needs {need / GiB:.1f} GiB; {free / GiB:.1f} GiB free - "
                           f"{w / GiB:.1f} GiB weights - {RESERVE / GiB:.0f} GiB reserve = {budget / GiB:.1f} GiB")
        else:
            kept.append((b, c))
    return kept, skipped


def cache_bytes(cfg: ModelConfig, slots: int, max_len: int, tokens: int) -> int:
    """An upper bound: the bf16 cache (an FP8 KV cache is smaller)."""
    return ModelCache(cfg, slots, max_len, tokens, dtype=torch.bfloat16, device="meta", with_mtp=False).total_bytes()


def build_runner(cfg: ModelConfig, args: argparse.Namespace, points: list, ecfg_kw: dict) -> runner_mod.ModelRunner:
    slots = max([b for b, _ in points] + [1])
    max_len = max([c for _, c in points] + [0]) + HEADROOM
    tokens = max([b * (c + HEADROOM) for b, c in points] + [max(args.prefills, default=1)])
    ecfg = EngineConfig(device=DEV.type, dtype="bfloat16" if CUDA else "float32", max_running_requests=slots,
                        max_model_len=max(max_len, max(args.prefills, default=1) + 1), max_total_tokens=tokens,
                        ops=args.ops, **ecfg_kw)
    with mock.patch.object(runner_mod, "load_weights", random_loader(args.weights, args.seed)):
        return runner_mod.ModelRunner(cfg, ecfg, Path("."), progress=False)


@torch.no_grad()
def randomize(tensors: dict[str, torch.Tensor]) -> None:
    """Random cache contents (values do not change the work): N(0, 1), through a cast for FP8 tensors;
    scale tensors 1 so that no value is inf or NaN."""
    for name, t in tensors.items():
        if "scale" in name or t.dtype == torch.float8_e8m0fnu:
            t.fill_(1)
        elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            for i in range(0, t.shape[0], 4096):
                t[i : i + 4096].copy_(torch.randn(t[i : i + 4096].shape, device=t.device))
        elif t.is_floating_point():
            t.normal_()


def cache_tensors(cache: ModelCache, pools: bool) -> dict[str, torch.Tensor]:
    return {f"{lid}.{n}": t for lid, lc in cache.layers.items()
            for n, t in (lc.pools() if pools else lc.slot_tensors()).items()}


@contextmanager
def decode_batches(runner: runner_mod.ModelRunner, b: int, ctx: int, n: int) -> Iterator[list[ForwardBatch]]:
    """``b`` fresh requests whose caches hold ``ctx`` tokens of random contents; yields ``n`` decode batches at
    positions ctx, ctx + 1, ... (built before any timing); frees the requests after."""
    mgr = runner.cache_manager
    slots = [mgr.alloc() for _ in range(b)]
    try:
        for s in slots:
            mgr.reserve(s, ctx + HEADROOM)
        randomize(cache_tensors(runner.cache, pools=False))  # rings and compressor tails, after alloc reset them
        ids = torch.randint(runner.model_cfg.vocab_size, (n, b)).tolist()
        yield [ForwardBatch.build(slots, [ctx + i] * b, [[t] for t in ids[i]], device=DEV) for i in range(n)]
    finally:
        for s in slots:
            mgr.free(s)


def timed_steps(runner: runner_mod.ModelRunner, batches: list[ForwardBatch]) -> list[float]:
    clock = Clock()
    clock.mark()
    for fb in batches:
        runner.forward(fb)
        clock.mark()
    return clock.intervals()


def decode_point(runner: runner_mod.ModelRunner, cost: Cost, b: int, ctx: int) -> dict:
    with decode_batches(runner, b, ctx, WARM + MAX_STEPS) as batches:
        experts = distinct_experts(runner.model, lambda: runner.model(batches[0], runner.cache), runner.model_cfg, b)
        t_warm = timed_steps(runner, batches[:WARM])[-1] / 1e3
        steps = max(MIN_STEPS, min(MAX_STEPS, int(POINT_S / max(t_warm, 1e-6))))
        ms = statistics.median(timed_steps(runner, batches[WARM : WARM + steps]))
        graphs = getattr(runner, "graphs", None)
        graphed = bool(graphs is not None and graphs.can_run(batches[0]))
    nb, flops = cost.decode(b, ctx, experts)
    return dict(nbytes=nb, flops=flops, ms=ms, steps=steps, experts=round(sum(experts) / len(experts), 1),
                graph=graphed)


def prefill_point(runner: runner_mod.ModelRunner, cost: Cost, tokens: int, reps: int) -> dict:
    """A prompt of ``tokens`` tokens from position 0 in a fresh slot, ``reps`` times after one warm-up."""
    cfg, mgr = runner.model_cfg, runner.cache_manager
    ids = torch.randint(cfg.vocab_size, (tokens,)).tolist()
    times, experts = [], []
    for r in range(1 + reps):
        slot = mgr.alloc()
        try:
            mgr.reserve(slot, tokens)
            fb = ForwardBatch.build([slot], [0], [ids], device=DEV)
            if r == 0:
                experts = distinct_experts(runner.model, lambda fb=fb: runner.model(fb, runner.cache), cfg, tokens)
            t = timed_steps(runner, [fb])
            times += t if r else []
        finally:
            mgr.free(slot)
    nb, flops = cost.prefill(tokens, experts)
    return dict(nbytes=nb, flops=flops, ms=statistics.median(times), steps=reps,
                experts=round(sum(experts) / len(experts), 1))


# ---- transformers ----------------------------------------------------------------------------------------
def build_hf(cfg: ModelConfig, weights: str, seed: int) -> torch.nn.Module:
    """transformers' deepseek_v4 (eager, bf16 on CUDA, fp32 on the CPU) holding the values dsv4 holds (its
    FP8/FP4 weights dequantized: transformers runs them in bf16)."""
    from transformers import AutoModelForCausalLM, DeepseekV4Config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from oracle import hf_to_dsv4_state

    plain = cfg.replace(quantization=None, expert_dtype="bf16")
    with torch.device(DEV):
        hf = AutoModelForCausalLM.from_config(DeepseekV4Config(**plain.to_hf_dict()),
                                              dtype=torch.bfloat16 if CUDA else torch.float32).eval()
    with torch.no_grad():
        views = hf_to_dsv4_state(hf, plain)
        filled = fill_weights(views, cfg, weights, seed)
    missing = sorted(set(views) - set(filled))
    if missing:
        print(f"# note: {len(missing)} transformers tensors kept their own init: {missing[:4]}")
    return hf


@torch.no_grad()
def hf_decode(hf: torch.nn.Module, vocab: int, b: int, ctx: int) -> float:
    out = hf(input_ids=torch.randint(vocab, (b, ctx), device=DEV), use_cache=True, logits_to_keep=1)
    pkv = out.past_key_values
    toks = torch.randint(vocab, (WARM + MAX_STEPS, b, 1), device=DEV)
    for i in range(WARM):
        hf(input_ids=toks[i], past_key_values=pkv, use_cache=True)
    clock = Clock()
    clock.mark()
    for i in range(WARM, WARM + MAX_STEPS):
        hf(input_ids=toks[i], past_key_values=pkv, use_cache=True)
        clock.mark()
    return statistics.median(clock.intervals())


@torch.no_grad()
def hf_prefill(hf: torch.nn.Module, vocab: int, tokens: int, reps: int) -> float:
    ids = torch.randint(vocab, (1, tokens), device=DEV)
    return median_ms(lambda: hf(input_ids=ids, use_cache=True, logits_to_keep=1), reps)


# ---- profile -------------------------------------------------------------------------------------------
def profile_point(runner: runner_mod.ModelRunner, b: int, ctx: int) -> dict:
    """Top kernels of one decode step by device time, launches per step, and the GPU's idle share of the step
    (1 - merged kernel busy time / step time measured without the profiler). On the CPU: top-level ops."""
    n = MAX_STEPS
    with decode_batches(runner, b, ctx, 2 * (WARM + n)) as batches:
        timed_steps(runner, batches[:WARM])
        step_us = statistics.median(timed_steps(runner, batches[WARM : WARM + n])) * 1e3
        timed_steps(runner, batches[WARM + n : 2 * WARM + n])
        prof = profiled(lambda: timed_steps(runner, batches[2 * WARM + n :]))
    return profile_report(prof, n, step_us, f"decode batch {b}, context {ctx}", dict(batch=b, ctx=ctx))


def profile_prefill(runner: runner_mod.ModelRunner, tokens: int) -> dict:
    """The same breakdown for one prefill of ``tokens`` tokens from position 0 (after one warm-up)."""
    cfg, mgr = runner.model_cfg, runner.cache_manager
    ids = torch.randint(cfg.vocab_size, (tokens,)).tolist()

    def once() -> list[float]:
        slot = mgr.alloc()
        try:
            mgr.reserve(slot, tokens)
            return timed_steps(runner, [ForwardBatch.build([slot], [0], [ids], device=DEV)])
        finally:
            mgr.free(slot)

    once()
    step_us = once()[0] * 1e3
    prof = profiled(once)
    return profile_report(prof, 1, step_us, f"prefill of {tokens} tokens", dict(prefill=tokens))


# ---- main ----------------------------------------------------------------------------------------------
COLS = ("impl", "kind", "batch", "ctx", "ms", "floor_ms", "bound", "ratio", "experts", "gbytes", "tflop", "steps",
        "graph")


def sig(x: float) -> float:
    return float(f"{x:.4g}")


def make_row(impl: str, kind: str, batch: int, ctx: int, r: dict, bw: float, peak: float) -> dict:
    t_bytes, t_flops = r["nbytes"] / bw / 1e6, r["flops"] / peak / 1e9
    floor = max(t_bytes, t_flops)
    row = dict(impl=impl, kind=kind, batch=batch, ctx=ctx, ms=sig(r["ms"]), floor_ms=sig(floor),
               bound="bytes" if t_bytes >= t_flops else "flops", ratio=sig(r["ms"] / floor),
               experts=r.get("experts"), gbytes=sig(r["nbytes"] / 1e9), tflop=sig(r["flops"] / 1e12),
               steps=r.get("steps"), graph=r.get("graph", False))
    print(" | ".join(str(row[c]) for c in COLS), flush=True)
    return row


def print_card(cfg: ModelConfig, runner: runner_mod.ModelRunner, cost: Cost, args: argparse.Namespace, bw: float,
               peak: float, graphs: str) -> dict:
    name = torch.cuda.get_device_name() if CUDA else "cpu (tiny-width smoke run)"
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in runner.model.parameters()})
    native = any(d.startswith(("float8", "uint8", "int8")) for d in dtypes)
    fmt = "native" if native else "dequantized" if args.weights != "bf16" else "plain"
    kv = "fp8 e4m3 + scales" if getattr(runner.cache, "kv_fp8", False) else str(runner.cache.dtype).replace("torch.", "")
    pdl_on = CUDA and pdl.enabled() and pdl.supported(torch.device("cuda"))
    print(f"# {name}, torch {torch.__version__}; model ops: {runner.model.opts.ops}; {graphs}; KV cache {kv}; "
          f"PDL {'on' if pdl_on else 'off'}; multi-query attention {'on' if attn_mq.ENABLED else 'off'}")
    print(f"# model: {cfg.num_layers} layers ({', '.join(cfg.layer_kinds)}), hidden {cfg.hidden_size}, {cfg.num_heads} heads x "
          f"{cfg.head_dim}, {cfg.n_routed_experts} experts of {cfg.moe_intermediate_size} top-{cfg.num_experts_per_tok}, "
          f"vocab {cfg.vocab_size}; weights {args.weights} ({fmt}; parameter dtypes {', '.join(dtypes)})")
    print(f"# measured: copy {bw:.4g} GB/s (read + write), matmul {peak:.3g} TFLOP/s "
          f"({'bf16 8192^3' if CUDA else 'fp32 512^3'})")
    total = sum(cost.by_kind.values())
    print(f"# weight bytes: {total / 1e9:.3f} GB: " + ", ".join(
        f"{k} {v / 1e9:.3f}" for k, v in sorted(cost.by_kind.items(), key=lambda kv: -kv[1])))
    per_tok = {}
    for lid, (kind, ratio, row, comp, idx) in enumerate(cost.layers):
        per_tok.setdefault(kind, dict(bytes_per_token=(comp + idx) / ratio if ratio else 0.0,
                                      slot_bytes=cost.slot_bytes[lid], ring_row=row))
    print("# cache per layer: " + "; ".join(
        f"{k}: {v['bytes_per_token']:.1f} B/token, {v['slot_bytes'] / 1024:.0f} KiB/slot (ring + tails)"
        for k, v in per_tok.items()))
    print(f"# contexts filled with random cache contents at the prefix length (no prefill); "
          f"dense MACs/token {cost.dense_macs() / 1e9:.3f} G (+ head {cost.head_macs() / 1e9:.3f} G per logits row)")
    print("# floor = max(bytes / copy bandwidth, FLOPs / matmul peak). decode bytes = all non-expert weights + "
          "batch x (embedding row + hash rows) + distinct routed experts x expert bytes (per layer, counted) + "
          "batch x cache read (window min(ctx+1, 128) rows; CSA min(top-k, n) entries + n indexer keys, "
          "n = (ctx+1)//4; HCA (ctx+1)//128 entries); decode FLOPs = 2 x batch x (dense MACs + attention/indexer "
          "MACs + head). prefill bytes = weights touched + cache written; FLOPs = 2 x (T x dense MACs + causal "
          "attention/indexer MACs + one head row)")
    return dict(device=name, torch=torch.__version__, ops=runner.model.opts.ops, graphs=graphs, kv_cache=kv,
                weights=args.weights,
                weight_format=fmt, layers=list(cfg.layer_kinds), copy_gbps=round(bw, 1), matmul_tflops=round(peak, 1),
                weight_bytes=cost.by_kind, cache=per_tok, fill="random cache contents")


def graph_note(runner: runner_mod.ModelRunner) -> str:
    if not CUDA:
        return "eager (CPU)"
    if runner.graphs is None:
        return "CUDA graphs off: decode timed eager"
    return f"decode replayed from CUDA graphs up to batch {runner.engine_cfg.graph_max_bs()} (larger batches eager)"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--weights", choices=VARIANTS, default="bf16")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", type=ints, default=list(BATCHES), help="comma-separated decode batch sizes")
    ap.add_argument("--contexts", type=ints, default=list(CONTEXTS), help="comma-separated decode contexts")
    ap.add_argument("--prefills", type=ints, default=list(PREFILLS), help="comma-separated prefill lengths")
    ap.add_argument("--quick", action="store_true", help="batches 1,16 x context 512,8k; prefill 1024")
    ap.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers")
    ap.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                    help="CUDA-graph decode where the runner offers it")
    ap.add_argument("--profile", action="store_true", help="profile one decode step at batch 1 and 16, ctx 8k, and the longest --prefills prefill")
    ap.add_argument("--ops", choices=("auto", "ref", "triton"), default="auto")
    ap.add_argument("--attention-mq", choices=("default", "all", "no-csa", "off"), default="default", help="A/B")
    ap.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True, help="PDL launches (sm_90+)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="passed to the engine (auto, bf16, fp8)")
    ap.add_argument("--seed", type=int, default=0)  # random weights and cache contents
    ap.add_argument("--time-budget", type=float, default=420.0 if CUDA else 0.0,
                    help="seconds: past 70%% of it only the first point of a kind starts, so transformers and the "
                         "JSON line still fit in a device call (0: no limit)")
    a = ap.parse_args(argv)
    if a.quick:
        a.batches, a.contexts, a.prefills = a.batches[:2], a.contexts[:2], a.prefills[:1]
    return a


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns what the final JSON line holds."""
    threads = torch.get_num_threads()
    if not CUDA:  # the smoke run's ops are tiny: OpenMP threads spinning on a busy 2-core CI box cost 20x
        torch.set_num_threads(1)
    try:
        return run(parse(argv))
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    cfg = model_config(args.layers, args.weights)
    bw, peak = copy_gbps(), matmul_tflops()
    ecfg_kw: dict = {"disable_cuda_graph": not args.cuda_graph, "disable_pdl": not args.pdl}
    pdl.set_enabled(args.pdl)  # also for the kernels timed before the runner exists
    if args.attention_mq != "default":
        attn_mq.ENABLED, attn_mq.MQ_CSA = args.attention_mq != "off", args.attention_mq == "all"
    if args.weights != "bf16":  # the quantized variants run on native FP8/FP4 weights
        ecfg_kw["weight_format"] = "native"
    if args.kv_cache_dtype != "auto":
        ecfg_kw["kv_cache_dtype"] = args.kv_cache_dtype
    if args.profile:
        # decode at HF_BATCHES x PROFILE_CTX, then the largest --prefills length (default PREFILLS' last)
        prefill_prof = max(args.prefills) if args.prefills else None
        args.batches, args.contexts = [x for x in HF_BATCHES], [PROFILE_CTX]
        args.prefills = [prefill_prof] if prefill_prof else []  # sizes the runner; profiled below, not timed
    points, skipped = plan_points(args, cfg, ecfg_kw)
    for s in skipped:
        print(f"# skip {s}", flush=True)
    t0 = time.perf_counter()
    runner = build_runner(cfg, args, points, ecfg_kw)
    randomize(cache_tensors(runner.cache, pools=True))
    cost = Cost(cfg, runner.model, runner.cache)
    card = print_card(cfg, runner, cost, args, bw, peak, graph_note(runner))
    print(f"# built and filled in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.profile:
        profiles = [profile_point(runner, b, c) for b, c in points]
        if prefill_prof:
            profiles.append(profile_prefill(runner, prefill_prof))
        result = dict(card, profiles=profiles)
        print(json.dumps(result))
        return result
    print(" | ".join(COLS), flush=True)
    rows = []

    def out_of_time(what: str) -> bool:
        first = not any(r["kind"] == what.split()[0] for r in rows)  # a cold build must not leave a run empty
        late = args.time_budget > 0 and time.perf_counter() - start > 0.7 * args.time_budget and not first
        if late:
            skipped.append(f"{what}: past 70% of --time-budget {args.time_budget:g} s")
            print(f"# skip {skipped[-1]}", flush=True)
        return late

    for t in args.prefills:
        if out_of_time(f"prefill {t}"):
            continue
        try:
            rows.append(make_row("dsv4", "prefill", 1, t, prefill_point(runner, cost, t, REPS), bw, peak))
        except Exception as e:  # one failed point must not lose the others
            print(f"# prefill {t} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            traceback.print_exc(limit=3)
    for b, c in points:
        if out_of_time(f"decode b={b} ctx={c}"):
            continue
        try:
            rows.append(make_row("dsv4", "decode", b, c, decode_point(runner, cost, b, c), bw, peak))
        except Exception as e:
            print(f"# decode b={b} ctx={c} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            traceback.print_exc(limit=3)
    if CUDA:
        card["peak_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 1)
        print(f"# dsv4 peak GPU memory {card['peak_gib']} GiB", flush=True)
    del runner
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    if args.hf:
        rows += run_hf(cfg, args, cost, rows, bw, peak)
    print("# table")
    print(" | ".join(COLS + ("speedup_vs_hf",)))
    for r in rows:
        print(" | ".join(str(r.get(c)) for c in COLS + ("speedup_vs_hf",)))
    result = dict(card, skipped=skipped, rows=rows)
    print(json.dumps(result))
    return result


def run_hf(cfg: ModelConfig, args: argparse.Namespace, cost: Cost, rows: list[dict], bw: float,
           peak: float) -> list[dict]:
    """transformers on the same config and values; its rows reuse dsv4's floors (same work) and each dsv4
    row with a transformers twin gets ``speedup_vs_hf``."""
    out = []
    plain = cfg.replace(quantization=None, expert_dtype="bf16")
    if CUDA:
        with torch.device("meta"):
            need = sum(nbytes(t) for t in model_tensors(DeepseekV4(plain, torch.bfloat16, ModelOptions(ops="ref"),
                                                                   with_mtp=False)).values())
        free = torch.cuda.mem_get_info()[0]
        if free < need + RESERVE:
            print(f"# skip transformers: its weights need {need / GiB:.1f} GiB + {RESERVE / GiB:.0f} GiB reserve, "
                  f"{free / GiB:.1f} GiB free after dsv4 was freed", flush=True)
            return out
    try:
        t0 = time.perf_counter()
        hf = build_hf(cfg, args.weights, args.seed)
        print(f"# transformers {__import__('transformers').__version__} (attention: {hf.config._attn_implementation}, "
              f"no compile) built and filled in {time.perf_counter() - t0:.1f} s", flush=True)
        mine = {(r["kind"], r["batch"], r["ctx"]): r for r in rows}
        cases = [("decode", b, HF_CTX) for b in HF_BATCHES] + [("prefill", 1, t) for t in args.prefills]
        for kind, b, c in cases:
            ms = hf_decode(hf, cfg.vocab_size, b, c) if kind == "decode" else hf_prefill(hf, cfg.vocab_size, c, REPS)
            twin = mine.get((kind, b, c))
            experts = [round(twin["experts"]) if twin else expected_experts(cfg, b if kind == "decode" else c)
                       ] * cfg.num_layers
            nb, flops = cost.decode(b, c, experts) if kind == "decode" else cost.prefill(c, experts)
            r = dict(nbytes=nb, flops=flops, ms=ms, steps=MAX_STEPS if kind == "decode" else REPS, experts=experts[0])
            out.append(make_row("transformers", kind, b, c, r, bw, peak))
            if twin:
                twin["speedup_vs_hf"] = round(ms / twin["ms"], 1)
                print(f"# {kind} b={b} ctx={c}: dsv4 {twin['ms']:.2f} ms vs transformers {ms:.2f} ms: "
                      f"{twin['speedup_vs_hf']}x", flush=True)
    except Exception as e:
        print(f"# transformers failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        traceback.print_exc(limit=4)
    return out


if __name__ == "__main__":
    # the runner logs its cache sizes and how long CUDA-graph capture took
    logging.basicConfig(level=logging.INFO, format="# %(name)s: %(message)s")
    main()
