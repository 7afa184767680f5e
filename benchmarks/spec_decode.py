"""MTP speculative decoding speed: tokens/s and time per output token with and without MTP, and speedup
against acceptance with a test-only draft that is right with probability p.

The model is the V4-Flash-shaped slice of benchmarks/decode.py (random weights drawn on the device, ``--layers``
layers, plus one MTP block; tiny widths without CUDA, a smoke run in seconds). Everything runs through the
engine (scheduler, sampling, verify, MTP catch-up and drafts, CUDA graphs unless --no-cuda-graph), once per k:
"plain" is the same engine with its drafter detached (no drafts: decode graphs); "mtp" the random MTP head
(it accepts almost nothing); "p=..." keeps the MTP block's work but replaces its proposals with the plain
greedy continuation, each draft right with probability p (``acc`` is the acceptance measured; ``same`` whether
the output equals plain greedy output: bf16 near-ties of random logits can flip, after which acceptance falls).
Decode time = time of an N-token generate minus a 1-token one (prefill and the prompt's catch-up). Every
drafter runs one untimed generate on the batch first, so no Triton compile of a new eager shape is timed.
``--breakdown`` runs one more generate per row with synchronised timers around the phases of each engine step
and prints, per verify step, the median ms of the target forward, the MTP draft, sampling with acceptance (its
one host read included), the test-only oracle substitution and the host rest (``breakdown`` in the rows of
the JSON line), and the eager target forwards of the whole run (prefill, or a verify the graphs do not take).
``--weights fp8-fp4 --native`` holds the weights as V4-Flash does (more layers fit: a deeper model is where
the drafts' share of a step is closer to the real model's).
Card first, then the table, then one JSON line. ``--count`` instead counts, on the CPU, the launches and host
syncs of one verify step outside the CUDA graphs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import model_config as decode_model_config  # noqa: E402
from decode_weights import DEV, random_loader  # noqa: E402

from dsv4.checkpoint import config_json  # noqa: E402
from dsv4.config import ModelConfig  # noqa: E402
from dsv4.engine import engine_core as core_mod  # noqa: E402
from dsv4.engine import model_runner as runner_mod  # noqa: E402
from dsv4.engine.engine_config import EngineConfig  # noqa: E402
from dsv4.engine.llm import LLM  # noqa: E402
from dsv4.engine.sampler import to_device  # noqa: E402
from dsv4.engine.sampling_params import SamplingParams  # noqa: E402
from dsv4.engine.spec_decode import MTPDrafter, SpecStats  # noqa: E402

CUDA = DEV.type == "cuda"
COLS = ("k", "batch", "draft", "acc", "tok_s", "tpot_ms", "speedup", "same")


def model_config(layers: int, weights: str = "bf16") -> ModelConfig:
    """benchmarks/decode.py's model (Flash widths; tiny ones without CUDA) with one MTP block."""
    return dataclasses.replace(decode_model_config(layers, weights), num_mtp_layers=1)


class PDrafter(MTPDrafter):
    """Test-only: runs the MTP block as usual, then proposes the known greedy continuation, each draft right
    with probability ``p`` (else the next token id). ``truth`` maps request id -> the plain greedy output."""

    def __init__(self, base: MTPDrafter, llm: LLM, p: float, seed: int) -> None:
        super().__init__(base.model, base.cache, base.k, base.device, graphs=base.graphs)
        self.llm, self.p, self.rng, self.truth = llm, p, random.Random(seed), {}

    def draft(self, streams, items):
        real = super().draft(streams, items)
        by_slot = {r.slot: r for r in self.llm.core.scheduler.running}
        vocab = self.llm.model_config.vocab_size
        out = []
        for it in items:
            req = by_slot[it.slot]
            at = it.start + len(it.rows) + 1 - len(req.prompt_ids)  # output index of the first draft
            want = self.truth[req.request_id][at:][: it.num_drafts]
            want = [t if self.rng.random() < self.p else (t + 1) % vocab for t in want]
            out.append(want + [0] * (self.k - len(want)))
        return to_device(out, real.device)


def timed(llm: LLM, prompts: list[list[int]], n: int, truth: list[list[int]] | None = None) -> tuple[float, list]:
    """Seconds of one generate of ``n`` tokens per prompt (greedy), and the outputs."""
    drafter = llm.core.drafter
    if isinstance(drafter, PDrafter):
        first = llm._next_id
        drafter.truth = {str(first + i): t for i, t in enumerate(truth)}
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    if CUDA:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = [o.token_ids for o in llm.generate(prompts, params)]
    return time.perf_counter() - t0, out


def point(llm: LLM, prompts, n: int, truth=None) -> tuple[float, list, SpecStats]:
    """Decode seconds (n-token generate minus 1-token generate), outputs, acceptance counters of the n run."""
    t1, _ = timed(llm, prompts, 1, truth)
    llm.core.spec_stats = SpecStats()
    tn, out = timed(llm, prompts, n, truth)
    return max(tn - t1, 1e-9), out, llm.core.spec_stats


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class Phases:
    """Synchronised timers around the phases of each engine step of ``llm`` while active (patched instance
    attributes, restored on exit; the CUDA graphs keep the runner's original ``_forward_eager``, so only the
    runner's own eager forwards reach the patched one). ``steps``: one dict of seconds per engine step."""

    PHASES = ("forward", "draft", "sample", "oracle")

    def __init__(self, llm: LLM) -> None:
        self.llm, self.steps, self.now = llm, [], None

    def _timed(self, fn, key: str):
        def inner(*a, **kw):
            _sync()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            _sync()
            if self.now is not None:
                self.now[key] = self.now.get(key, 0.0) + time.perf_counter() - t0
            return out
        return inner

    def __enter__(self) -> Phases:
        core = self.llm.core
        runner, drafter, sched = core.runner, core.drafter, core.scheduler
        self._undo = [(core, "step"), (runner, "forward"), (runner, "_forward_eager"), (sched, "schedule")]
        step, schedule, eager = core.step, sched.schedule, runner._forward_eager

        def on_step():
            self.now = {}
            t0 = time.perf_counter()
            out = step()
            _sync()
            self.now["step"] = time.perf_counter() - t0
            self.steps.append(self.now)
            self.now = None
            return out

        def on_schedule():
            b = schedule()
            if self.now is not None:
                decoding = all(len(c) == 1 + len(d) for c, d in zip(b.chunks, b.drafts, strict=True))
                self.now["kind"] = "prefill" if not decoding else "verify" if any(b.drafts) else "decode"
            return b

        def on_eager(batch):
            if self.now is not None:
                self.now["eager"] = True
            return eager(batch)

        core.step, sched.schedule, runner._forward_eager = on_step, on_schedule, on_eager
        runner.forward = self._timed(runner.forward, "forward")
        self._sample = core_mod.sample_isolated  # plain steps; a step with a drafter samples and accepts in _verify
        core_mod.sample_isolated = self._timed(self._sample, "sample")
        self._undo.append((core, "_verify"))
        core._verify = self._timed(core._verify, "sample")
        if drafter is not None:
            # the MTP block's own work (graph replay or eager); a test-only drafter's substitution is the rest
            self._undo.append((drafter, "draft"))
            inner = [(drafter, "_draft_eager")] + ([(drafter.graphs, "run")] if drafter.graphs is not None else [])
            self._undo += inner
            for obj, name in inner:
                setattr(obj, name, self._timed(getattr(obj, name), "draft"))
            drafter.draft = self._timed(drafter.draft, "oracle")
        return self

    def __exit__(self, *exc) -> None:
        core_mod.sample_isolated = self._sample
        for obj, name in self._undo:
            obj.__dict__.pop(name, None)

    def summary(self) -> dict:
        """Median ms per verify step by phase (``oracle``: the drafter's time outside the MTP block; ``host``:
        the step's rest), how many verify steps ran a graph, the median ms of a plain decode step (no request
        with drafts), and the eager target forwards of the run."""
        ver = [s for s in self.steps if s.get("kind") == "verify"]
        dec = [s["step"] for s in self.steps if s.get("kind") == "decode"]
        out = {"steps": len(self.steps), "verify_steps": len(ver),
               "verify_graph": sum(1 for s in ver if not s.get("eager")),
               "decode_steps": len(dec), "decode_step_ms": round(1e3 * statistics.median(dec), 3) if dec else None}
        for s in ver:
            s["oracle"] = s.get("oracle", 0.0) - s.get("draft", 0.0)
            s["host"] = s["step"] - sum(s.get(k, 0.0) for k in self.PHASES)
        for key in ("step",) + self.PHASES + ("host",):
            out[f"{key}_ms"] = round(1e3 * statistics.median(s.get(key, 0.0) for s in ver), 3) if ver else None
        eager = [s["forward"] for s in self.steps if s.get("eager")]
        out["eager_forwards"], out["eager_ms"] = len(eager), round(1e3 * sum(eager), 1)
        return out


def breakdown(llm: LLM, prompts, n: int, truth=None) -> dict:
    """One more generate under :class:`Phases`; its summary."""
    with Phases(llm) as ph:
        timed(llm, prompts, n, truth)
    return ph.summary()


def count_step(args: argparse.Namespace) -> dict:
    """``--count`` (CPU): what one speculative verify step (k = ``--ks[0]``, batch ``--batches[0]``, the real MTP
    head, the CUDA-graph runners' CPU stand-ins) issues outside the graphs: launches (each graph replay counts as
    one, its contents muted), host reads (``tolist``/``item``: a device-to-host sync on a GPU) and host tensors
    (a host-to-device copy: blocking, hence a sync, unless made by ``to_device``'s pinned non-blocking copy), by
    call site (benchmarks/decode_launches.py's counter)."""
    import collections

    import decode_launches as dl

    from dsv4.engine.cuda_graph import StaticGraph

    k, b = args.ks[0], args.batches[0]
    cfg = model_config(args.layers, args.weights)
    with tempfile.TemporaryDirectory() as tmp, \
            mock.patch.object(EngineConfig, "graph_max_bs", lambda self: min(4, self.max_running_requests)):
        (Path(tmp) / "config.json").write_text(json.dumps(config_json(cfg)))
        llm = build(cfg, Path(tmp), args, k)
    core = llm.core
    gen = torch.Generator().manual_seed(args.seed)
    for p in torch.randint(0, cfg.vocab_size, (b, args.prompt_len), generator=gen).tolist():
        core.add_request(p, SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True))
    while not (len(core.scheduler.running) == b and all(r.drafts and not r.prefilling
                                                        for r in core.scheduler.running)):
        core.step()
    replay, tolist, item = StaticGraph.replay, torch.Tensor.tolist, torch.Tensor.item

    def muted(self):
        dl.MODE.add("graph replay")
        dl.MODE.quiet += 1
        try:
            return replay(self)
        finally:
            dl.MODE.quiet -= 1

    def read(fn):
        def inner(self, *a):
            if dl.MODE is not None:
                dl.MODE.add("host read")
            return fn(self, *a)
        return inner

    def made(*a, **kw):  # a tensor from host data, as the step's code builds them (lift_fresh is not seen here)
        if dl.MODE is not None and str(kw.get("device")) != "meta":  # meta: layout only, no data
            # code that passes pin_memory pins on CUDA and copies non-blocking (checked by reading it)
            dl.MODE.add("host tensor, pinned on CUDA" if "pin_memory" in kw else "host tensor")
        return tensor(*a, **kw)

    tensor = torch.tensor
    StaticGraph.replay, torch.Tensor.tolist, torch.Tensor.item = muted, read(tolist), read(item)
    torch.tensor = made
    try:
        ops = dl.count(core.step)
    finally:
        StaticGraph.replay, torch.Tensor.tolist, torch.Tensor.item = replay, tolist, item
        torch.tensor = tensor
    kinds = collections.Counter()
    for name, site in ops:
        if name.startswith("host tensor"):
            pinned = "(to_device)" in site or name.endswith("pinned on CUDA")
            name = "async host-to-device copy" if pinned else "blocking host tensor"
        kinds[name] += 1
    syncs = kinds["host read"] + kinds["blocking host tensor"]
    launches = sum(v for n, v in kinds.items() if n not in ("host read", "blocking host tensor"))
    print(f"# one verify step, k={k}, batch {b}: {launches} launches outside graphs, {syncs} syncs "
          f"({kinds['host read']} host reads, {kinds['blocking host tensor']} blocking host tensors)")
    for (name, site), v in sorted(collections.Counter(ops).items(), key=lambda x: x[0][1]):
        print(f"{v:4d}  {name:28s} {site}")
    return {"k": k, "batch": b, "launches": launches, "syncs": syncs, **kinds}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--weights", default="bf16", choices=("bf16", "fp8", "fp8-fp4"),
                    help="benchmarks/decode.py's weight kinds (fp8-fp4: FP8 linears, FP4 experts, as V4-Flash)")
    ap.add_argument("--native", action="store_true",
                    help="keep FP8/FP4 weights as stored (--weight-format native); else dequantized to bf16")
    ap.add_argument("--batches", type=ints, default=[1, 8, 32] if CUDA else [1, 2])
    ap.add_argument("--ks", type=ints, default=[1, 3])
    ap.add_argument("--ps", type=floats, default=[0.0, 0.5, 0.8, 1.0])
    ap.add_argument("--prompt-len", type=int, default=64 if CUDA else 12)
    ap.add_argument("--tokens", type=int, default=64 if CUDA else 6, help="output tokens per request")
    ap.add_argument("--quick", action="store_true", help="p only at batch 1; 32 output tokens")
    ap.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--time-budget", type=float, default=200.0 if CUDA else 0.0,
                    help="seconds; points left after 80%% of it are skipped (0: none)")
    ap.add_argument("--breakdown", action="store_true",
                    help="per-phase ms of each verify step (one more generate per row, synchronised timers)")
    ap.add_argument("--count", action="store_true",
                    help="CPU: count the launches and syncs of one verify step outside the graphs, then exit")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def build(cfg: ModelConfig, d: Path, args: argparse.Namespace, k: int) -> LLM:
    max_len = args.prompt_len + args.tokens + k + 8
    bmax = max(args.batches)
    ecfg = EngineConfig(model=str(d), device=DEV.type, dtype="bfloat16" if CUDA else "float32",
                        max_running_requests=bmax, max_model_len=max_len, max_total_tokens=bmax * max_len,
                        disable_cuda_graph=not args.cuda_graph, speculative_algorithm="MTP",
                        speculative_num_steps=k, quant_sim=False,
                        weight_format="native" if args.native else "dequant")
    with mock.patch.object(runner_mod, "load_weights", random_loader(args.weights, args.seed)):
        return LLM(ecfg, progress=False)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.count:
        return count_step(args)
    if args.quick:
        args.tokens = min(args.tokens, 32)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    cfg = model_config(args.layers, args.weights)
    dev = torch.cuda.get_device_name() if CUDA else "cpu"
    card = {"device": dev, "layers": cfg.num_layers, "kinds": "".join(k[0] for k in cfg.layer_kinds),
            "hidden": cfg.hidden_size, "experts": f"{cfg.num_experts_per_tok}/{cfg.n_routed_experts}",
            "vocab": cfg.vocab_size, "mtp_layers": 1, "weights": args.weights + (" native" if args.native else ""),
            "dtype": "bfloat16" if CUDA else "float32",
            "cuda_graph": args.cuda_graph and CUDA, "prompt_len": args.prompt_len, "tokens": args.tokens}
    print("# spec_decode bench: " + ", ".join(f"{k}={v}" for k, v in card.items()), flush=True)
    rows, skipped = [], []
    gen = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(0, cfg.vocab_size, (b, args.prompt_len), generator=gen).tolist()
               for b in args.batches}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "config.json").write_text(json.dumps(config_json(cfg)))
        for k in args.ks:
            t0 = time.perf_counter()
            llm = build(cfg, d, args, k)
            mtp = llm.core.drafter
            print(f"# k={k}: engine built (weights, graphs) in {time.perf_counter() - t0:.1f} s", flush=True)
            for b in args.batches:
                if args.time_budget and time.perf_counter() - start > 0.8 * args.time_budget:
                    skipped.append(f"k={k} batch={b}")
                    continue
                llm.core.drafter = None  # plain decoding in the same engine
                timed(llm, prompts[b], args.tokens)  # warm-up (compiles, eager shapes)
                base_s, truth, _ = point(llm, prompts[b], args.tokens)
                base = b * (args.tokens - 1) / base_s
                drafts = [("plain", None), ("mtp", mtp)]
                if b == min(args.batches) or not args.quick:
                    drafts += [(f"p={p:g}", PDrafter(mtp, llm, p, args.seed)) for p in args.ps]
                for _, drafter in drafts[1:]:  # warm-up: the eager shapes (prefill, catch-up) each one meets
                    llm.core.drafter = drafter
                    timed(llm, prompts[b], args.tokens, truth)
                llm.core.drafter = None
                for name, drafter in drafts:
                    llm.core.drafter = drafter
                    if drafter is None:
                        s, out, st = base_s, truth, SpecStats()
                    else:
                        s, out, st = point(llm, prompts[b], args.tokens, truth)
                    tps = b * (args.tokens - 1) / s
                    row = {"k": k, "batch": b, "draft": name, "acc": round(st.accepted / st.proposed, 3)
                           if st.proposed else None, "tok_s": round(tps, 1),
                           "tpot_ms": round(1e3 * s / (args.tokens - 1), 3), "speedup": round(tps / base, 2),
                           "same": out == truth}
                    rows.append(row)
                    print(" | ".join(str(row[c]) for c in COLS), flush=True)
                    if args.breakdown:
                        row["breakdown"] = bd = breakdown(llm, prompts[b], args.tokens, truth)
                        items = ", ".join(f"{key}={v}" for key, v in bd.items())
                        print(f"#   breakdown k={k} batch={b} {name}: {items}", flush=True)
            del llm, mtp
            if CUDA:
                torch.cuda.empty_cache()
    print("# table")
    print(" | ".join(COLS))
    for r in rows:
        print(" | ".join(str(r[c]) for c in COLS))
    goal = [r for r in rows if r["k"] == 3 and r["batch"] == 1 and r["draft"] == "p=0.8"]
    result = dict(card, rows=rows, skipped=skipped, seconds=round(time.perf_counter() - start, 1),
                  goal_speedup_p08_k3_b1=goal[0]["speedup"] if goal else None)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
