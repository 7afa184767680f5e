"""The sort-free sampling kernels against their references at V4-Flash vocab (129280), batch 1..512, on the GPU
(skipped without CUDA): kept sets equal ``filter_mask`` bit for bit, tokens equal ``sample_seeded`` bit for bit
(both take the logs of the noise in fp64 and libdevice's exp/log on the GPU), a CUDA graph of ``sample`` replays
to the eager tokens, and the draws follow the filtered distribution (chi-square at the 1 - 1e-4 quantile).

Run: ``pytest -q tests/gpu/test_sampling_gpu.py`` (about a minute, most of it the references' sorts).
"""

from __future__ import annotations

import pytest
import torch

from dsv4.ops import sampling as ref
from dsv4.ops import sampling_triton as tri

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
VOCAB = 129280
BATCHES = (1, 2, 8, 64, 512)


def _case(r: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(logits, temperature, top_k, top_p, min_p, seeds, steps) on the GPU; the first rows are fixed cases (ties,
    a tie at the top-p cut, -inf entries, huge and tiny temperatures, top_k 1, tiny top_p, min-p, a NaN row, a
    +inf row, greedy rows), the rest random."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(r, VOCAB, device="cuda", generator=g) * 3
    t = torch.rand(r, device="cuda", generator=g) + 0.3
    k = torch.randint(-1, 300, (r,), device="cuda", generator=g)
    k[::3] = 0
    p = torch.rand(r, device="cuda", generator=g) * 0.6 + 0.4
    p[::4] = 1.0
    mp = torch.rand(r, device="cuda", generator=g) * 0.1
    mp[::2] = 0.0
    t[::7] = 0.0  # greedy rows
    def ramp(row: torch.Tensor) -> None:
        row.copy_(torch.randint(0, 8, (VOCAB,), device="cuda", generator=g).float())  # 8 values: huge ties

    fixed = [  # (edit of the row or None, temperature, top_k, top_p, min_p), None keeps the random value
        (ramp, 1.0, 5000, None, None),
        (lambda row: row[100:110].fill_(row.max() + 30), 1.0, None, 0.35, None),  # top-p cut inside a tie
        (lambda row: row[::2].fill_(float("-inf")), None, VOCAB // 2 + 100, 1.0, 0.0),  # top-k past the finite
        (None, 1e4, None, None, None),
        (None, 1e-3, None, None, None),
        (None, 0.9, 1, None, None),
        (None, 0.9, None, 1e-7, None),
        (None, 1.1, VOCAB + 5, None, 0.2),
        (lambda row: row[77:78].fill_(float("nan")), 1.0, None, None, None),
        (lambda row: row[5:6].fill_(float("inf")), 1.0, None, None, None),
    ]
    for i, (edit, *params) in enumerate(fixed[:r]):
        if edit is not None:
            edit(x[i])
        for tensor, value in zip((t, k, p, mp), params, strict=True):
            if value is not None:
                tensor[i] = value
    seeds = torch.randint(-2**63, 2**63 - 1, (r,), device="cuda", generator=g)
    steps = torch.randint(0, 2**40, (r,), device="cuda", generator=g)
    return x, t, k, p, mp, seeds, steps


@pytest.mark.parametrize("r", BATCHES)
def test_kept_set_flash(r):
    x, t, k, p, mp, _, _ = _case(r, 10 + r)
    got = tri.kept_mask(x, t, k, p, mp)
    scaled = x / torch.where(t == 0, 1.0, t).view(-1, 1)
    want = ref.filter_mask(scaled, k, p, mp)
    rows = (t > 0) & ~torch.isnan(scaled).any(dim=1) & torch.isfinite(scaled.amax(dim=1))  # rows with a kept set
    diff = ((got != want) & rows.view(-1, 1)).sum(dim=1)
    assert diff.sum() == 0, diff.nonzero().view(-1).tolist()


@pytest.mark.parametrize("r", BATCHES)
def test_sample_flash_equals_seeded_reference(r):
    x, t, k, p, mp, seeds, steps = _case(r, 20 + r)
    want = ref.sample_seeded(x, t, k, p, mp, seeds, steps)
    got = tri.sample(x, t, k, p, mp, seeds, steps)
    assert torch.equal(got, want), (got != want).nonzero().view(-1).tolist()
    out = torch.empty(r, dtype=torch.int32, device="cuda")
    tri.sample(x, t, k, p, mp, seeds, steps, out)
    assert torch.equal(out.long(), want)
    if r >= 8:  # the same requests in another order and another batch draw the same tokens
        perm = torch.randperm(r, device="cuda")[: r // 2]
        assert torch.equal(tri.sample(x[perm], t[perm], k[perm], p[perm], mp[perm], seeds[perm], steps[perm]),
                           want[perm])


@pytest.mark.parametrize("r", [1, 64, 512])
def test_sample_cuda_graph(r):
    x, t, k, p, mp, seeds, steps = _case(r, 30 + r)
    out = torch.empty(r, dtype=torch.int64, device="cuda")
    tri.sample(x, t, k, p, mp, seeds, steps, out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tri.sample(x, t, k, p, mp, seeds, steps, out)
    for i in range(3):
        new = _case(r, 40 + 10 * r + i)
        for dst, src in zip((x, t, k, p, mp, seeds, steps), new, strict=True):
            dst.copy_(src)
        graph.replay()
        eager = tri.sample(x, t, k, p, mp, seeds, steps)
        assert torch.equal(out, eager)
        assert torch.equal(out, ref.sample_seeded(x, t, k, p, mp, seeds, steps))


def test_sample_flash_statistics():
    """8 graph-free calls of 512 requests (own seeds, steps 0..7) on one peaked row: the draws fit the filtered
    distribution (chi-square, tokens of expected count < 50 pooled) and never leave the kept set."""
    n, calls = 512, 8
    g = torch.Generator(device="cuda").manual_seed(5)
    row = torch.randn(VOCAB, device="cuda", generator=g) * 2
    row[:30] += 12  # most of the mass on a few dozen tokens, a long tail
    for t, k, p, mp in [(1.0, 0, 0.95, 0.0), (0.8, 20, 1.0, 0.0), (1.2, 100, 0.9, 0.01)]:
        ones = torch.ones(n, device="cuda")
        args = (row.expand(n, VOCAB), ones * t, torch.full((n,), k, device="cuda"), ones * p, ones * mp)
        seeds = torch.arange(n, device="cuda") * 104729 + 17
        toks = torch.cat([tri.sample(*args, seeds, torch.full((n,), s, device="cuda")) for s in range(calls)])
        keep = ref.filter_mask((row / t).view(1, -1), args[2][:1], args[3][:1], args[4][:1])[0]
        probs = torch.softmax((row / t).masked_fill(~keep, float("-inf")).double(), dim=0)
        counts = torch.bincount(toks, minlength=VOCAB).double()
        assert counts[~keep].sum() == 0
        total = n * calls
        big = (probs * total >= 50) & keep
        obs = torch.cat([counts[big], counts[keep & ~big].sum().view(1)])
        exp = torch.cat([probs[big], probs[keep & ~big].sum().view(1)])
        obs, exp = obs[exp > 0], exp[exp > 0]
        df = len(obs) - 1
        chi2 = float(((obs - total * exp) ** 2 / (total * exp)).sum())
        q = df * (1 - 2 / (9 * df) + 3.719 * (2 / (9 * df)) ** 0.5) ** 3  # Wilson-Hilferty, 1 - 1e-4
        print(f"sample stats T={t} k={k} p={p} min_p={mp}: chi2 {chi2:.1f} (df {df}, limit {q:.1f})")
        assert chi2 < q
