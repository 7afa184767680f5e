"""Sampling kernels against dsv4.ops.sampling (fresh random inputs each run): token ids bit-exact."""

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


def test_sample_equals_reference_with_the_same_generators():
    r, v = 6, 3000
    x = torch.randn(r, v, device=DEV) * 2
    x[2, :5] = x[2].max() + 1  # tied top tokens
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.3, 0.0, 1.0], device=DEV)
    top_k = torch.tensor([0, 50, 0, 5, 3, -1], device=DEV)
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0, 1.0, 0.95], device=DEV)
    min_p = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.0, 0.05], device=DEV)
    seeds = [None, 11, 12, None, 13, 14]
    for _ in range(3):
        gens = [[None if s is None else ref.make_generator(s, DEV) for s in seeds] for _ in range(2)]
        torch.manual_seed(5)
        want = ref.sample(x, temperature, top_k, top_p, min_p, gens[0])
        torch.manual_seed(5)
        got = tri.sample(x, temperature, top_k, top_p, min_p, gens[1])
        assert torch.equal(got, want)
        x = torch.randn(r, v, device=DEV)
