"""ops/sampling.py against plain-loop references."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.ops.sampling import compute_logprobs, filter_mask, greedy, make_generator, sample


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
