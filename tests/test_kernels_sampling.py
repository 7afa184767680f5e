"""Sampling kernels against dsv4.ops.sampling (fresh random inputs each run): token ids and kept sets bit-exact.

The interpreter runs one program at a time and pays for every op, so the sample cases are few rows of a small
vocabulary, each row a different case; tests/gpu/test_sampling_gpu.py runs the same equalities at V = 129280.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dsv4.ops import sampling as ref  # noqa: E402
from dsv4.ops import sampling_triton as tri  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _logits(r: int, v: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random rows plus deliberate cases: exact ties in different chunks, all-negative rows, a row of -inf
    but one, all -inf, a NaN row, a single NaN, +inf ties, ties on the last id."""
    x = torch.randn(r, v) * 3 - 1
    cases = [
        lambda x: x.fill_(2.5),  # every id tied: 0
        lambda x: x.copy_(-torch.rand(v) - 5),  # all negative
        lambda x: x.index_fill_(0, torch.tensor([v - 1, v // 2, 7]), 50.0),  # tie across chunks: 7
        lambda x: x.fill_(float("-inf")).index_fill_(0, torch.tensor([v - 2]), -3.0),
        lambda x: x.fill_(float("-inf")),  # all -inf: 0
        lambda x: x.fill_(float("nan")),  # V-1
        lambda x: x.index_fill_(0, torch.tensor([v // 3]), float("nan")),  # one NaN: V-1
        lambda x: x.index_fill_(0, torch.tensor([v - 3, 5]), float("inf")),  # +inf tie: 5
        lambda x: x.index_fill_(0, torch.tensor([v - 1]), 80.0),  # the last id
        lambda x: x.index_fill_(0, torch.tensor([v - 2, v - 1]), 80.0),
    ]
    for i, case in enumerate(cases[:r]):
        case(x[i])
    return x.to(DEV, dtype)


@pytest.mark.parametrize("r,v", [(1, 5000), (3, 9), (12, 3000), (12, 20000), (40, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_equals_reference(r, v, dtype):
    x = _logits(r, v, dtype)
    want = ref.greedy(x)
    got = tri.greedy(x)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    out = torch.full((r,), -7, dtype=torch.int32, device=DEV)
    assert tri.greedy(x, out) is out and torch.equal(out.long(), want)
    assert torch.equal(ref.greedy(x, torch.empty_like(out)).long(), want)


@pytest.mark.parametrize("target", [1, 4, 64])
def test_greedy_chunking(monkeypatch, target):
    """Small tiles and few programs, so chunks span many tiles: whole rows per program (target 1), rows split
    in two with several tiles per chunk (4), one tile per chunk (64); every path gives the same ids."""
    monkeypatch.setattr(tri, "_BLOCK", 64)
    monkeypatch.setattr(tri, "_TARGET_PROGRAMS", target)
    x = _logits(10, 1000)
    x[0, 0] = x[0, 130] = 9.0  # the same maximum in tiles 0 and 2 of row 0
    assert torch.equal(tri.greedy(x), ref.greedy(x))
    assert torch.equal(tri.greedy(x[3:4]), ref.greedy(x[3:4]))


def test_greedy_noncontiguous_rows():
    x = _logits(6, 4000)[:, :3001]
    assert torch.equal(tri.greedy(x), ref.greedy(x))


def filter_case(v: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """8 rows, each a filter case: (logits [8, V], temperature, top_k, top_p, min_p) on CPU.

    Rows: plain top-p; top-k cut inside a block of tied values; top-p cut inside a tie (10 tokens share the max,
    top_p 0.35 keeps 4 of them, the rest weigh < 1e-5); -inf entries with top-k beyond the finite ones; huge temperature; tiny
    temperature (finite); top_k=1 with top_p tiny; min-p with top-k larger than V.
    """
    x = torch.randn(8, v, generator=gen) * 3
    x[1] = torch.randint(0, 6, (v,), generator=gen).float()  # big tie blocks
    x[2, torch.randperm(v, generator=gen)[:10]] = x[2].max() + 20.0
    x[3, torch.randperm(v, generator=gen)[: v // 2]] = float("-inf")
    x[5] = x[5] * 0.01
    temperature = torch.tensor([0.8, 1.0, 1.0, 1.0, 1e4, 1e-3, 0.7, 1.3])
    top_k = torch.tensor([0, 7 + v // 6, 0, v // 2 + 5, 40, 0, 1, v + 10])
    top_p = torch.tensor([0.9, 0.6, 0.35, 1.0, 0.5, 0.99, 1e-6, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3])
    return x, temperature, top_k, top_p, min_p


def _dev(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEV) for t in ts]


@pytest.mark.parametrize("guide", [0, 1, 2])
def test_kept_set_equals_filter_mask(monkeypatch, guide):
    """The kernels' thresholds give filter_mask's kept set bit for bit, with each top-p search path: the fp32 guide
    checked in fp64 (0), the fp64 guide (1), no guide so the fp64 search after the check always runs (2)."""
    monkeypatch.setattr(tri, "_GUIDE", guide)
    if guide:  # one tile per pass, many pivots: fewer interpreted ops
        monkeypatch.setattr(tri, "_FILTER_BLOCK", 4096)
        monkeypatch.setattr(tri, "_NP", 64)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    x, t, k, p, mp = _dev(*filter_case(3000, gen))
    got = tri.kept_mask(x, t, k, p, mp)
    want = ref.filter_mask(x / t.view(-1, 1), k, p, mp)
    assert torch.equal(got, want), (got != want).sum(dim=1)
    assert got[2].sum() == 4 and got[6].sum() == 1  # the tie cut and top_k=1


def test_kept_set_small_pivots(monkeypatch):
    """Two pivots per pass and 256-token tiles: many passes, many tiles, the same kept sets."""
    monkeypatch.setattr(tri, "_FILTER_BLOCK", 256)
    monkeypatch.setattr(tri, "_NP", 2)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    x, t, k, p, mp = (a[[1, 2, 7]] for a in filter_case(1000, gen))
    x, t, k, p, mp = _dev(x, t, k, p, mp)
    assert torch.equal(tri.kept_mask(x, t, k, p, mp), ref.filter_mask(x / t.view(-1, 1), k, p, mp))


def test_sample_equals_seeded_reference(monkeypatch):
    """Tokens equal sample_seeded's: sampled rows of every filter case, greedy rows (with a tie), a NaN row, a +inf
    row, an all -inf row; 64-bit seeds and steps; into an int32 buffer too."""
    monkeypatch.setattr(tri, "_FILTER_BLOCK", 4096)
    monkeypatch.setattr(tri, "_NP", 64)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    v = 2500
    x, t, k, p, mp = filter_case(v, gen)
    extra = torch.randn(4, v, generator=gen)
    extra[0, [3, 700]] = 9.0  # greedy tie: 3
    extra[1, 11] = float("nan")
    extra[2, 5] = float("inf")
    extra[3] = float("-inf")
    x = torch.cat([x, extra])
    t = torch.cat([t, torch.tensor([0.0, 1.0, 1.0, 1.0])])
    k, p, mp = torch.cat([k, torch.zeros(4, dtype=k.dtype)]), torch.cat([p, torch.ones(4)]), torch.cat([mp, torch.zeros(4)])
    seeds = torch.randint(-2**63, 2**63 - 1, (12,), generator=gen)
    steps = torch.randint(0, 2**40, (12,), generator=gen)
    steps[:3] = torch.tensor([0, 1, 2])
    x, t, k, p, mp, seeds, steps = _dev(x, t, k, p, mp, seeds, steps)
    want = ref.sample_seeded(x, t, k, p, mp, seeds, steps)
    assert want[8] == 3 and (want[9:] == v - 1).all()
    got = tri.sample(x, t, k, p, mp, seeds, steps)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    out = torch.full((12,), -1, dtype=torch.int32, device=DEV)
    rows = [0, 2, 8, 9]
    assert tri.sample(x[rows], t[rows], k[rows], p[rows], mp[rows], seeds[rows], steps[rows], out[:4]) is not None
    assert torch.equal(out[:4].long(), want[rows])  # and the same tokens in another batch


def test_sample_chunked_rows(monkeypatch):
    """Rows split over several programs (the small-batch path) and one program per row give the same tokens."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    x, t, k, p, mp = _dev(*(a[[0, 3]] for a in filter_case(3000, gen)))
    seeds, steps = _dev(torch.tensor([5, 2**40 + 3]), torch.tensor([7, 0]))
    want = ref.sample_seeded(x, t, k, p, mp, seeds, steps)
    monkeypatch.setattr(tri, "_FILTER_BLOCK", 4096)
    monkeypatch.setattr(tri, "_NP", 64)
    monkeypatch.setattr(tri, "_TARGET_PROGRAMS", 1)
    assert torch.equal(tri.sample(x, t, k, p, mp, seeds, steps), want)
    monkeypatch.setattr(tri, "_TARGET_PROGRAMS", 6)  # 3 chunks of 1024 per row
    assert torch.equal(tri.sample(x, t, k, p, mp, seeds, steps), want)
