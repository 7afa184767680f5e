"""Shared memory of the Triton kernels on an H100 (sm_90), checked without a GPU.

The interpreter neither allocates shared memory nor rejects what the GPU compiler rejects, so a kernel can pass
every CPU test and still fail to load on the GPU ("out of resource: shared memory"). Here:

* every MoE candidate and default configuration, fitted by ``moe_triton.fit_config`` for fp32 and bf16
  activations and every weight form (dense, FP8, FP4; routed alone, with a shared expert of the same form,
  FP4 routed with an FP8 shared expert), stays under ``SMEM_BUDGET`` by the estimate ``smem_bytes``; for bf16
  the candidates run unchanged;
* in a subprocess without the interpreter, the MoE kernels are compiled for sm_90 by Triton's own compiler
  (ptxas included) through the real ``moe_experts`` launches at V4-Flash widths (D=4096, I=2048, bf16, decode
  defaults (the direct path) and the grouped decode tiles, prefill defaults, each weight form, and the direct
  path's sweep tiles for the FP8 and FP4 forms) and at the tiny model's widths in fp32: each kernel's shared
  memory is within the H100 limit and within the estimate (both loops of a direct kernel with two forms);
  their registers and stack frame (local memory: spills) are read from the cubin (``cuobjdump -res-usage``)
  and printed per case (``pytest -s``), and the decode tiles of the FP8 and FP4 forms spill nothing. The three RMSNorm forms compile to one kernel (the fused FP8 codes
  equal act_quant of the plain norm only if the sum of squares runs in one order).
* the kernels that round an fp32 input to the activation dtype as they load it (rms_norm, kv_norm_rope_store,
  indexer_q reading the fused x projection's fp32 column views at V4-Flash widths) compile for sm_90 with the
  same reductions, layouts spelled out, as on the pre-rounded bf16 input: a reduction's order is a function of
  its operand's layout, so the GPU results are bit for bit those of the bf16 input too.
* the mHC kernels (mix with and without the Gram matrix, the whole-row and the chunked collapse) compile for
  sm_90 at V4-Flash width; the mix and the chunked collapse spill nothing.
* the FP8 GEMMs at decode (``fp8_linear`` at wo_b's shape with 1 and 16 rows, ``fp8_grouped_linear`` at wo_a's,
  bf16, split-K 4): every tile the benchmark sweeps (``DECODE_CANDIDATES``), the partials summed by a second
  launch and by each tile's last program (``fuse_sum``), within the H100 shared memory and spilling nothing
  (registers printed per case).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time

import pytest

triton = pytest.importorskip("triton")

from dsv4.ops import moe_decode_triton as direct  # noqa: E402
from dsv4.ops import moe_triton as moe  # noqa: E402

H100_SMEM = 232448  # bytes per block (227 KiB), what the driver reports for an H100 SXM
SHAPES = ((6, 256), (3, 8))  # (top-k, experts): V4-Flash and the tiny test models
MOE_KERNELS = ("_gate_up_kernel", "_down_kernel", "_direct_up_kernel", "_direct_down_kernel")


def _loop_sets(x_bytes: int) -> list[list[tuple[str, int]]]:
    """(form, bytes per weight element) of the routed stack and, if any, the shared one."""
    return [[("dense", x_bytes)], [("dense", x_bytes), ("dense", x_bytes)], [("fp8", 1)], [("fp8", 1), ("fp8", 1)],
            [("fp4", 1)], [("fp4", 1), ("fp8", 1)], [("fp4", 1), ("fp4", 1)]]


def _configs() -> list[dict]:
    defaults = [moe.default_config(n, k, e) for k, e in SHAPES for n in (1, 8, 16, 64, 256, 2048, 8192)]
    return [dict(c) for c in moe.CANDIDATES] + defaults


@pytest.mark.parametrize("x_bytes", [4, 2], ids=["fp32", "bf16"])
def test_moe_configs_fit_the_budget(x_bytes):
    for cfg in _configs():
        for loops in _loop_sets(x_bytes):
            fit = moe.fit_config(cfg, x_bytes, loops)
            assert max(moe.smem_bytes(fit, x_bytes, f, w) for f, w in loops) <= moe.SMEM_BUDGET < H100_SMEM
            assert fit["bk"] == cfg["bk"] and fit["bm"] >= 16 and min(fit["bn_up"], fit["bn_down"]) >= 32
            assert all(fit[key] & (fit[key] - 1) == 0 for key in ("bm", "bn_up", "bn_down"))
            if x_bytes == 2:
                assert fit == cfg, f"{moe.config_name(cfg)} shrinks for bf16 with {loops}"


def test_fit_config_shrinks_until_it_fits():
    big = dict(bm=256, bn_up=128, bn_down=256, bk=128, num_warps=8, num_stages=6)
    fit = moe.fit_config(big, 4, [("dense", 4)])
    assert moe.smem_bytes(fit, 4, "dense", 4) <= moe.SMEM_BUDGET
    assert fit["num_stages"] == 2 and fit["bk"] == 128


@functools.cache
def _compiled() -> list[dict]:
    """The rows of this file's ``__main__`` (one subprocess for every test that reads them)."""
    from harness import compiled_rows

    return compiled_rows(__file__)


@pytest.mark.skipif("nvidia" not in triton.backends.backends, reason="Triton without its CUDA backend")
def test_kernels_compile_for_sm90_within_shared_memory():
    rows = _compiled()
    moe_rows = [r for r in rows if r["kernel"] in MOE_KERNELS]
    assert len(moe_rows) >= 40
    for r in rows:
        assert r["shared"] <= H100_SMEM, r
    for r in moe_rows:
        assert r["shared"] <= r["estimate"], r
        if r.get("regs") is not None:
            print(f"{r['case']:<28} {r['kernel']:<16} FORM {r['FORM']} BM {r['BM']:>3} BN {r['BN']:>3} "
                  f"FP8_DOT {r['FP8_DOT']:<5} shared {r['shared']:>6} regs {r['regs']:>3} stack {r['stack']}")
            # NOTE: the direct down kernel may keep 8 bytes of stack (FP4 + FP8 shared, 128-wide tiles): ptxas saves
            # a predicate register across the K loop (one STL before it, one LDL after, as measured in the SASS of
            # an earlier form of it, 2026-12-04), not a register spill in the loop
            allowed = 8 if r["kernel"] == "_direct_down_kernel" else 0
            if r["case"].startswith("bf16") and (" n=8" in r["case"] or " direct " in r["case"]) and r["FORM"] != "0":
                assert r["stack"] <= allowed, f"decode tiles spill: {r}"
    hyper = [r for r in rows if r["case"].startswith("mhc")]
    assert {r["kernel"] for r in hyper} == {"_mix_partial_kernel", "_collapse_kernel", "_collapse_chunk_kernel"}
    for r in hyper:
        print(f"{r['case']:<40} {r['kernel']:<24} GRAM {r.get('GRAM', '-'):<5} POST {r.get('POST', '-'):<5} "
              f"shared {r['shared']:>6} regs {r['regs']} stack {r['stack']}")
        if r["kernel"] != "_collapse_kernel" and r.get("stack") is not None:  # the whole-row form keeps 16 bytes
            assert r["stack"] == 0, f"mHC kernel spills: {r}"
    norms = [r for r in rows if r["kernel"] == "_rms_norm_kernel"]
    for dtype in ("bf16", "fp32"):
        assert len({r["hash"] for r in norms if r["case"].startswith(dtype)}) == 1, norms
    rounding = [r for r in rows if r["case"].startswith("rounds")]
    assert {r["kernel"] for r in rounding} == {"_rms_norm_kernel", "_kv_norm_rope_store_kernel", "_indexer_q_kernel"}
    for r in rounding:
        if r["case"].endswith("fp32 in"):
            bf16 = next(b for b in rounding if b["case"] == r["case"].replace("fp32 in", "bf16 in"))
            assert r["hash"] != bf16["hash"] and r["reduces"] and r["reduces"] == bf16["reduces"], (r, bf16)


FP8_KERNELS = ("_fp8_gemm_kernel", "_fp8_grouped_kernel")


@pytest.mark.skipif("nvidia" not in triton.backends.backends, reason="Triton without its CUDA backend")
def test_fp8_decode_tiles_compile_for_sm90_without_spills():
    from dsv4.ops import fp8_gemm_triton as fp8

    rows = [r for r in _compiled() if r["kernel"] in FP8_KERNELS]
    # every sweep tile in both sum forms: the linear at two row counts, the grouped at one
    assert len(rows) == 3 * 2 * len(fp8.DECODE_CANDIDATES), len(rows)
    assert {r["FUSE_SUM"] for r in rows} == {"True", "False"} and {r["SPLIT"] for r in rows} == {"True"}
    for r in rows:
        print(f"{r['case']:<16} {r['kernel']:<20} BN {r['BLOCK_N']:>3} w{r['num_warps']} s{r['num_stages']} "
              f"FUSE_SUM {r['FUSE_SUM']:<5} shared {r['shared']:>6} regs {r['regs']} stack {r['stack']}")
        assert r["shared"] <= H100_SMEM, r
        assert r["stack"] in (None, 0), f"spills: {r}"


# --- the subprocess: compile every launch for sm_90 instead of running it ---------------------------------------


def _compile_launches(record: list[dict]) -> None:
    """Make every ``kernel[grid](...)`` compile for sm_90 (as the JIT would on an H100: the same argument
    specialization) and append its shared memory to ``record`` instead of launching."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def usage(cubin: bytes) -> tuple[int | None, int | None]:
        """(registers, stack frame bytes) of a cubin; (None, None) without cuobjdump."""
        if not os.path.exists(cuobjdump):
            return None, None
        import re
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+)", out)
        return (int(m.group(1)), int(m.group(2))) if m else (None, None)

    def run(self, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, spec, opts)
        t0 = time.time()
        k = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target, options=options.__dict__)
        regs, stack = usage(k.asm["cubin"])
        record.append(dict(kernel=self.fn.__name__, shared=k.metadata.shared, hash=k.hash, secs=time.time() - t0,
                           num_stages=options.num_stages, num_warps=options.num_warps, regs=regs, stack=stack, reduces=reductions(k.asm["ttgir"]),
                           **{self.arg_names[p[0]]: str(v) for p, v in constexprs.items()}))

    JITFunction.run = run


def reductions(ttgir: str) -> list[str]:
    """Every reduction and scan of a TTGIR listing as ``op axis: operand types``, the layouts spelled out (what
    fixes the order in which it combines its elements)."""
    import re

    defs = dict(re.findall(r"^(#[\w.]+) = (.*)$", ttgir, re.M))
    out, pending = [], None
    for line in ttgir.splitlines():
        m = re.search(r'"(tt\.reduce|tt\.scan)"\(.*?\) <\{(.*?)\}>', line)
        if m:
            pending = f"{m[1]} {m[2]}"
        m = re.match(r"\s*\}\) : \((.*?)\) ->", line)
        if m and pending:
            out.append(f"{pending}: " + re.sub(r"#[\w.]+", lambda d: defs.get(d[0], d[0]), m[1]))
            pending = None
    return out


def _rounding_cases(record: list[dict]) -> None:
    """The consumers of the fused x projection's activation parts, each on the fp32 accumulation (a column view
    of the CSA layer's product at V4-Flash widths, rounded as it loads) and on the pre-rounded bf16 part."""
    import torch

    from dsv4.config import CSA, flash_config
    from dsv4.model.x_proj import x_parts
    from dsv4.ops import indexer_triton, norm_triton, qkv_triton

    cfg = flash_config()
    parts = x_parts(cfg, next(i for i in range(cfg.num_layers) if cfg.layer_kind(i) == CSA))
    t, bf = 8, torch.bfloat16
    y = torch.zeros(t, sum(p.rows for p in parts))
    cols, a = {}, 0
    for p in parts:
        cols[p.name], a = y[:, a: a + p.rows], a + p.rows
    hd, rd = cfg.head_dim, cfg.rope_dim
    cos = sin = torch.zeros(t, rd // 2)
    q = torch.zeros(t, cfg.index_n_heads, cfg.index_head_dim, dtype=bf)
    for name, fp32 in (("bf16 in", False), ("fp32 in", True)):
        part = {n: c if fp32 else c.to(bf) for n, c in cols.items()}
        start = len(record)
        norm_triton.rms_norm(part["wq_a"], torch.ones(cfg.q_lora_rank), 1e-6, dtype=bf)
        qkv_triton.kv_norm_rope_store(part["wkv"], torch.ones(hd), 1e-6, cos, sin, True,
                                      torch.zeros(2, 128, hd, dtype=bf), torch.zeros(t, dtype=torch.int64), dtype=bf)
        indexer_triton.indexer_q(q, part["indexer.weights_proj"], 0.1, cos, sin, True, w_dtype=bf)
        for r in record[start:]:
            r["case"] = f"rounds {r['kernel']} {name}"


def _moe_cases(record: list[dict]) -> None:
    import torch

    from dsv4.ops.moe import ExpertWeights

    def stack(form: str, e: int, d: int, i: int, dt: torch.dtype) -> ExpertWeights:
        if form == "dense":
            return ExpertWeights(*(torch.empty(e, *s, dtype=dt) for s in ((i, d), (i, d), (d, i))))
        if form == "fp8":
            f8 = torch.float8_e4m3fn
            return ExpertWeights(*(torch.empty(e, *s, dtype=f8) for s in ((i, d), (i, d), (d, i))),
                                 *(torch.ones(e, a // 128, b // 128) for a, b in ((i, d), (i, d), (d, i))))
        return ExpertWeights(*(torch.empty(e, a, b // 2, dtype=torch.uint8) for a, b in ((i, d), (i, d), (d, i))),
                             *(torch.ones(e, a, b // 32) for a, b in ((i, d), (i, d), (d, i))))

    cases = [("bf16", torch.bfloat16, r, s, 4096, 2048) for r, s in (("dense", "dense"), ("fp8", "fp8"), ("fp4", "fp8"))]
    cases.append(("fp32", torch.float32, "dense", "dense", 256, 128))
    e, k = 8, 6
    # the decode default (the direct path), the grouped decode tiles, the prefill default; at V4-Flash widths the
    # direct path's sweep tiles too
    runs = [(8, None, ""), (8, dict(direct=False), " grouped"), (2048, None, "")]
    for name, dt, rf, sf, d, i in cases:
        tiles = direct.CANDIDATES[2:] + direct.FUSED_CANDIDATES
        sweep = [(1, dict(c, direct=True), f" direct {moe.config_name(c)}") for c in tiles]
        prefill = []
        if name == "bf16" and rf != "fp4":  # the prefill sweep's tiles (benchmarks/moe_prefill_sweep.py)
            quant = dict(fp8_dot=True, prequant=True) if rf == "fp8" else {}
            prefill = [(2048, dict(c, direct=False, **quant), f" prefill {moe.config_name(c)}")
                       for c in moe.PREFILL_CANDIDATES[rf]]
        for n, cfg, label in runs + (sweep if name == "bf16" and rf != "dense" else []) + prefill:
            start = len(record)
            x = torch.zeros(n, d, dtype=dt)
            ids = torch.randint(0, e, (n, k))
            moe.moe_experts(x, stack(rf, e, d, i, dt), torch.ones(n, k), ids, 10.0, act_quant=rf != "dense",
                            shared=stack(sf, 1, d, i, dt), shared_limit=10.0, out_dtype=dt, config=cfg)
            forms = {moe._FORM[f]: f for f in (rf, sf)}
            for r in record[start:]:
                r["case"] = f"{name} {rf}+{sf} n={n}{label}"
                kernel = r["kernel"]
                if kernel not in MOE_KERNELS:
                    continue
                n_w = 2 if "up" in kernel else 1
                # a direct kernel with two forms holds both loops, in exclusive branches: one buffer set, the
                # larger (fit_config's assumption, checked here)
                loop_forms = [forms[int(r["FORM"])]] + (
                    [forms[int(r["SH_FORM"])]] if r.get("ONE_LOOP") == "False" else [])
                r["estimate"] = max(_estimate(r, x.element_size(), f, n_w) for f in loop_forms)


def _hyper_cases(record: list[dict]) -> None:
    """The mHC kernels at V4-Flash width (D 4096, hc 4, 24 mixes), bf16 and fp32 streams: pre+norm, the fused
    boundary and the head, with the whole-row collapse and the chunked one (the mix kernel with the Gram matrix)."""
    import torch

    from dsv4.ops import hyper_triton as tri

    d, hc = 4096, 4

    def site(m: int) -> tuple[torch.Tensor, ...]:
        return torch.zeros(m, hc * d), torch.ones(3 if m > hc else 1), torch.zeros(m), torch.ones(d)

    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for t, cfg in ((1, None), (1, dict(cbd=256, cwarps=2)), (8, dict(cbd=1024, cwarps=4)),
                       (64, dict(cbd=512, cwarps=4))):
            start = len(record)
            x, a = torch.zeros(t, hc, d, dtype=dt), torch.zeros(t, d, dtype=dt)
            tri.hc_pre_norm(x, *site((2 + hc) * hc), hc, 20, 1e-6, 1e-6, config=cfg)
            tri.hc_post_pre_norm(a, x, torch.zeros(t, hc), torch.zeros(t, hc, hc), *site((2 + hc) * hc), hc, 20,
                                 1e-6, 1e-6, config=cfg, fused=True)
            tri.hc_head(x, *site(hc)[:3], 1e-6, 1e-6, config=cfg)
            for r in record[start:]:
                r["case"] = f"mhc {name} t={t} cbd={None if cfg is None else cfg['cbd']}"


def _estimate(r: dict, x_bytes: int, form: str, n_w: int) -> int:
    """moe._loop_bytes for one compiled loop: in the grouped kernels no converted weight copy where the MMA reads
    the staged tiles (dense weights in the activation dtype without act_quant; FP8 weights under FP8_DOT with
    pre-quantized, one-byte activations), as moe.smem_bytes assumes."""
    w_bytes = 1 if form != "dense" else x_bytes
    grouped = r["kernel"] in ("_gate_up_kernel", "_down_kernel")
    fp8_staged = grouped and form == "fp8" and r.get("FP8_DOT") == "True" and r.get("A_Q") == "True"
    dense_staged = grouped and form == "dense" and r.get("ACT_QUANT") == "False"
    return moe._loop_bytes(int(r["BM"]), int(r["BN"]), int(r["BK"]), r["num_stages"], x_bytes, form, w_bytes, n_w,
                           1 if fp8_staged else x_bytes, not (fp8_staged or dense_staged))


def _norm_cases(record: list[dict]) -> None:
    import torch

    from dsv4.ops import norm_triton as norm

    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        start = len(record)
        x, w = torch.zeros(4096, 4096, dtype=dt), torch.ones(4096)
        norm.rms_norm(x, w, 1e-6)
        norm.rms_norm_quant(x, w, 1e-6)
        norm.rms_norm_quant(x, w, 1e-6, scale_fmt=None)
        norm.rms_norm_quant_sim(x, w, 1e-6)
        for r in record[start:]:
            r["case"] = name


def _fp8_cases(record: list[dict]) -> None:
    """The FP8 GEMMs' decode launches at V4-Flash widths (the weights' values do not matter: nothing runs)."""
    import torch

    from dsv4.ops import fp8_gemm_triton as fp8

    f8, bf = torch.float8_e4m3fn, torch.bfloat16
    w, ws = torch.zeros(4096, 8192, dtype=f8), torch.ones(32, 64)  # wo_b
    wa, was = torch.zeros(8 * 1024, 4096, dtype=f8), torch.ones(64, 32)  # wo_a
    for tile in fp8.DECODE_CANDIDATES:
        for fuse in (False, True):
            cfg = dict(tile, splits=4, fuse_sum=fuse)
            for case, x in [(f"fp8 wo_b m={m}", torch.zeros(m, 8192, dtype=bf)) for m in (1, 16)] + \
                    [("fp8 wo_a t=1", torch.zeros(1, 8, 4096, dtype=bf))]:
                start = len(record)
                if x.dim() == 2:
                    fp8.fp8_linear(x, w, ws, cfg)
                else:
                    fp8.fp8_grouped_linear(x, wa, was, cfg)
                for r in record[start:]:
                    r["case"] = case

if __name__ == "__main__":
    record: list[dict] = []
    _compile_launches(record)
    _moe_cases(record)
    _norm_cases(record)
    _rounding_cases(record)
    _hyper_cases(record)
    _fp8_cases(record)
    for r in record:
        print(json.dumps(r))
