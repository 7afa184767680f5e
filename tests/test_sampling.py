"""ops/sampling.py against plain-loop references."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.ops.sampling import (
    compute_logprobs,
    counter_gumbel,
    filter_mask,
    greedy,
    make_generator,
    philox4x32,
    sample,
    sample_seeded,
)


def _loop_mask(row: torch.Tensor, k: int, p: float, mp: float) -> set[int]:
    """Kept token ids for one row, one token at a time (the spec in the sampler's docstring)."""
    v = row.numel()
    order = sorted(range(v), key=lambda i: (-row[i].item(), i))  # descending, lower id first on ties
    if 0 < k < v:
        order = order[:k]
    exp = [math.exp(row[i].item() - row[order[0]].item()) for i in order]
    z = sum(exp)
    probs = [e / z for e in exp]
    kept, mass = [], 0.0
    for i, pr in zip(order, probs, strict=True):
        if kept and mass >= p:
            break
        kept.append((i, pr))
        mass += pr
    return {i for i, pr in kept if pr >= mp * probs[0]} | {order[0]}


def test_greedy_ties_lowest_index() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0], [0.0, -1.0, 2.0, 2.0]])
    assert greedy(logits).tolist() == [1, 0, 2]
    big = torch.zeros(3, 70000)
    big[:, [40000, 12345, 69999]] = 7.0
    assert greedy(big).tolist() == [12345] * 3
    assert greedy(logits).dtype == torch.int64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filter_mask_matches_loop(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    r, v = 12, 40
    logits = torch.randn(r, v, generator=g) * 2
    logits[3, :10] = logits[3, 0]  # ties
    top_k = torch.tensor([-1, 0, 1, 5, 40, 100, 3, 7, -1, 10, 2, 0])
    top_p = torch.tensor([1.0, 0.5, 1.0, 0.9, 0.3, 1.0, 0.99, 0.1, 0.7, 0.8, 1.0, 1e-6])
    min_p = torch.tensor([0.0, 0.0, 0.5, 0.1, 0.0, 0.2, 0.0, 0.0, 0.05, 0.3, 1.0, 0.0])
    mask = filter_mask(logits, top_k, top_p, min_p)
    for i in range(r):
        want = _loop_mask(logits[i], int(top_k[i]), float(top_p[i]), float(min_p[i]))
        assert set(mask[i].nonzero().view(-1).tolist()) == want, i


def test_sampled_tokens_respect_filters() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 50, generator=g)
    top_k = torch.tensor([3, -1, 0, 10, 1, 5])
    top_p = torch.tensor([1.0, 0.4, 1.0, 0.6, 1.0, 0.9])
    min_p = torch.tensor([0.0, 0.0, 0.3, 0.1, 0.0, 0.0])
    temp = torch.tensor([1.0, 0.7, 1.3, 2.0, 1.0, 0.5])
    gens = [make_generator(100 + i, "cpu") for i in range(6)]
    for _ in range(30):
        toks = sample(logits, temp, top_k, top_p, min_p, gens)
        mask = filter_mask(logits / temp.view(-1, 1), top_k, top_p, min_p)
        assert mask.gather(1, toks.view(-1, 1)).all()


def _params(r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    temp = torch.linspace(0.5, 1.5, r)
    return temp, torch.full((r,), 20), torch.full((r,), 0.95), torch.full((r,), 0.01)


def test_seeded_rows_independent_of_batch() -> None:
    g = torch.Generator().manual_seed(0)
    v = 1000
    rows = torch.randn(5, v, generator=g)
    temp, k, p, mp = _params(5)

    def run(order: list[int], steps: int = 4) -> dict[int, list[int]]:
        gens = [make_generator(1000 + i, "cpu") for i in order]
        out: dict[int, list[int]] = {i: [] for i in order}
        for _ in range(steps):
            toks = sample(rows[order], temp[order], k[order], p[order], mp[order], gens)
            for j, i in enumerate(order):
                out[i].append(int(toks[j]))
        return out

    full = run([0, 1, 2, 3, 4])
    assert run([4, 2, 0, 3, 1]) == full
    for i in range(5):
        assert run([i])[i] == full[i]
    assert run([3, 1])[3] == full[3]


def test_greedy_rows_mixed_with_sampled() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 300, generator=g)
    logits[0, [7, 9]] = 10.0  # tie in a greedy row
    temp = torch.tensor([0.0, 1.0, 0.0, 0.8])
    k, p, mp = torch.tensor([5, -1, 1, 0]), torch.tensor([0.5, 1.0, 0.2, 0.9]), torch.zeros(4)
    gens = [make_generator(i, "cpu") for i in range(4)]
    out = sample(logits, temp, k, p, mp, gens)
    assert out.dtype == torch.int64 and out.shape == (4,)
    assert out[0] == 7 and out[2] == greedy(logits[2:3])[0]
    # The sampled rows draw the same tokens as when sampled alone.
    alone = sample(logits[[1, 3]], temp[[1, 3]], k[[1, 3]], p[[1, 3]], mp[[1, 3]],
                   [make_generator(1, "cpu"), make_generator(3, "cpu")])
    assert out[[1, 3]].tolist() == alone.tolist()


def test_unseeded_rows_use_default_stream() -> None:
    logits = torch.zeros(3, 10)
    torch.manual_seed(0)
    a = sample(logits, torch.ones(3), torch.zeros(3, dtype=torch.int64), torch.ones(3), torch.zeros(3), [None] * 3)
    torch.manual_seed(0)
    b = sample(logits, torch.ones(3), torch.zeros(3, dtype=torch.int64), torch.ones(3), torch.zeros(3), [None] * 3)
    assert a.tolist() == b.tolist()


def test_distribution_matches_softmax() -> None:
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    n = 4000
    logits = probs.log().expand(n, -1).contiguous()
    ones = torch.ones(n)
    torch.manual_seed(123)
    toks = sample(logits, ones, torch.zeros(n, dtype=torch.int64), ones, torch.zeros(n), [None] * n)
    freq = torch.bincount(toks, minlength=5).float() / n
    # 4 sigma of a binomial proportion at n=4000 is at most 0.032.
    assert (freq - probs).abs().max() < 0.032, freq
    # Temperature 2 flattens: p^(1/2) renormalised.
    toks = sample(logits, ones * 2, torch.zeros(n, dtype=torch.int64), ones, torch.zeros(n), [None] * n)
    want = probs.sqrt() / probs.sqrt().sum()
    assert ((torch.bincount(toks, minlength=5).float() / n) - want).abs().max() < 0.032
    # top-p 0.7 keeps {0, 1} (mass 0.75), renormalised to 2/3, 1/3.
    toks = sample(logits, ones, torch.zeros(n, dtype=torch.int64), ones * 0.7, torch.zeros(n), [None] * n)
    freq = torch.bincount(toks, minlength=5).float() / n
    assert freq[2:].sum() == 0 and abs(freq[0] - 2 / 3) < 0.032


def test_compute_logprobs() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 50, generator=g)
    ids = torch.tensor([4, 0, 49])
    tok, top_ids, top_lp = compute_logprobs(logits, ids, 5)
    ref = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(tok, ref[torch.arange(3), ids])
    assert top_ids.shape == (3, 5) and top_lp.shape == (3, 5)
    torch.testing.assert_close(top_lp, ref.gather(1, top_ids))
    assert (top_lp[:, :-1] >= top_lp[:, 1:]).all()
    assert top_ids[:, 0].tolist() == greedy(logits).tolist()
    tok0, ids0, lp0 = compute_logprobs(logits, ids, 0)
    torch.testing.assert_close(tok0, tok)
    assert ids0.shape == (3, 0) and lp0.shape == (3, 0)


def test_generator_count_checked() -> None:
    with pytest.raises(ValueError, match="generators"):
        sample(torch.zeros(2, 4), torch.ones(2), torch.zeros(2), torch.ones(2), torch.zeros(2), [None])


# ---- counter-based noise (the reference of the CUDA kernels) ----------------------------------------------------


def test_philox_known_answers() -> None:
    """Philox-4x32-10 test vectors of Random123 (kat_vectors)."""
    def run(ctr: list[int], key: list[int]) -> list[int]:
        out = philox4x32([torch.tensor([c]) for c in ctr], torch.tensor([key[0]]), torch.tensor([key[1]]))
        return [int(o) for o in out]

    assert run([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert run([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert run([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_counter_gumbel_is_a_function_of_seed_and_step() -> None:
    seeds = torch.tensor([7, 7, 8, -5, 2**62 + 1])
    steps = torch.tensor([0, 1, 0, 3, 2**33])
    g = counter_gumbel(seeds, steps, 3000)
    assert g.shape == (5, 3000) and g.dtype == torch.float32 and torch.isfinite(g).all()
    assert torch.equal(g[[4, 0]], counter_gumbel(seeds[[4, 0]], steps[[4, 0]], 3000))  # any batch, any row
    assert torch.equal(g[:, :1000], counter_gumbel(seeds, steps, 1000))  # token i's noise ignores V
    for a in range(5):
        for b in range(a):
            assert (g[a] == g[b]).float().mean() < 0.01
    # Gumbel(0, 1): mean = Euler's gamma, variance pi^2 / 6 (15000 draws: 5-sigma bounds)
    assert abs(g.double().mean() - 0.5772) < 5 * 1.28 / 15000**0.5
    assert abs(g.double().var() - math.pi**2 / 6) < 0.15


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    return float(((counts - n * probs) ** 2 / (n * probs)).sum())


def test_seeded_draws_follow_the_filtered_distribution() -> None:
    """Chi-square goodness of fit of 4000 fixed-seed draws (each a request's own seed, steps 0..3) against the
    top-k / top-p / min-p filtered, renormalised distribution, at the 1 - 1e-4 quantile: a correct sampler fails
    with probability < 1e-4 (the seeds are fixed, so it passes or fails for good); the kept set is never left."""
    gen = torch.Generator().manual_seed(11)
    v, n = 40, 4000
    row = torch.randn(v, generator=gen) * 1.5
    cases = [(1.0, 0, 1.0, 0.0), (0.7, 8, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 20, 0.9, 0.05)]
    for t, k, p, mp in cases:
        keep = filter_mask((row / t).view(1, v), torch.tensor([k]), torch.tensor([p]), torch.tensor([mp]))[0]
        probs = torch.softmax((row / t).masked_fill(~keep, float("-inf")).double(), dim=0)
        ones = torch.ones(n)
        toks = sample_seeded(row.expand(n, v), ones * t, torch.full((n,), k), ones * p, ones * mp,
                             torch.arange(n) * 7919 + 1, torch.arange(n) % 4)
        counts = torch.bincount(toks, minlength=v).double()
        assert counts[~keep].sum() == 0
        # pool the tokens of expected count < 50 into one cell, as chi-square wants
        big = (probs * n >= 50) & keep
        obs = torch.cat([counts[big], counts[keep & ~big].sum().view(1)])
        exp = torch.cat([probs[big], probs[keep & ~big].sum().view(1)])
        obs, exp = obs[exp > 0], exp[exp > 0]
        df = len(obs) - 1
        # Wilson-Hilferty: the 1 - 1e-4 quantile of chi-square(df)
        q = df * (1 - 2 / (9 * df) + 3.719 * (2 / (9 * df)) ** 0.5) ** 3
        assert _chi2(obs, exp) < q, (t, k, p, mp, _chi2(obs, exp), q)


def test_sample_seeded_rows_independent_of_batch() -> None:
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(5, 1000, generator=g)
    temp, k, p, mp = _params(5)
    seeds, steps = torch.tensor([1, 2, 3, 4, 2**63 - 1]), torch.tensor([0, 5, 9, 2**32, 1])
    full = sample_seeded(rows, temp, k, p, mp, seeds, steps)
    perm = [4, 2, 0, 3, 1]
    assert torch.equal(sample_seeded(rows[perm], temp[perm], k[perm], p[perm], mp[perm], seeds[perm], steps[perm]),
                       full[perm])
    assert sample_seeded(rows[3:4], temp[3:4], k[3:4], p[3:4], mp[3:4], seeds[3:4], steps[3:4]) == full[3]
    # another step draws other noise: over 30 steps a top-20 row does not repeat one token
    many = sample_seeded(rows[:1].expand(30, -1), temp[:1].expand(30), k[:1].expand(30), p[:1].expand(30),
                         mp[:1].expand(30), seeds[:1].expand(30), torch.arange(30))
    assert len(set(many.tolist())) > 3
