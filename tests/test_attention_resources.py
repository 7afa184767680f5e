"""Registers, spills and shared memory of the sparse attention kernel on an H100/H200 (sm_90), checked without a
GPU.

The interpreter neither allocates registers nor rejects what the GPU compiler rejects: a configuration can pass
every CPU test and still spill in its key loop (local-memory traffic on every key block) or fail to load ("out
of resource: shared memory"). Here, in a subprocess without the interpreter, ``paged_sparse_attention`` is
called at V4-Flash shapes (64 heads x 512, rope 64, window 128, CSA top-512 / HCA, page 64) with its default
configuration, and every launch is compiled for sm_90 by Triton's own compiler (ptxas included) instead of run:

bf16 activations, bf16 KV (CSA and HCA) and FP8 KV (CSA): no spill instruction in the key loop (the loop
holding the MMAs, read off the SASS), registers and shared memory within an SM's. The same for the multi-query
kernel's default (``attention_mq_triton``, extend rows: bf16 KV CSA and HCA, FP8 KV CSA).

``python tests/test_attention_resources.py --candidates`` prints the same figures for every
``attention_triton.CANDIDATES`` point (bf16 and FP8 KV, bf16 activations; a few minutes on two cores);
``--mq`` for every ``attention_mq_triton.CANDIDATES`` point.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton")

SM90_SMEM = 232448  # bytes per block (227 KiB), what the driver reports for an H100/H200


@pytest.mark.skipif("nvidia" not in triton.backends.backends, reason="Triton without its CUDA backend")
def test_attention_defaults_compile_without_loop_spills():
    from harness import compiled_rows

    rows = compiled_rows(__file__)
    attn = [r for r in rows if r["kernel"] == "_attn_kernel"]
    assert {r["case"] for r in attn} == {c[0] for c in CASES}, rows
    assert any(r["kernel"] == "_combine_kernel" for r in rows)
    mq = [r for r in rows if r["kernel"] == "_mq_kernel"]
    assert {r["case"] for r in mq} == {c[0] for c in MQ_CASES}, rows
    for r in rows:
        assert r["shared"] <= SM90_SMEM, r
        assert r["regs"] <= 255, r
    for r in attn + mq:
        if r["case"].startswith(("bf16", "mq bf16")):
            assert r["loop_mma"] > 0 and r["loop_ldl"] == 0 and r["loop_stl"] == 0, r
    for r in mq:  # FP8 KV too, and every key loop (window ring / own, CSA picks or HCA entries)
        assert r["loops"] >= 3 and r["loops_spill"] == 0, r


# --- the subprocess: compile every launch for sm_90 instead of running it ---------------------------------------

# (name, activation dtype, kind, FP8 KV); every launch is the split form, so the combine kernel compiles too (the
# attention kernel is the same compiled code in both forms: SPLIT is a runtime argument)
# (fp32 activations, the GPU tests' exact checks, are left out: their FMA-dot kernels take ptxas ~30 s each on
# this CPU. Measured 2026-12-04: 131 KB with FP8 KV at one stage (as they run), 135 KB with bf16 KV at two;
# `python tests/test_attention_resources.py "fp32 csa fp8kv"` prints it again.)
CASES = (("bf16 csa", "bf16", "csa", False), ("bf16 hca", "bf16", "hca", False),
         ("bf16 csa fp8kv", "bf16", "csa", True))
EXTRA = (("fp32 csa fp8kv", "fp32", "csa", True), ("fp32 csa", "fp32", "csa", False))
# the multi-query kernel's default on extend rows (64 rows of one request: the rows_per_request entry runs it
# alone); no spill in any of its key loops, FP8 KV included
MQ_CASES = (("mq bf16 csa", "bf16", "csa", False), ("mq bf16 hca", "bf16", "hca", False),
            ("mq bf16 csa fp8kv", "bf16", "csa", True))


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def loop_stats(sass: str) -> dict:
    """Instruction counts of the innermost loop holding MMAs (the key loop) in a SASS listing: its size, MMAs,
    local loads and stores (spills) and global loads."""
    ins = [(int(m[1], 16), m[2]) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    mma = [a for a, t in ins if "MMA" in t]
    loops = []
    for a, t in ins:
        m = re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", t)
        if m and int(m[1], 16) < a and any(int(m[1], 16) <= x <= a for x in mma):
            loops.append((a - int(m[1], 16), int(m[1], 16), a))
    if not loops:
        return dict(loop_instr=0, loop_mma=0, loop_ldl=0, loop_stl=0, loop_ldg=0, loops=0, loops_spill=0)
    _, lo, hi = min(loops)
    body = [t for a, t in ins if lo <= a <= hi]
    # every innermost MMA loop (one that holds no other): the multi-query kernel has several key loops
    inner = [(lo2, hi2) for _, lo2, hi2 in loops
             if not any((lo2, hi2) != (l3, h3) and lo2 <= l3 and h3 <= hi2 for _, l3, h3 in loops)]
    spill = sum(("LDL" in t or "STL" in t) for lo2, hi2 in inner for a, t in ins if lo2 <= a <= hi2)
    return dict(loop_instr=len(body), loop_mma=sum("MMA" in t for t in body),
                loop_ldl=sum("LDL" in t for t in body), loop_stl=sum("STL" in t for t in body),
                loop_ldg=sum("LDG" in t for t in body), loops=len(inner), loops_spill=spill)


def _usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.remove(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    return dict(regs=int(m[1]), stack=int(m[2]), **loop_stats(sass))


def _compile_launches(record: list[dict]) -> None:
    """Make every ``kernel[grid](...)`` compile for sm_90 (the JIT's own argument specialization) and append its
    resources to ``record`` instead of launching."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)

    def run(self, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, spec, opts)
        k = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target, options=options.__dict__)
        record.append(dict(kernel=self.fn.__name__, shared=k.metadata.shared, **_usage(k.asm["cubin"])))

    JITFunction.run = run


def _flash_args(act: str, kind: str, fp8: bool, t: int = 64) -> dict:
    import torch

    from dsv4.ops.kv_fp8 import alloc_fp8_kv

    h, hd, rd, w, topk, page = 64, 512, 64, 128, 512, 64
    dt = torch.float32 if act == "fp32" else torch.bfloat16
    i64 = dict(dtype=torch.int64)
    args = dict(q=torch.empty(t, h, hd, dtype=dt), kv=torch.empty(t, hd, dtype=dt),
                ring=torch.empty(t, w, hd, dtype=dt), comp=torch.empty(t * 16, page, hd, dtype=dt),
                page_table=torch.zeros(t, 16, **i64), picks=torch.zeros(t, topk, **i64) if kind == "csa" else None,
                slot=torch.zeros(t, **i64), p0=torch.zeros(t, **i64), pos=torch.zeros(t, **i64),
                sink=torch.zeros(h), scale=hd**-0.5, window=w, ratio=4 if kind == "csa" else 128,
                cos=torch.zeros(t, rd // 2), sin=torch.zeros(t, rd // 2))
    if fp8:
        args["ring"] = alloc_fp8_kv((t, w), hd, rd, dt, "cpu")
        args["comp"] = alloc_fp8_kv((t * 16, page), hd, rd, dt, "cpu")
    return args


def main(names: list[str]) -> None:
    """Print one JSON line per compiled launch of the named CASES or EXTRA (CASES by default; ``--candidates``:
    every candidate instead)."""
    from dsv4.ops import attention_mq_triton as mq
    from dsv4.ops import attention_triton as tri

    record: list[dict] = []
    _compile_launches(record)
    if "--candidates" in names:
        points = [(f"{tri.config_name(c)} bf16 {kind}{' fp8kv' if fp8 else ''}", "bf16", kind, fp8, c)
                  for c in tri.CANDIDATES for kind, fp8 in (("csa", False), ("csa", True))]
    elif "--mq" in names:
        points = [(f"mq {mq.config_name(c)} bf16 {kind}{' fp8kv' if fp8 else ''}", "bf16", kind, fp8, c)
                  for c in mq.CANDIDATES for kind, fp8 in (("csa", False), ("hca", False), ("csa", True))]
    else:
        points = [(*case, {}) for case in CASES + EXTRA + MQ_CASES
                  if case[0] in names or not names and case in CASES + MQ_CASES]
    for name, act, kind, fp8, cfg in points:
        start = len(record)
        if name.startswith("mq "):  # one request's rows (the pos / slot values do not reach the compiler)
            # the kernel itself (the entry keeps FP8 stores on the single-row kernel while MQ_FP8 is off)
            mq.multi_query_attention(**_flash_args(act, kind, fp8), config=cfg)
        else:
            tri.paged_sparse_attention(**_flash_args(act, kind, fp8), config=dict(cfg, split=True))
        for r in record[start:]:
            print(json.dumps(dict(case=name, **r)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
