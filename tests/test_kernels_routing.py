"""MoE routing kernels against dsv4.ops.moe (fresh random inputs each run): ids bit-exact, weights fp32 <= 1e-5."""

from __future__ import annotations

import pytest
import torch
from harness import rel_err

pytest.importorskip("triton")

from dsv4.ops import moe as ref  # noqa: E402
from dsv4.ops import routing_triton as tri  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_reference_ties_go_to_the_lower_expert():
    # every score equal: the picks are experts 0..k-1 in order, whatever torch.topk would have said
    s = torch.ones(3, 16)
    w, ids = ref.route(s, 4, None, None, 1.5)
    assert ids.tolist() == [[0, 1, 2, 3]] * 3
    assert torch.equal(w, torch.full((3, 4), 1.5 / 4))
    # a tie straddling the cut: of experts 5, 9 and 12 (equal), 5 and 9 make the top 3 after expert 2
    s = torch.zeros(1, 16)
    s[0, [2, 5, 9, 12]] = torch.tensor([3.0, 1.0, 1.0, 1.0])
    assert ref.route(s, 3, None, None, 1.0)[1].tolist() == [[2, 5, 9]]


def _logits(n: int, e: int) -> torch.Tensor:
    """Router-like logits with deliberate exact ties (duplicated columns and rows) and negative values."""
    x = torch.randn(n, e) * 2
    x[:, 3] = x[:, 1]  # tie between experts 1 and 3 in every row
    if n >= 4:
        x[0] = 0.5  # a row of ties
        x[1, : e // 2] = x[1, e // 2 :]
        x[2] = -torch.rand(e) * 30  # very negative: softplus in its exp tail
        x[3, :4] = 25.0  # above softplus' threshold, tied
    return x.to(DEV)


@pytest.mark.parametrize("scoring", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("n,e,k", [(37, 64, 6), (5, 24, 3), (1, 256, 6)])
def test_route_scored(scoring, n, e, k):
    logits = _logits(n, e)
    for bias in (None, (torch.randn(e) * 0.1).to(DEV), torch.zeros(e, device=DEV)):
        w_ref, ids_ref = ref.route_scored(logits, bias, k, scoring, 1.5)
        w, ids = tri.route_scored(logits, bias, k, scoring, 1.5)
        assert ids.dtype == torch.int64 and torch.equal(ids, ids_ref)
        assert rel_err(w, w_ref).max() <= 1e-5


def test_route_scored_bias_ties():
    # equal logits and equal bias on experts 1, 3 and 6: score + bias ties exactly, the lower index goes first;
    # the tie sits at the top (rows 0-3) or straddles the cut of the top 2 (rows 4-7)
    e = 32
    logits = torch.randn(8, e, device=DEV)
    bias = torch.randn(e, device=DEV) * 0.1
    bias[[3, 6]] = bias[1].item()
    logits[:, 3] = logits[:, 6] = logits[:, 1] = 10.0
    logits[4:, 0] = 20.0
    for k in (2, 6):
        w_ref, ids_ref = ref.route_scored(logits, bias, k, "sqrtsoftplus", 2.5)
        w, ids = tri.route_scored(logits, bias, k, "sqrtsoftplus", 2.5)
        assert ids[0, :3].tolist() == [1, 3, 6][:k] and ids[4, :2].tolist() == [0, 1]
        assert torch.equal(ids, ids_ref) and rel_err(w, w_ref).max() <= 1e-5


@pytest.mark.parametrize("scoring", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("n,d,e,k,dtype", [(23, 96, 16, 6, torch.float32), (4, 1100, 64, 3, torch.bfloat16)])
def test_route_hash(scoring, n, d, e, k, dtype):
    vocab = 50
    x = torch.randn(n, d, device=DEV).to(dtype)
    weight = torch.randn(e, d, device=DEV) / d**0.5
    tid2eid = torch.stack([torch.randperm(e)[:k] for _ in range(vocab)]).to(DEV)
    input_ids = torch.randint(0, vocab, (n,), device=DEV)
    input_ids[1] = input_ids[0]  # the same token twice
    w_ref, ids_ref = ref.route_hash(x, weight, input_ids, tid2eid, scoring, 1.5)
    w, ids = tri.route_hash(x, weight, input_ids, tid2eid, scoring, 1.5)
    assert ids.dtype == torch.int64 and torch.equal(ids, ids_ref)
    assert rel_err(w, w_ref).max() <= 1e-5


def test_gate_uses_the_kernels():
    from oracle import tiny_config

    from dsv4.model.moe import Gate

    cfg = tiny_config()
    x = torch.randn(9, cfg.hidden_size, device=DEV)
    ids_in = torch.randint(0, cfg.vocab_size, (9,), device=DEV)
    for is_hash in (False, True):
        gates = [Gate(cfg, is_hash, ops).to(DEV) for ops in ("ref", "triton")]
        torch.manual_seed(0)
        for p in gates[0].parameters():
            p.copy_(torch.randn_like(p))
        if is_hash:
            gates[0].tid2eid.copy_(torch.stack([torch.randperm(cfg.n_routed_experts)[: cfg.num_experts_per_tok]
                                                for _ in range(cfg.vocab_size)]).to(DEV))
        gates[1].load_state_dict(gates[0].state_dict())
        (w_ref, ids_ref), (w, ids) = (g(x, ids_in) for g in gates)
        assert torch.equal(ids, ids_ref) and rel_err(w, w_ref).max() <= 1e-5
