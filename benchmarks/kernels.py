"""Kernel benchmarks at V4-Flash shapes: time, bytes, achieved GB/s, the floor and the reference's time.

    python benchmarks/kernels.py [--quick] [--only attention,indexer,...]
    TRITON_INTERPRET=1 python benchmarks/kernels.py --quick   # CPU smoke run of this script, tiny shapes

Card first (GPU, shapes, measured HBM copy bandwidth), then one table, then one JSON line (with every sweep
point). Kernels are timed as CUDA-graph replays (``do_bench_cudagraph``, median), so host launch overhead is
out of the numbers, over enough independent input copies per replay that the working set is far larger than
L2 (a decode step's KV is not L2-resident in a real model). ``bytes`` is the fewest bytes the op must move
(each input read once, each output written once; for attention every query row's own keys and q/out, so
extend rows that share keys can beat it through L2); ``floor = bytes / measured copy bandwidth``;
``ratio = time / floor``. The reference is timed without graphs (it syncs the host), on one copy.

Attention is swept over ``attention_triton.CANDIDATES`` x {split, no-split} at every shape (with FP8 KV over the
candidates in the default's split form); the table shows the best point and the current default per shape; the
best points decide ``default_config`` (``DEFAULT``, ``DEFAULT_FP8``, ``SPLIT_MAX_ROWS``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4.ops import attention as attn_ref  # noqa: E402
from dsv4.ops import attention_mq_triton as attn_mq  # noqa: E402
from dsv4.ops import attention_triton as attn_tri  # noqa: E402
from dsv4.ops import qkv as qkv_ref  # noqa: E402
from dsv4.ops import qkv_triton as qkv_tri  # noqa: E402
from dsv4.ops import quant as quant_ref  # noqa: E402
from dsv4.ops import quant_triton as quant_tri  # noqa: E402
from dsv4.ops.kv_fp8 import alloc_fp8_kv, fp8_kv_bytes_per_row, scatter_rows  # noqa: E402
from dsv4.ops.rope import rope_cos_sin, rope_inv_freq  # noqa: E402

D, H, HD, RD, WINDOW, TOPK, PAGE = 4096, 64, 512, 64, 128, 512, 64
BATCHES, CONTEXTS, EXTEND = (1, 8, 64, 256), (4096, 65536), 1024
WORKING_SET = 256 << 20  # bytes of distinct inputs per timed replay
ROWS: list[dict] = []
SWEEP: list[dict] = []
SMOKE = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if SMOKE else "cuda"
if SMOKE:
    D, H, HD, RD, WINDOW, TOPK, PAGE = 256, 4, 64, 16, 8, 6, 4
    BATCHES, CONTEXTS, EXTEND, WORKING_SET = (1, 2), (64,), 16, 1 << 16
CANDS = attn_tri.CANDIDATES[:1] if SMOKE else attn_tri.CANDIDATES
MQ_CANDS = attn_mq.CANDIDATES[:1] if SMOKE else attn_mq.CANDIDATES
VERIFY_BATCHES, VERIFY_ROWS = ((2,) if SMOKE else (1, 8, 64)), 4


def timed(fn, copies: list) -> float:
    """Median ms per call of ``fn(copy)`` over the copies, replayed as one CUDA graph."""
    def run() -> None:
        for c in copies:
            fn(c)
    if SMOKE:
        run()
        t0 = time.perf_counter()
        run()
        return (time.perf_counter() - t0) * 1e3 / len(copies)
    # do_bench_cudagraph runs fn on a side stream that does not wait for the default stream: without this sync
    # the first call can read inputs still being written there (the CSA batch-64 "illegal memory access": page
    # ids read from a page table not yet filled)
    torch.cuda.synchronize()
    try:
        return do_bench_cudagraph(run, rep=30, return_mode="median") / len(copies)
    except Exception as e:  # not capturable: plain events (host overhead included), said so
        print(f"# graph capture failed ({type(e).__name__}: {str(e)[:80]}); timing without graphs")
        return do_bench(run, warmup=10, rep=40, return_mode="median") / len(copies)


def timed_ref(fn) -> float:
    if SMOKE:
        return timed(lambda _: fn(), [None])
    return do_bench(fn, warmup=5, rep=30, return_mode="median")


def n_copies(bytes_each: int) -> int:
    return max(1, min(32, WORKING_SET // max(1, bytes_each)))


def hbm_gbps() -> float:
    """Device-to-device copy of 2 GiB: (read + write bytes) / time."""
    x = torch.empty(1 << 20 if SMOKE else 1 << 30, dtype=torch.int16, device=DEV).random_()
    y = torch.empty_like(x)
    t = timed_ref(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / t / 1e6


COLS = ("kernel", "variant", "batch", "ctx", "us", "bytes", "gbps", "floor_us", "ratio", "ref_us")


def row(kernel: str, variant: str, batch: int, ctx: int | None, t_ms: float, nbytes: float, bw: float,
        ref_ms: float | None = None, sweep: bool = False) -> dict:
    """Build a result row and print it at once (a run cut short keeps what it measured)."""
    floor = nbytes / bw / 1e6
    r = dict(kernel=kernel, variant=variant, batch=batch, ctx=ctx, us=round(t_ms * 1e3, 2), bytes=int(nbytes),
                gbps=round(nbytes / t_ms / 1e6, 1), floor_us=round(floor * 1e3, 2), ratio=round(t_ms / floor, 2),
                ref_us=None if ref_ms is None else round(ref_ms * 1e3, 1))
    print(("sweep | " if sweep else "") + " | ".join(str(r[c]) for c in COLS), flush=True)
    return r


def cos_sin(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_cos_sin(pos, rope_inv_freq(RD, 160000.0, None).to(DEV))


def bench_elementwise(bw: float) -> None:
    w = torch.ones(HD, device=DEV)
    for b in BATCHES:
        nb = b * D * 3 + b * D // 128
        xs = [torch.randn(b, D, device=DEV).bfloat16() for _ in range(n_copies(nb))]
        ROWS.append(row("act_quant", "ue8m0 block 128", b, None, timed(lambda x: quant_tri.act_quant(x, 128), xs),
                        nb, bw, timed_ref(partial(quant_ref.act_quant, xs[0], 128))))
        nb = 2 * b * H * HD * 2 + b * RD * 4
        qs = [(torch.randn(b, H, HD, device=DEV).bfloat16(), *cos_sin(torch.randint(0, 65536, (b,), device=DEV)))
              for _ in range(n_copies(nb))]
        ROWS.append(row("q_norm_rope", "", b, None, timed(lambda a: qkv_tri.q_norm_rope(a[0], 1e-6, a[1], a[2]), qs),
                        nb, bw, timed_ref(partial(qkv_ref.q_norm_rope, qs[0][0], 1e-6, *qs[0][1:]))))
        nb = 3 * b * HD * 2 + b * RD * 4
        ks = [(torch.randn(b, HD, device=DEV).bfloat16(), *cos_sin(torch.randint(0, 65536, (b,), device=DEV)),
               torch.zeros(b, WINDOW, HD, device=DEV).bfloat16(), torch.arange(b, device=DEV) * WINDOW + 5)
              for _ in range(n_copies(nb))]
        k0 = ks[0]
        ROWS.append(row("kv_norm_rope_store", "fp8 nope", b, None,
                        timed(lambda a: qkv_tri.kv_norm_rope_store(a[0], w, 1e-6, a[1], a[2], True, a[3], a[4]), ks),
                        nb, bw, timed_ref(partial(qkv_ref.kv_norm_rope_store, k0[0], w, 1e-6, k0[1], k0[2], True,
                                                                 k0[3], k0[4]))))


def attention_case(kind: str, b: int, ctx: int, extend: int = 1, fp8: bool = False) -> tuple[dict, int]:
    """b requests at context ctx (the last ``extend`` tokens new); returns kernel args and the floor bytes.
    ``fp8``: the ring and the pool as FP8 stores (--kv-cache-dtype fp8)."""
    ratio = 4 if kind == "csa" else 128
    t = b * extend
    p0 = ctx - extend
    pos = (p0 + torch.arange(extend, device=DEV)).repeat(b)
    args = dict(q=torch.randn(t, H, HD, device=DEV).bfloat16(), kv=torch.randn(t, HD, device=DEV).bfloat16(),
                ring=torch.randn(b, WINDOW, HD, device=DEV).bfloat16(), comp=None, page_table=None, picks=None,
                slot=torch.arange(b, device=DEV).repeat_interleave(extend), p0=torch.full_like(pos, p0), pos=pos,
                sink=torch.randn(H, device=DEV), scale=HD**-0.5, window=WINDOW, ratio=ratio)
    args["cos"], args["sin"] = cos_sin(pos)
    n_comp = 0
    if kind != "sliding":
        entries = ctx // ratio
        per_slot = -(-entries // PAGE)
        args["comp"] = torch.randn(b * per_slot + 1, PAGE, HD, device=DEV).bfloat16()
        args["page_table"] = (torch.randperm(b * per_slot, device=DEV) + 1).view(b, per_slot)
        n_comp = entries
        if kind == "csa":
            n_comp = min(TOPK, entries)
            args["picks"] = torch.rand(t, entries, device=DEV).argsort(dim=1)[:, :n_comp].contiguous()
    key_bytes = HD * 2
    if fp8:
        for name in ("ring", "comp"):
            x = args[name]
            if x is not None:
                st = alloc_fp8_kv(tuple(x.shape[:-1]), HD, RD, x.dtype, DEV)
                scatter_rows(st, torch.arange(x[..., 0].numel(), device=DEV), x.view(-1, HD))
                args[name] = st
        key_bytes = fp8_kv_bytes_per_row(HD, RD, torch.bfloat16)
    keys = min(WINDOW, ctx) + n_comp
    return args, t * (2 * H * HD * 2 + keys * key_bytes + n_comp * 8 + 2 * RD * 2)


def footprint(args: dict) -> int:
    return sum(v.numel() * v.element_size() for v in args.values() for v in (v if isinstance(v, tuple) else (v,))
               if isinstance(v, torch.Tensor))


def bench_attention(bw: float, quick: bool) -> dict:
    """Sweep every shape; returns {shape: best config name} for the summary. FP8 stores are swept too (every
    candidate in the default's split form; ``attn_decode_*`` rows ``best fp8kv`` and ``default fp8kv``).
    ``quick``: CSA and HCA at the longest context only (every batch, every candidate; FP8 swept for CSA only),
    to bound one GPU run."""
    best_by_shape = {}
    shapes = [("csa", c) for c in CONTEXTS] + [("hca", c) for c in CONTEXTS] + [("sliding", CONTEXTS[0])]
    if quick:  # one GPU run of every family within ~5 minutes: the longest context only, no sliding-only layer
        shapes = [("csa", CONTEXTS[-1]), ("hca", CONTEXTS[-1])]
    for kind, ctx in shapes:
        for b in BATCHES:
            args, nbytes = attention_case(kind, b, ctx)
            copies = [args] + [attention_case(kind, b, ctx)[0] for _ in range(n_copies(footprint(args)) - 1)]
            points = {}
            for cfg in CANDS:
                for split in (False, True):
                    name = attn_tri.config_name(cfg) + ("+split" if split else "")
                    t_ms = timed(lambda a, c=dict(cfg, split=split): attn_tri.paged_sparse_attention(**a, config=c),
                                 copies)
                    points[name] = t_ms
                    SWEEP.append(row(f"attn_{kind}", name, b, ctx, t_ms, nbytes, bw, sweep=True))
            t_def = timed(lambda a: attn_tri.paged_sparse_attention(**a), copies)
            ref = None if quick else timed_ref(partial(attn_ref.paged_sparse_attention, **args))
            best = min(points, key=points.get)
            best_by_shape[f"{kind} {ctx} b{b}"] = best
            ROWS.append(row(f"attn_decode_{kind}", "best: " + best, b, ctx, points[best], nbytes, bw, ref))
            ROWS.append(row(f"attn_decode_{kind}", "default", b, ctx, t_def, nbytes, bw, ref))
            del copies
            if kind != "sliding" or b == BATCHES[0]:
                args8, nbytes8 = attention_case(kind, b, ctx, fp8=True)
                copies8 = [args8] + [attention_case(kind, b, ctx, fp8=True)[0]
                                     for _ in range(n_copies(footprint(args8)) - 1)]
                # FP8 KV: every candidate in the default's split form (the split switch is the same question as
                # with bf16 KV), to choose attention_triton.DEFAULT_FP8
                split = b <= attn_tri.SPLIT_MAX_ROWS
                points8 = {}
                for cfg in CANDS if kind == "csa" or not quick else ():  # quick: CSA only, to bound the run
                    name = attn_tri.config_name(cfg) + ("+split" if split else "")
                    points8[name] = timed(lambda a, c=dict(cfg, split=split): attn_tri.paged_sparse_attention(
                        **a, config=c), copies8)
                    SWEEP.append(row(f"attn_{kind}_fp8kv", name, b, ctx, points8[name], nbytes8, bw, sweep=True))
                if points8:
                    best8 = min(points8, key=points8.get)
                    best_by_shape[f"{kind} {ctx} b{b} fp8kv"] = best8
                    ROWS.append(row(f"attn_decode_{kind}", "best fp8kv: " + best8, b, ctx, points8[best8], nbytes8,
                                    bw))
                ROWS.append(row(f"attn_decode_{kind}", "default fp8kv", b, ctx, timed(
                    lambda a: attn_tri.paged_sparse_attention(**a), copies8), nbytes8, bw))
                del copies8
    for ctx in CONTEXTS[-1:] if quick else CONTEXTS:
        args, nbytes = attention_case("csa", 1, ctx, extend=EXTEND)
        points = {attn_tri.config_name(c): timed(lambda a, c=c: attn_tri.paged_sparse_attention(
            **a, config=dict(c, split=False)), [args]) for c in CANDS}
        best = min(points, key=points.get)
        ref = None if quick else timed_ref(partial(attn_ref.paged_sparse_attention, **args))
        ROWS.append(row("attn_extend_csa", "best: " + best, EXTEND, ctx, points[best], nbytes, bw, ref))
        ROWS.append(row("attn_extend_csa", "default", EXTEND, ctx, timed(
            lambda a: attn_tri.paged_sparse_attention(**a), [args]), nbytes, bw, ref))
    return best_by_shape


def bench_attention_mq(bw: float) -> None:
    """The multi-query form against the single-row kernel on extend and verify rows, longest context: extend
    EXTEND rows of one request and verify b requests x VERIFY_ROWS rows (b in VERIFY_BATCHES; CSA at every b,
    HCA and FP8 KV at the largest), bf16 KV. Rows ``single`` (the single-row kernel's default, every row alone), ``mq <config>`` (each
    multi-query candidate), ``mq default`` (the OpSet entry as the model calls it). The floor counts every
    row's own keys, so a form that shares them across rows can go below ratio 1."""
    ctx = CONTEXTS[-1]
    vb = VERIFY_BATCHES[-1]
    shapes = [("csa", 1, EXTEND, False), ("hca", 1, EXTEND, False)]
    shapes += [("csa", b, VERIFY_ROWS, False) for b in VERIFY_BATCHES]
    shapes += [("hca", vb, VERIFY_ROWS, False), ("csa", vb, VERIFY_ROWS, True)]
    for kind, b, extend, fp8 in shapes:
        args, nbytes = attention_case(kind, b, ctx, extend=extend, fp8=fp8)
        copies = [args] + [attention_case(kind, b, ctx, extend=extend, fp8=fp8)[0]
                           for _ in range(n_copies(footprint(args)) - 1)]
        name = f"attn_{'extend' if extend == EXTEND else 'verify'}_{kind}" + ("_fp8kv" if fp8 else "")
        rows = (extend, extend)
        ROWS.append(row(name, "single", b * extend, ctx, timed(lambda a: attn_tri.paged_sparse_attention(**a), copies),
                        nbytes, bw))
        for cfg in MQ_CANDS:
            t_ms = timed(lambda a, c=cfg: attn_mq.multi_query_attention(**a, config=c), copies)
            ROWS.append(row(name, "mq " + attn_mq.config_name(cfg), b * extend, ctx, t_ms, nbytes, bw))
        ROWS.append(row(name, "mq default", b * extend, ctx, timed(
            lambda a, r=rows: attn_mq.paged_sparse_attention(**a, rows_per_request=r), copies), nbytes, bw))
        del copies


def extra_benches() -> list:
    """The other kernel families' benchmarks: every ``benchmarks/bench_*.py`` exposing ``run(bw, quick)`` ->
    rows built with :func:`row` (they import this module for the shared timing helpers and shapes)."""
    import importlib

    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    return [importlib.import_module(p.stem) for p in sorted(here.glob("bench_*.py"))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the reference timings")
    ap.add_argument("--only", default="", help="comma-separated families to run: elementwise, attention, "
                    "attention_mq and the bench_*.py names without the prefix (e.g. 'indexer,moe'); default all")
    a = ap.parse_args()
    torch.manual_seed(0)
    name = "cpu (interpreter smoke run)" if SMOKE else torch.cuda.get_device_properties(0).name
    bw = hbm_gbps()
    print(f"# {name}, torch {torch.__version__}")
    print(f"# V4-Flash attention shapes: {H} heads x {HD} (rope {RD}), window {WINDOW}, CSA top-{TOPK} (ratio 4), "
          f"HCA ratio 128, bf16 KV, page {PAGE}; decode = one new token per request")
    print(f"# measured HBM copy bandwidth: {bw:.0f} GB/s (2 GiB device-to-device copy, read + write)")
    print(" | ".join(COLS), flush=True)
    only = set(filter(None, a.only.split(",")))
    if not only or "elementwise" in only:
        bench_elementwise(bw)
    best = bench_attention(bw, a.quick) if not only or "attention" in only else {}
    if not only or "attention_mq" in only:
        bench_attention_mq(bw)
    for mod in extra_benches():
        if only and mod.__name__.removeprefix("bench_") not in only:
            continue
        try:  # one family's failure must not cost the others' numbers
            ROWS.extend(mod.run(bw, a.quick))
        except Exception as e:  # noqa: BLE001
            print(f"# {mod.__name__} failed: {type(e).__name__}: {e}", flush=True)
    print("# table")
    print(" | ".join(COLS))
    for r in ROWS:
        print(" | ".join(str(r[c]) for c in COLS))
    print(json.dumps(dict(device=name, hbm_gbps=round(bw, 1), best=best, rows=ROWS, sweep=SWEEP)))


if __name__ == "__main__":
    main()
