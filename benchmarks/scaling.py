"""Multi-GPU checks and the scaling benchmark (issue 8 item 6; used by the multi-GPU runs issue).

    python benchmarks/scaling.py                        # checks, then the benchmark, at every GPU count there is
    python benchmarks/scaling.py --part checks          # only the correctness checks
    python benchmarks/scaling.py --part bench --layout dp --counts 1,2,4,8 --layers 4

Checks (a 2-layer Flash-shaped model, CSA then HCA, random plain bf16 checkpoint, fp32 so that greedy
tokens must agree; 8 experts all routed so no discrete choice can flip): at world size 1 the launched NCCL path
is bit for bit the one-process engine; at every count n > 1 the machine has, TP=n, EP=n and DP-attention=n
(with EP=n) give the one-GPU logits (max row-relative error <= 1e-4) and the same greedy tokens
(tests/gpu/test_distributed_gpu.py's workload: a 700-token prompt in two chunks then decode steps, and three
concurrent requests of 700, 33 and 260 tokens).

Benchmark: the Flash-shaped model of benchmarks/decode.py (V4-Flash widths, ``--layers`` layers, bf16, random
weights drawn on each rank for its own shards: values do not change the work), decode ms/step at batch
1, 16, 64, 256 (context ``--ctx`` tokens in the caches) and one ``--prefill``-token prefill, for 1, 2, 4, 8 GPUs
(as many as exist; the counts left out are named). Step time: median over steps on rank 0 (CUDA events;
CUDA graphs for decode steps, DP attention's too since they replay one bucket on every rank). Communication:
the device time of NCCL kernels on rank 0 in a torch.profiler pass of the same steps, per step (it includes time
a rank waits for a slower peer inside a collective). Card, progress lines, a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "gpu"))

from decode import model_config  # noqa: E402

from dsv4.checkpoint import config_json, write_random_checkpoint  # noqa: E402
from dsv4.config import ModelConfig  # noqa: E402
from dsv4.engine.engine_config import EngineConfig  # noqa: E402
from dsv4.engine.forward_batch import ForwardBatch  # noqa: E402

CUDA = torch.cuda.is_available()
COUNTS = (1, 2, 4, 8)
BATCHES = (1, 16, 64, 256)
WARM, STEPS, PROFILED = 2, 5, 3


def layout_kw(layout: str, n: int) -> dict:
    """EngineConfig fields of ``layout`` at ``n`` ranks (n = 1: the launched world-size-1 path)."""
    if n == 1:
        return {}
    return {"tp": {"tp_size": n}, "ep": {"ep_size": n},
            "dp": {"ep_size": n, "dp_size": n, "enable_dp_attention": True}}[layout]


# ---- checks -----------------------------------------------------------------------------------------------
def run_checks(counts: list[int], tmp: Path) -> list[dict]:
    import test_distributed_gpu as g

    from dsv4.distributed.launch import launch

    cfg = g.CFG.replace(n_routed_experts=8, num_experts_per_tok=8)
    # plain weights: the FP8 activation simulation would turn reduction-order bits into FP8 steps
    ckpt = write_random_checkpoint(cfg, tmp / "ckpt", seed=0, quantize=False)
    results = []

    def one(name: str, kw: dict, launched: bool) -> dict:
        out = tmp / f"{name}.pt"
        config = dataclasses.replace(g.engine_config(ckpt, "float32"), **kw)
        t0 = time.monotonic()
        code = launch(g.logits_and_tokens, (str(out),), config, grace_s=30) if launched else \
            g.logits_and_tokens((str(out),), config)
        assert code == 0, f"{name}: exit status {code}"
        got = torch.load(out)
        got["s"] = time.monotonic() - t0
        return got

    want = one("single", {}, launched=False)
    for n in counts:
        for layout in ("tp", "ep", "dp") if n > 1 else ("nccl1",):
            name = f"{layout}{n}"
            try:
                got = one(name, layout_kw(layout, n), launched=True)
                rows = (got["logits"] - want["logits"]).abs().amax(-1) / want["logits"].abs().amax(-1)
                err = float(rows.max())
                same = got["tokens"] == want["tokens"]
                exact = bool(torch.equal(got["logits"], want["logits"]))
                ok = not torch.isnan(got["logits"]).any() and same and (exact if n == 1 else err <= 1e-4)
                r = dict(check=name, gpus=n, ok=bool(ok), max_rel_err=float(f"{err:.3e}"), tokens_equal=same,
                         bit_exact=exact, s=round(got["s"], 1))
            except Exception as e:  # one failing layout must not hide the others
                traceback.print_exc()
                r = dict(check=name, gpus=n, ok=False, error=f"{type(e).__name__}: {e}"[:300])
            print(f"# check {name}: {r}", flush=True)
            results.append(r)
    return results


# ---- benchmark ranks ---------------------------------------------------------------------------------------
@torch.no_grad()
def random_shards(model: torch.nn.Module, cfg: ModelConfig, model_dir: object, **_: object) -> None:
    """A stand-in for ``load_weights``: this rank's shards, random with the checkpoint's scales (bf16 weights)."""
    dev = next(model.parameters()).device
    for name, t in model.named_buffers():
        if name.endswith("tid2eid"):
            t.copy_(torch.rand(t.shape[0], cfg.n_routed_experts, device=dev).argsort(-1)[:, : t.shape[1]])
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if not p.is_floating_point():
            continue
        if "norm" in name:
            v = 1 + 0.05 * torch.randn(p.shape, device=dev)
        elif leaf.startswith("hc_") and leaf.endswith("_scale"):
            v = 0.5 + torch.rand(p.shape, device=dev)
        elif leaf.startswith("hc_") and leaf.endswith("_base") or leaf == "ape":
            v = 0.5 * torch.randn(p.shape, device=dev)
        elif leaf.startswith("hc_") and leaf.endswith("_fn"):
            v = 0.5 * torch.randn(p.shape, device=dev) * p.shape[-1] ** -0.5
        elif leaf == "bias":
            v = 0.05 * torch.randn(p.shape, device=dev)
        elif leaf == "attn_sink" or name.startswith("embed"):
            v = torch.randn(p.shape, device=dev)
        else:
            v = torch.randn(p.shape, device=dev) * p.shape[-1] ** -0.5
        p.copy_(v)
        del v


def bench_config(model_dir: Path, args: argparse.Namespace, kw: dict) -> EngineConfig:
    head = WARM + STEPS + PROFILED + 2
    return EngineConfig(model=str(model_dir), device="cuda" if CUDA else "cpu", dtype="bfloat16" if CUDA else "float32",
                        max_running_requests=max(BATCHES), max_model_len=max(args.ctx + head, args.prefill + 1),
                        max_total_tokens=max(BATCHES) * (args.ctx + head) + args.prefill, ops="auto", **kw)


def _rank(local: int, n: int, port: int, model_dir: str, args: argparse.Namespace, kw: dict, out: str) -> None:
    import torch.distributed as dist

    from dsv4.distributed.batch_sync import send_stop
    from dsv4.distributed.follower import follow
    from dsv4.distributed.parallel import from_world
    from dsv4.engine import model_runner as runner_mod

    try:
        if CUDA:
            torch.cuda.set_device(local)
        config = bench_config(Path(model_dir), args, kw)
        if CUDA:
            config = dataclasses.replace(config, device=f"cuda:{local}")
        dist.init_process_group("nccl" if CUDA else "gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=n,
                                rank=local)
        with mock.patch.object(runner_mod, "load_weights", random_shards):
            if local:
                follow(config)
            else:
                cfg = ModelConfig.from_json(Path(model_dir))
                runner = runner_mod.ModelRunner(cfg, config, Path(model_dir), progress=False)
                rows = bench_points(runner, args)
                send_stop(from_world(config.tp_size, config.ep_size, config.attn_dp_size))
                Path(out).write_text(json.dumps(rows))
    except BaseException:
        print(f"rank {local} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def _events(runner, batches: list[ForwardBatch]) -> list[float]:
    marks = []
    for fb in batches:
        ev = torch.cuda.Event(enable_timing=True) if CUDA else None
        if ev is not None:
            ev.record()
            marks.append(ev)
        else:
            marks.append(time.perf_counter())
        runner.forward(fb)
    if CUDA:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        torch.cuda.synchronize()
        marks.append(end)
        return [a.elapsed_time(b) for a, b in zip(marks, marks[1:], strict=False)]
    marks.append(time.perf_counter())
    return [(b - a) * 1e3 for a, b in zip(marks, marks[1:], strict=False)]


def _comm_ms(runner, batches: list[ForwardBatch]) -> float | None:
    """NCCL kernels' device time per step on rank 0 (torch.profiler)."""
    if not CUDA:
        return None  # gloo runs on the host: no device time to split out
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for fb in batches:
            runner.forward(fb)
        torch.cuda.synchronize()
    us = sum(e.device_time_total for e in prof.key_averages() if "nccl" in e.key.lower())
    return us / 1e3 / len(batches)


def bench_points(runner, args: argparse.Namespace) -> list[dict]:
    mgr, dev, vocab = runner.cache_manager, runner.device, runner.model_cfg.vocab_size
    rows = []
    for b in BATCHES:
        slots = [mgr.alloc(args.ctx) for _ in range(b)]
        n = WARM + STEPS + PROFILED
        for s in slots:
            mgr.reserve(s, args.ctx + n + 1)
        ids = torch.randint(vocab, (n, b)).tolist()
        batches = [ForwardBatch.build(slots, [args.ctx + i] * b, [[t] for t in ids[i]], device=dev) for i in range(n)]
        _events(runner, batches[:WARM])
        ms = statistics.median(_events(runner, batches[WARM : WARM + STEPS]))
        comm = _comm_ms(runner, batches[WARM + STEPS :])
        for s in slots:
            mgr.free(s)
        rows.append(dict(kind="decode", batch=b, ctx=args.ctx, ms=round(ms, 3), comm_ms=None if comm is None else round(comm, 3),
                         tok_s=round(b / ms * 1e3, 1)))
        print(f"#   decode b={b}: {ms:.2f} ms/step, comm {comm} ms", flush=True)
    ids = torch.randint(vocab, (args.prefill,)).tolist()
    times, comm = [], None
    for r in range(3):
        slot = mgr.alloc(args.prefill)
        mgr.reserve(slot, args.prefill)
        fb = ForwardBatch.build([slot], [0], [ids], device=dev)
        if r < 2:
            times += _events(runner, [fb])
        else:
            comm = _comm_ms(runner, [fb])
        mgr.free(slot)
    ms = times[-1]
    rows.append(dict(kind="prefill", batch=1, ctx=args.prefill, ms=round(ms, 3),
                     comm_ms=None if comm is None else round(comm, 3), tok_s=round(args.prefill / ms * 1e3, 1)))
    print(f"#   prefill {args.prefill}: {ms:.2f} ms, comm {comm} ms", flush=True)
    return rows


def run_bench(counts: list[int], args: argparse.Namespace, tmp: Path) -> list[dict]:
    import torch.multiprocessing as mp

    from dsv4.distributed.launch import free_port

    cfg = model_config(args.layers, "bf16")
    model_dir = tmp / "bench_model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config_json(cfg)))
    rows = []
    for n in counts:
        kw = layout_kw(args.layout, n)
        out = tmp / f"bench{n}.json"
        print(f"# bench {args.layout} x{n} ...", flush=True)
        t0 = time.monotonic()
        ctx = mp.start_processes(_rank, args=(n, free_port(), str(model_dir), args, kw, str(out)), nprocs=n,
                                 join=False, start_method="spawn")
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() - t0 > args.point_timeout:
                    raise TimeoutError(f"{n} GPUs: over {args.point_timeout} s")
            got = json.loads(out.read_text())
        except Exception as e:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            print(f"# bench x{n} failed: {type(e).__name__}: {e}", flush=True)
            rows.append(dict(gpus=n, layout=args.layout, error=f"{type(e).__name__}: {e}"[:300]))
            continue
        for r in got:
            rows.append(dict(gpus=n, layout=args.layout if n > 1 else "nccl1", **r))
        print(f"# bench x{n}: {time.monotonic() - t0:.0f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("all", "checks", "bench"), default="all")
    ap.add_argument("--layout", choices=("tp", "ep", "dp"), default="dp", help="the benchmark's layout at n > 1")
    ap.add_argument("--counts", default=",".join(map(str, COUNTS)), help="GPU counts to try")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=4096, help="decode context tokens")
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--point-timeout", type=float, default=300.0, help="seconds one GPU count may take")
    args = ap.parse_args(argv)
    have = torch.cuda.device_count() if CUDA else 2
    want = [int(c) for c in args.counts.split(",")]
    counts = [c for c in want if c <= have]
    skipped = [c for c in want if c > have]
    dev = torch.cuda.get_device_name(0) if CUDA else "CPU (gloo; no CUDA: a smoke run of tiny widths)"
    if not CUDA:
        args.ctx, args.prefill, args.layers = min(args.ctx, 64), min(args.prefill, 64), min(args.layers, 2)
    print(f"# scaling: {dev} x{have}; counts {counts} (skipped, more than the machine has: {skipped or 'none'}); "
          f"torch {torch.__version__}; part {args.part}, bench layout {args.layout}, {args.layers} layers, "
          f"decode ctx {args.ctx}, prefill {args.prefill}", flush=True)
    checks, bench = [], []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.part in ("all", "checks") and CUDA:
            checks = run_checks(counts, tmp)
        if args.part in ("all", "bench"):
            bench = run_bench(counts, args, tmp)
    if checks:
        print("\n| check | GPUs | ok | max rel err | tokens equal | bit exact | s |\n|---|---|---|---|---|---|---|")
        for r in checks:
            print(f"| {r['check']} | {r['gpus']} | {r['ok']} | {r.get('max_rel_err', '-')} | "
                  f"{r.get('tokens_equal', '-')} | {r.get('bit_exact', '-')} | {r.get('s', r.get('error', ''))} |")
    if bench:
        base = {(r.get("kind"), r.get("batch")): r["ms"] for r in bench if r["gpus"] == 1 and "ms" in r}
        print("\n| GPUs | layout | point | ms | comm ms | comm % | tok/s | speedup vs 1 |\n|---|---|---|---|---|---|---|---|")
        for r in bench:
            if "error" in r:
                print(f"| {r['gpus']} | {r['layout']} | - | failed: {r['error']} | | | | |")
                continue
            point = f"decode b={r['batch']}" if r["kind"] == "decode" else f"prefill {r['ctx']}"
            b0 = base.get((r["kind"], r["batch"]))
            pct = 100 * r["comm_ms"] / r["ms"] if r["ms"] and r["comm_ms"] is not None else float("nan")
            print(f"| {r['gpus']} | {r['layout']} | {point} | {r['ms']} | {r['comm_ms']} | {pct:.0f} | {r['tok_s']} | "
                  f"{b0 / r['ms']:.2f} |" if b0 else f"| {r['gpus']} | {r['layout']} | {point} | {r['ms']} | "
                  f"{r['comm_ms']} | {pct:.0f} | {r['tok_s']} | - |")
    result = dict(bench="scaling", device=dev, gpus=have, counts=counts, skipped=skipped,
                  checks_ok=all(r["ok"] for r in checks) if checks else None, checks=checks, rows=bench)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
