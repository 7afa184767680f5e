"""KV-compressor update benchmarks at V4-Flash shapes, run by benchmarks/kernels.py.

Three compressors: the main CSA one (head_dim 512, ratio 4, overlapping, FP8 nope simulation), the indexer's
(128, ratio 4, Hadamard + FP4) and HCA (512, ratio 128); fp32 projections in (what the model feeds: the
official compressor projects in fp32), bf16 pool, pages of ``kernels.PAGE``. Decode at every batch size with
requests at consecutive positions (so windows close as often as in a real step: one request in m) and with
every request closing a window (the worst step); prefill chunks of 1024 and 4096 tokens after an unaligned
prefix. ``bytes`` is the fewest bytes the update must move: the kv and score projections once, the tail rows it
must read (rows of closing windows from before the request's prefix; for CSA the closed window's rows it
copies), the tail rows it writes, the entries it writes, the per-token positions.
"""

from __future__ import annotations

from functools import partial

import kernels as K
import torch

from dsv4.ops import compressor as ref
from dsv4.ops import compressor_triton as tri
from dsv4.ops.rope import rope_inv_freq

# name: (head_dim, ratio, overlap, quant)
KINDS = ({"csa": (64, 4, True, "fp8"), "indexer": (32, 4, True, "fp4"), "hca": (64, 8, False, "fp8")} if K.SMOKE
         else {"csa": (512, 4, True, "fp8"), "indexer": (128, 4, True, "fp4"), "hca": (512, 128, False, "fp8")})
CHUNKS = (K.EXTEND, 2 * K.EXTEND) if K.SMOKE else (1024, 4096)
PROJ_BYTES, STATE_BYTES, POOL_BYTES = 4, 4, 2
MAX_COPY_BYTES = 8 << 30


def floor_bytes(requests: list[tuple[int, int]], d: int, m: int, overlap: bool) -> int:
    """Fewest bytes of one update with position-indexed tails (S = c*m rows here): the projections and positions
    in, the ape bias, the state rows a closing window reads (positions below the prefix), each entry out, and the
    last min(S, n) rows of each request written back (nothing is shifted or copied)."""
    c = 2 if overlap else 1
    row = c * d * 2 * STATE_BYTES  # one tail row: kv and score, every channel
    total = m * c * d * 4  # ape
    for p0, n in requests:
        end = p0 + n
        total += n * (c * d * 2 * PROJ_BYTES + 8) + min(c * m, n) * row
        for w in range(p0 // m, end // m):  # the windows that close in this batch
            start = w * m
            old = max(0, min(p0, start + m) - start)
            if overlap:  # the previous window's first halves
                old += max(0, min(p0, start) - max(0, start - m))
            total += old * d * 2 * STATE_BYTES + d * POOL_BYTES
    return total


def case(kind: str, requests: list[tuple[int, int]]) -> dict:
    """Requests (prefix_len, extend_len) in slots 0..R-1 with random tails; only the pages the batch writes
    are real (shuffled), the other page-table entries point at the dummy page 0."""
    d, m, overlap, quant = KINDS[kind]
    dev, ps, c = K.DEV, K.PAGE, 2 if overlap else 1
    r, t = len(requests), sum(n for _, n in requests)
    table = torch.zeros(r, max(p + n for p, n in requests) // m // ps + 1, dtype=torch.int64)
    cols = [range(p // m // ps, (p + n) // m // ps + 1) for p, n in requests]
    ids = (torch.randperm(sum(len(x) for x in cols)) + 1).tolist()
    for i, x in enumerate(cols):
        for col in x:
            table[i, col] = ids.pop()
    return dict(
        kv=torch.randn(t, c * d, device=dev), score=torch.randn(t, c * d, device=dev),
        ape=torch.randn(m, c * d, device=dev), norm_weight=torch.ones(d, device=dev), eps=1e-6,
        inv_freq=rope_inv_freq(K.RD, 160000.0, None).to(dev), quant=quant,
        positions=torch.cat([torch.arange(p, p + n, device=dev) for p, n in requests]),
        slots=torch.arange(r, device=dev), prefix_lens=torch.tensor([p for p, _ in requests], device=dev),
        extend_lens=torch.tensor([n for _, n in requests], device=dev),
        starts=torch.tensor([0] + [n for _, n in requests[:-1]], device=dev).cumsum(0),
        kv_state=torch.randn(r, c * m, c * d, device=dev), score_state=torch.randn(r, c * m, c * d, device=dev),
        pool=torch.randn(int(table.max()) + 1, ps, d, device=dev).bfloat16(), table=table.to(dev),
    )


def footprint(args: dict) -> int:
    return sum(v.numel() * v.element_size() for v in args.values() if isinstance(v, torch.Tensor))


def measure(kind: str, variant: str, batch: int, ctx: int, requests: list[tuple[int, int]], bw: float,
            quick: bool, config: dict | None = None) -> dict:
    d, m, overlap, _ = KINDS[kind]
    args = case(kind, requests)
    nbytes = floor_bytes(requests, d, m, overlap)
    # enough copies that the bytes a step touches leave L2, within a few GiB of (mostly untouched) tails
    n = max(1, min(K.n_copies(nbytes), MAX_COPY_BYTES // footprint(args)))
    copies = [args] + [case(kind, requests) for _ in range(n - 1)]
    ref_ms = None if quick else K.timed_ref(partial(ref.compress_update, **args))
    t_ms = K.timed(lambda a: tri.compress_update(**a, config=config), copies)
    return K.row(f"compress_{kind}", variant, batch, ctx, t_ms, nbytes, bw, ref_ms)


def run(bw: float, quick: bool) -> list[dict]:
    rows = []
    ctx = K.CONTEXTS[0]
    for kind, (_, m, _, _) in KINDS.items():
        for b in K.BATCHES:
            rows.append(measure(kind, "decode", b, ctx, [(ctx + i, 1) for i in range(b)], bw, quick))
            rows.append(measure(kind, "decode, every request closes", b, ctx,
                                [(ctx + m * (i + 1) - 1, 1) for i in range(b)], bw, quick))
        for n in CHUNKS:
            rows.append(measure(kind, f"prefill chunk {n}", n, ctx + 3, [(ctx + 3, n)], bw, quick))
    rows += sweep_long(bw)
    return rows


def sweep_long(bw: float) -> list[dict]:
    """HCA window closes (batch 1 and 64) and one prefill chunk under the default and every
    ``compressor_triton.CANDIDATES["long"]`` point; prints the fastest per shape (the pooling split decision)."""
    ctx, rows = K.CONTEXTS[0], []
    _, m, _, _ = KINDS["hca"]
    shapes = [(b, "decode, every request closes", [(ctx + m * (i + 1) - 1, 1) for i in range(b)])
              for b in (1, K.BATCHES[-2] if len(K.BATCHES) > 2 else K.BATCHES[-1])]
    shapes.append((CHUNKS[0], f"prefill chunk {CHUNKS[0]}", [(ctx + 3, CHUNKS[0])]))
    for b, variant, requests in shapes:
        best = None
        for cand in [{}] + list(tri.CANDIDATES["long"]):
            cfg = tri.DEFAULTS["long"] | cand
            name = " ".join(f"{k}={v}" for k, v in cand.items()) or "default"
            try:
                r = measure("hca", f"{variant}, sweep {name}", b, ctx, requests, bw, True, cfg)
            except Exception as e:  # noqa: BLE001  (a point beyond the GPU's resources must not end the sweep)
                print(f"# compressor sweep {variant} {name} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            rows.append(r)
            best = r if best is None or r["us"] < best["us"] else best
        if best is not None:
            print(f"# compressor hca {variant} b{b}: best {best['variant']} ({best['us']} us)", flush=True)
    return rows
