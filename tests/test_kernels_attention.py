"""The paged sparse attention kernels against dsv4.ops.attention.paged_sparse_attention (fresh inputs each run),
their batch invariance (a row alone and in any batch: bitwise the same, split or not) and FP8 stores: the
single-row kernel (attention_triton) and the multi-query one for extend and verify rows (attention_mq_triton)."""

from __future__ import annotations

import pytest
import torch
from harness import rel_err

pytest.importorskip("triton")

from dsv4.ops import attention as ref  # noqa: E402
from dsv4.ops import attention_mq_triton as mq  # noqa: E402
from dsv4.ops import attention_triton as tri  # noqa: E402
from dsv4.ops.kv_fp8 import alloc_fp8_kv, scatter_rows  # noqa: E402
from dsv4.ops.rope import rope_cos_sin, rope_inv_freq  # noqa: E402


@pytest.fixture(autouse=True)
def _multi_query_on(monkeypatch):
    """The multi-query form is opt-in (attention_mq_triton.ENABLED): these tests exercise it through its entry."""
    monkeypatch.setattr(mq, "ENABLED", True)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# small groups keep the interpreter's split grids short; the group logic is the same at any size
SMALL = dict(groups=4, min_group_blocks=1)


def make_world(kind: str, requests: list[tuple[int, int]], h: int = 4, hd: int = 32, rd: int = 8, window: int = 8,
               slack: int = 0, ratio: int = 4, topk: int = 5, page_size: int = 4, dtype=torch.float32,
               device: str = DEV) -> dict:
    """Random caches and per-request rows (q, kv, picks) for (prefix_len, extend_len) requests; :func:`batch_of`
    lays any subset of them out as one batch."""
    slots = len(requests) + 1
    longest = max(p + n for p, n in requests)
    w = dict(kind=kind, requests=requests, window=window, ratio=ratio, topk=topk, hd=hd, rd=rd, device=device,
             ring=torch.randn(slots, window + slack, hd, device=device).to(dtype),
             slot_ids=torch.randperm(slots, device=device)[: len(requests)].tolist(), sink=torch.randn(h, device=device),
             q=[torch.randn(n, h, hd, device=device).to(dtype) for _, n in requests],
             kv=[torch.randn(n, hd, device=device).to(dtype) for _, n in requests],
             comp=None, page_table=None, picks=None)
    if kind != "sliding":
        per_slot = -(-(longest // ratio) // page_size) + 1
        pages = slots * per_slot + 1
        w["comp"] = torch.randn(pages, page_size, hd, device=device).to(dtype)
        w["page_table"] = (torch.randperm(pages - 1, device=device)[: slots * per_slot] + 1).view(slots, per_slot)
    if kind == "csa":
        w["picks"] = []
        for p, n in requests:
            vis = (torch.arange(p, p + n) + 1) // ratio
            rows = torch.full((n, topk), -1, dtype=torch.int64)
            for i in range(n):
                c = min(topk, int(vis[i]))
                rows[i, :c] = torch.randperm(int(vis[i]))[:c]
            w["picks"].append(rows.to(device))
    return w


def batch_of(w: dict, which: list[int]) -> dict:
    """Kernel arguments for the requests ``which`` of world ``w``, in that order. CSA picks are as wide as the
    indexer makes them: min(topk, the most entries any request of the batch has)."""
    dev, reqs = w["device"], w["requests"]
    cat = torch.cat
    pos = cat([torch.arange(reqs[i][0], sum(reqs[i]), device=dev) for i in which])
    args = dict(q=cat([w["q"][i] for i in which]), kv=cat([w["kv"][i] for i in which]), ring=w["ring"],
                comp=w["comp"], page_table=w["page_table"], picks=None,
                slot=cat([torch.full((reqs[i][1],), w["slot_ids"][i], device=dev) for i in which]),
                p0=cat([torch.full((reqs[i][1],), reqs[i][0], device=dev) for i in which]), pos=pos,
                sink=w["sink"], scale=w["hd"] ** -0.5, window=w["window"], ratio=w["ratio"])
    args["cos"], args["sin"] = rope_cos_sin(pos, rope_inv_freq(w["rd"], 10000.0, None).to(dev))
    if w["kind"] == "csa":
        width = min(w["topk"], max(sum(reqs[i]) // w["ratio"] for i in which))
        args["picks"] = cat([w["picks"][i][:, :width] for i in which])
    return args


def make_case(kind: str, requests: list[tuple[int, int]], **kw) -> dict:
    """A batch of (prefix_len, extend_len) requests over random caches; returns the kernel's arguments."""
    return batch_of(make_world(kind, requests, **kw), list(range(len(requests))))


def to_fp8(args: dict) -> dict:
    """The same case with the ring and the pool held as FP8 stores (their rows rounded on the way in)."""
    out = dict(args)
    rd = 2 * args["cos"].shape[-1]
    for name in ("ring", "comp"):
        x = args[name]
        if x is not None:
            st = alloc_fp8_kv(tuple(x.shape[:-1]), x.shape[-1], rd, x.dtype, x.device)
            scatter_rows(st, torch.arange(x[..., 0].numel(), device=x.device), x.reshape(-1, x.shape[-1]))
            out[name] = st
    return out


REQUESTS = [(50, 1), (7, 5), (0, 12), (3, 1), (30, 9)]


@pytest.mark.parametrize("kind", ["sliding", "hca", "csa"])
def test_attention_fp32(kind):
    """window 8 (ring 10): the 12-token chunk is longer than the ring; window 20: groups cut the window."""
    for window, split in ((8, False), (20, True)):
        args = make_case(kind, REQUESTS, window=window, slack=2)
        want = ref.paged_sparse_attention(**args)
        got = tri.paged_sparse_attention(**args, config=dict(SMALL, split=split, block_n=16))
        assert rel_err(got.flatten(1), want.flatten(1)).max() <= 1e-5, (window, split)


def test_attention_fp32_wide_heads_long_window():
    """More heads than one block (and a partly masked 32-head block), a window longer than a key block, groups
    of one block and of several."""
    args = make_case("csa", [(70, 1), (5, 14), (90, 2)], h=20, hd=64, rd=16, window=24, ratio=4, topk=9)
    want = ref.paged_sparse_attention(**args)
    for split, block_h, min_gb in ((False, 32, 2), (True, 16, 1)):
        got = tri.paged_sparse_attention(**args, config=dict(split=split, block_n=16, block_h=block_h, groups=3,
                                                             min_group_blocks=min_gb))
        assert rel_err(got.flatten(1), want.flatten(1)).max() <= 1e-5, (split, block_h)


def test_attention_bf16():
    args = make_case("hca", REQUESTS, dtype=torch.bfloat16)
    want = ref.paged_sparse_attention(**args).float()
    got = tri.paged_sparse_attention(**args, config=dict(SMALL, block_n=16)).float()
    # norm-wise (METHOD.md): the kernel rounds unnormalised probabilities to bf16 (as the official kernel),
    # the reference normalised ones, so single elements may differ by a bf16 step or two
    assert not torch.isnan(got).any() and (got - want).norm() / want.norm() <= 1e-2


def test_attention_fp8_stores():
    """Ring and pool as FP8 nope + scale + rope stores: the kernel dequantises what the reference gathers. Rope
    dims in the 64-column block after whole nope blocks (hd 72, rd 8: one rope tile, broadcast), and across a
    partial scale block (hd 48, rd 16: the masked activation tile)."""
    args = to_fp8(make_case("csa", REQUESTS, hd=72, rd=8, window=12, slack=1))
    want = ref.paged_sparse_attention(**args)
    for split in (False, True):
        got = tri.paged_sparse_attention(**args, config=dict(SMALL, split=split, block_n=16))
        assert rel_err(got.flatten(1), want.flatten(1)).max() <= 1e-5, split
    args = to_fp8(make_case("hca", REQUESTS[:3], hd=48, rd=16, window=12, slack=1))
    got = tri.paged_sparse_attention(**args, config=dict(SMALL, split=False, block_n=16))
    assert rel_err(got.flatten(1), ref.paged_sparse_attention(**args).flatten(1)).max() <= 1e-5


def test_attention_value_chunks():
    """block_d below the head dim: each program accumulates a slice of the value columns (its scores full
    width), the inverse rope landing in the last slice; plain and FP8 stores, split and not, bitwise the same
    rows either way."""
    args = make_case("csa", [(70, 1), (5, 6), (30, 2)], h=20, hd=64, rd=16, window=12, ratio=4, topk=9)
    want = ref.paged_sparse_attention(**args)
    cfg = dict(block_n=16, block_h=16, groups=3, min_group_blocks=1, block_d=32)
    got = [tri.paged_sparse_attention(**args, config=dict(cfg, split=s)) for s in (False, True)]
    assert torch.equal(got[0], got[1])
    assert rel_err(got[0].flatten(1), want.flatten(1)).max() <= 1e-5
    args = to_fp8(make_case("csa", [(50, 1), (7, 5)], hd=72, rd=8, window=12, slack=1))
    want = ref.paged_sparse_attention(**args)
    got = [tri.paged_sparse_attention(**args, config=dict(SMALL, split=s, block_n=16, block_d=64)) for s in (0, 1)]
    assert torch.equal(got[0], got[1])
    assert rel_err(got[0].flatten(1), want.flatten(1)).max() <= 1e-5


def test_attention_combine_chunks():
    """The split form's fold in column chunks of its own width (down to one rope pair), head blocks past the
    head count, a head dim that is no power of two, fp32 and bf16: bitwise (sign of zero too) the no-split rows."""
    cfg = dict(block_n=16, groups=3, min_group_blocks=1)
    for h, hd, rd, dtype, widths in ((20, 64, 16, torch.float32, (4, 16)), (6, 72, 8, torch.bfloat16, (2, 32))):
        args = make_case("csa", [(70, 1), (5, 6), (30, 2)], h=h, hd=hd, rd=rd, window=12, ratio=4, topk=9,
                         dtype=dtype)
        want = tri.paged_sparse_attention(**args, config=dict(cfg, split=False))
        view = torch.int32 if dtype == torch.float32 else torch.int16
        for comb in [dict(block_h=8, block_d=bd, num_warps=1) for bd in widths] + [dict(block_h=2, block_d=64)]:
            got = tri.paged_sparse_attention(**args, config=dict(cfg, split=True, combine=comb))
            assert torch.equal(got.view(view), want.view(view)), (h, hd, comb)
    with pytest.raises(ValueError):
        tri.paged_sparse_attention(**args, config=dict(cfg, split=True, combine=dict(block_d=24)))


@pytest.mark.parametrize("kind,dtype", [("csa", torch.float32), ("hca", torch.bfloat16)])
def test_attention_batch_invariant(kind, dtype):
    """One request's rows (a decode at a long context, a short extend) are bitwise the same alone, split or not,
    and in batches of other sizes and contexts (which change the pick width, the split decision and the grid)."""
    reqs = [(61, 1), (6, 3), (90, 1), (2, 2), (40, 6), (17, 1)]
    w = make_world(kind, reqs, window=12, slack=2, topk=9, dtype=dtype)
    cfg = dict(groups=3, min_group_blocks=1, block_n=16)
    for target in (0, 1):
        rows = slice(0, reqs[target][1])
        alone = tri.paged_sparse_attention(**batch_of(w, [target]), config=dict(cfg, split=False))
        assert torch.equal(tri.paged_sparse_attention(**batch_of(w, [target]), config=dict(cfg, split=True)), alone)
        for others, split in (([3], True), ([2, 5], False), ([4, 2, 3], True)):
            got = tri.paged_sparse_attention(**batch_of(w, [target] + others), config=dict(cfg, split=split))
            assert torch.equal(got[rows], alone[rows]), (target, others, split)


def test_attention_grid_order(monkeypatch):
    """Rows past the grid's axis-1 limit go on axis 0 (rows first): bitwise the rows of the heads-first grid,
    split and not."""
    args = make_case("csa", REQUESTS, h=20, hd=64, rd=16, window=12, ratio=4, topk=9)
    cfg = dict(block_n=16, groups=3, min_group_blocks=1)
    heads_first = [tri.paged_sparse_attention(**args, config=dict(cfg, split=s)) for s in (False, True)]
    monkeypatch.setattr(tri, "MAX_GRID_Y", 4)
    for split, want in zip((False, True), heads_first, strict=True):
        assert torch.equal(tri.paged_sparse_attention(**args, config=dict(cfg, split=split)), want)


def test_attention_large_pool_offsets():
    """Pool rows past 2^31 elements from the pool's base, int32 page table and picks: the kernel's offsets are
    int64 (the pool is a lazily committed 4.3 GB allocation; only the pages in use are written). Bitwise the
    same rows as the same data in a small pool."""
    args = make_case("csa", [(50, 1), (7, 5), (30, 9)], dtype=torch.bfloat16)
    want = tri.paged_sparse_attention(**args, config=dict(SMALL, block_n=16, split=False))
    comp, pt = args["comp"], args["page_table"]
    pages, ps, hd = comp.shape
    base = (1 << 31) // (ps * hd) + 7  # first page whose first element is past 2^31
    big = torch.empty(base + pages, ps, hd, dtype=comp.dtype, device=comp.device)
    big[base:] = comp
    far = dict(args, comp=big, page_table=(pt + base).int(), picks=args["picks"].int())
    for split in (False, True):
        got = tri.paged_sparse_attention(**far, config=dict(SMALL, block_n=16, split=split))
        assert torch.equal(got, want), split


@pytest.mark.parametrize("cfg", tri.CANDIDATES, ids=tri.config_name)
def test_attention_candidates_small(cfg):
    """Every configuration the benchmark may make a default (its block_d clipped to the small head dim), split
    and not: bitwise equal, and within 1e-5 of the reference."""
    args = make_case("csa", [(40, 1), (6, 3)], h=6, hd=32, rd=8, window=12, topk=6)
    want = ref.paged_sparse_attention(**args)
    got = [tri.paged_sparse_attention(**args, config=dict(cfg, split=s, groups=3)) for s in (False, True)]
    assert torch.equal(got[0], got[1])
    assert rel_err(got[0].flatten(1), want.flatten(1)).max() <= 1e-5


# --- the multi-query form (attention_mq_triton): extend and verify rows, one program per run of rows --------------

def rows_range(reqs: list[tuple[int, int]]) -> tuple[int, int]:
    return min(n for _, n in reqs), max(n for _, n in reqs)


# a fresh prefill longer than the window and crossing compression boundaries, a chunk after a long prefix, a
# decode and a 2-row request between them (groups of 4 rows straddle requests), one row more than 4 x 4
MQ_REQUESTS = [(50, 1), (7, 5), (0, 17), (3, 1), (30, 2), (61, 9)]


@pytest.mark.parametrize("kind", ["sliding", "hca", "csa"])
def test_mq_fp32(kind):
    """Mixed 1-row and multi-row requests (both kernels, each skipping the other's rows) and the multi-row
    requests alone (the multi-query kernel alone), rows per program 4 and 2 (neither divides every request)."""
    w = make_world(kind, MQ_REQUESTS, window=8, slack=2)
    for which, rows in ((range(len(MQ_REQUESTS)), 4), ([1, 2, 4, 5], 2)):
        args = batch_of(w, list(which))
        want = ref.paged_sparse_attention(**args)
        got = mq.paged_sparse_attention(**args, rows_per_request=rows_range([MQ_REQUESTS[i] for i in which]),
                                        config=dict(SMALL, block_n=16), mq_config=dict(rows=rows, block_n=16))
        assert rel_err(got.flatten(1), want.flatten(1)).max() <= 1e-5, (kind, rows)


def test_mq_fp8_and_value_chunks():
    """FP8 stores (rope in the block after whole nope blocks, and across a partial scale block), value columns
    in chunks, more heads than one block."""
    reqs = [(40, 3), (5, 6), (20, 1)]
    for kind, hd, rd in (("csa", 72, 8), ("hca", 48, 16)):
        args = to_fp8(make_case(kind, reqs, hd=hd, rd=rd, window=12, slack=1))
        want = ref.paged_sparse_attention(**args)
        for cfg in (dict(block_n=16), dict(block_n=16, block_d=64, rows=2, block_h=16), dict(csa_batched=True)):
            got = mq.paged_sparse_attention(**args, rows_per_request=(1, 6), config=dict(SMALL, block_n=16),
                                            mq_config=cfg)
            assert rel_err(got.flatten(1), want.flatten(1)).max() <= 1e-5, (kind, cfg)
    args = make_case("csa", [(70, 2), (5, 7)], h=20, hd=64, rd=16, window=12, topk=9)
    got = mq.paged_sparse_attention(**args, rows_per_request=(2, 7), mq_config=dict(block_n=16, block_d=32, rows=2))
    assert rel_err(got.flatten(1), ref.paged_sparse_attention(**args).flatten(1)).max() <= 1e-5


def test_mq_bf16():
    for kind in ("hca", "csa"):
        args = make_case(kind, MQ_REQUESTS, dtype=torch.bfloat16)
        want = ref.paged_sparse_attention(**args).float()
        got = mq.paged_sparse_attention(**args, rows_per_request=(1, 17), config=dict(SMALL, block_n=16),
                                        mq_config=dict(block_n=16)).float()
        assert not torch.isnan(got).any() and (got - want).norm() / want.norm() <= 1e-2, kind


@pytest.mark.parametrize("kind", ["hca", "csa"])
def test_mq_verify_batches(kind):
    """Verify-shaped batches: k + 1 in {2, 3, 4} rows for every request (4-row groups straddle the 3-row ones)."""
    for k1 in (2, 3, 4):
        reqs = [(p, k1) for p in (45, 9, 70, 3, 30)]
        args = make_case(kind, reqs, window=12, slack=k1, topk=6)
        want = ref.paged_sparse_attention(**args)
        for batched in (False, True) if kind == "csa" else (False,):
            got = mq.paged_sparse_attention(**args, rows_per_request=(k1, k1),
                                            mq_config=dict(block_n=16, csa_batched=batched))
            assert rel_err(got.flatten(1), want.flatten(1)).max() <= 1e-5, (kind, k1, batched)


@pytest.mark.parametrize("kind,dtype,batched", [("csa", torch.float32, False), ("csa", torch.float32, True),
                                                ("hca", torch.bfloat16, False)])
def test_mq_batch_invariant(kind, dtype, batched):
    """A request's rows are bitwise the same alone and in batches that put them at other offsets (other runs of
    the row groups) beside decodes and other extends; its decode neighbours are bitwise the single-row kernel's.
    CSA with the picks masked per row and batched."""
    reqs = [(61, 1), (6, 3), (90, 1), (2, 2), (40, 6), (17, 1)]
    w = make_world(kind, reqs, window=12, slack=2, topk=9, dtype=dtype)
    cfg, mq_cfg = dict(groups=3, min_group_blocks=1, block_n=16), dict(block_n=16, csa_batched=batched)

    def run(which):
        return mq.paged_sparse_attention(**batch_of(w, which), rows_per_request=rows_range([reqs[i] for i in which]),
                                         config=cfg, mq_config=mq_cfg)
    for target in (1, 4):
        n = reqs[target][1]
        alone = run([target])
        for others in ([3], [0, 2], [4 if target == 1 else 1, 0, 3], [5, 3]):
            assert torch.equal(run(others + [target])[-n:], alone), (target, others)
    decode = tri.paged_sparse_attention(**batch_of(w, [0]), config=cfg)
    assert torch.equal(run([0, 1, 3])[:1], decode)


@pytest.mark.parametrize("cfg", mq.CANDIDATES, ids=mq.config_name)
def test_mq_candidates_small(cfg):
    """Every multi-query configuration the benchmark may make the default (block_d clipped to the head dim)."""
    args = make_case("csa", [(40, 3), (6, 5)], h=6, hd=32, rd=8, window=12, topk=6)
    got = mq.paged_sparse_attention(**args, rows_per_request=(3, 5), mq_config=cfg)
    assert rel_err(got.flatten(1), ref.paged_sparse_attention(**args).flatten(1)).max() <= 1e-5


def test_mq_grid_order(monkeypatch):
    """Row groups past the grid's axis-1 limit go on axis 0: bitwise the rows of the heads-first grid."""
    args = make_case("hca", [(30, 9), (4, 1), (12, 6)], h=20, hd=64, rd=16, window=12)
    cfg = dict(block_n=16, block_h=16, block_d=32, rows=2)
    want = mq.paged_sparse_attention(**args, rows_per_request=(1, 9), mq_config=cfg)
    monkeypatch.setattr(tri, "MAX_GRID_Y", 3)
    assert torch.equal(mq.paged_sparse_attention(**args, rows_per_request=(1, 9), mq_config=cfg), want)


def test_mq_min_rows(monkeypatch):
    """MIN_ROWS 5: 4-row (verify-sized) requests stay on the single-row kernel, bitwise its rows, beside a
    decode and a 17-row extend on the multi-query kernel."""
    monkeypatch.setattr(mq, "MIN_ROWS", 5)
    reqs = [(50, 1), (9, 4), (0, 17), (30, 4)]
    w = make_world("csa", reqs, window=8, slack=2)
    args = batch_of(w, [0, 1, 2, 3])
    cfg = dict(SMALL, block_n=16)
    got = mq.paged_sparse_attention(**args, rows_per_request=(1, 17), config=cfg, mq_config=dict(block_n=16))
    assert rel_err(got.flatten(1), ref.paged_sparse_attention(**args).flatten(1)).max() <= 1e-5
    single = tri.paged_sparse_attention(**args, config=cfg)
    four = torch.cat((torch.arange(1, 5), torch.arange(22, 26)))
    assert torch.equal(got[four], single[four]) and torch.equal(got[:1], single[:1])
    assert not torch.equal(got[5:22], single[5:22])  # the extend did take the other form
