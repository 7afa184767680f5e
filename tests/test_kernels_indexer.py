"""The indexer kernels against dsv4.ops.indexer (fresh inputs each run), and the batched reference against
the one-request form it replaced.

Picks are compared exactly (the same entries in the same order). Inputs with small integer values make every
score exact in any summation order and full of ties, so exact equality also pins the tie rule (lowest index);
with random real inputs the scores are compared by relative error and the picks by score.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dsv4.model.layers import gather_entries  # noqa: E402
from dsv4.ops import indexer as ref  # noqa: E402
from dsv4.ops import indexer_triton as tri  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(requests: list[tuple[int, int]], n_heads: int = 4, head_dim: int = 32, ratio: int = 4,
              topk: int = 6, page_size: int = 4, dtype: torch.dtype = torch.float32, integer: bool = False,
              device: str = DEV) -> dict:
    """A batch of (prefix_len, extend_len) requests over a random key pool; returns indexer_topk's arguments.

    ``integer``: q, keys and weights are small integers (exact scores, many ties, zeros and negative weights).
    """
    r = len(requests)
    slots = r + 2
    max_entries = max(p + n for p, n in requests) // ratio
    per_slot = -(-max(1, max_entries) // page_size) + 1
    pages = slots * per_slot + 1
    t = sum(n for _, n in requests)

    def rnd(*shape: int) -> torch.Tensor:
        x = torch.randint(-2, 3, shape, device=device).float() if integer else torch.randn(*shape, device=device)
        return x.to(dtype)

    return dict(
        q=rnd(t, n_heads, head_dim), weights=rnd(t, n_heads), keys=rnd(pages, page_size, head_dim),
        page_table=(torch.randperm(pages - 1, device=device)[: slots * per_slot] + 1).view(slots, per_slot),
        slots=torch.randperm(slots, device=device)[:r],
        extend_lens=torch.tensor([n for _, n in requests], device=device),
        positions=torch.cat([torch.arange(p, p + n, device=device) for p, n in requests]),
        ratio=ratio, topk=topk, max_entries=max_entries,
    )


def old_loop(a: dict) -> list[set[int]]:
    """The per-request loop Indexer.forward ran before the batched op, as sets of picks per row."""
    out, s = [], 0
    for slot, n in zip(a["slots"].tolist(), a["extend_lens"].tolist(), strict=True):
        pos = a["positions"][s : s + n]
        count = (int(pos[-1]) + 1) // a["ratio"]
        keys = gather_entries(a["keys"], a["page_table"][slot], count)
        scores = ref.indexer_scores(a["q"][s : s + n], a["weights"][s : s + n], keys)
        picks = ref.topk_indices(scores, (pos + 1) // a["ratio"], a["topk"])
        out += [set(row) - {-1} for row in picks.tolist()] if count else [set() for _ in range(n)]
        s += n
    return out


DECODE = [(53, 1), (9, 1), (2, 1), (130, 1), (24, 1)]
EXTEND = [(0, 23), (13, 18), (3, 1), (40, 7)]  # from 0, after unaligned prefixes, a decode row among them


def verify(next_n: int) -> list[tuple[int, int]]:
    return [(p, next_n) for p in (61, 6, 2, 90)]


CASES = {"decode": DECODE, "extend": EXTEND, "verify1": verify(1), "verify2": verify(2), "verify4": verify(4)}


@pytest.mark.parametrize("name", list(CASES))
def test_indexer_topk_exact(name):
    """Integer inputs: the kernel's picks equal the reference's, entry for entry, ties included."""
    a = make_case(CASES[name], integer=True)
    want = ref.indexer_topk(**a)
    got = tri.indexer_topk(**a)
    assert got.shape == want.shape == (a["q"].shape[0], min(a["topk"], a["max_entries"]))
    assert torch.equal(got, want)
    scores = ref.paged_scores(**{k: v for k, v in a.items() if k != "topk"})
    assert (scores[scores > float("-inf")].unique().numel() < (scores > float("-inf")).sum())  # ties happened


@pytest.mark.parametrize("config", [dict(group=1, nprog=3, block_n=16), dict(group=2, nprog=2, block_n=16),
                                    dict(group=4, nprog=1, block_n=32), dict(group=4, nprog=2, block=16),
                                    dict(group=2, fused_hist=False), dict(form="stack", group=4, nprog=2, block_n=16),
                                    dict(form="rows", group=8, nprog=2, block_n=16),
                                    dict(form="rows_t", group=4, nprog=3, block_n=16),
                                    dict(form="rows_t", group=1, nprog=2, block_n=32, fused_hist=False)])
def test_indexer_topk_configs(config):
    """Any row grouping and tile form is right for any batch (groups straddling requests, strided entry
    blocks)."""
    a = make_case(EXTEND + [(77, 2), (5, 4)], n_heads=20, integer=True, topk=9)
    assert torch.equal(tri.indexer_topk(**a, config=config), ref.indexer_topk(**a))


def test_indexer_topk_row_chunks(monkeypatch):
    """A batch whose score scratch does not fit one launch goes in row chunks."""
    a = make_case(EXTEND, integer=True)
    monkeypatch.setattr(tri, "SCRATCH_BYTES", 4 * a["max_entries"] * 5)
    assert torch.equal(tri.indexer_topk(**a), ref.indexer_topk(**a))


def test_indexer_topk_histograms_left_zeroed(monkeypatch):
    """The pooled first-pass histograms are cleared by the select kernel, so back-to-back calls (a decode step
    after another, as in a replayed CUDA graph) launch no clearing kernel and still count from zero; batches past
    the pool get their own zeroed scratch."""
    monkeypatch.setattr(tri, "_HIST_POOL", {})
    for seed, pool_rows in ((0, 512), (1, 512), (2, 4)):
        monkeypatch.setattr(tri, "HIST_POOL_ROWS", pool_rows)
        torch.manual_seed(seed)
        a = make_case(EXTEND, integer=True)
        assert torch.equal(tri.indexer_topk(**a), ref.indexer_topk(**a))
        assert not tri._HIST_POOL[a["q"].device].any()


@pytest.mark.parametrize("form", ["stack", "rows", "rows_t"])
def test_indexer_topk_bf16(form):
    """bf16 operands (integer-valued, so exact): the bf16 score scratch and the two radix passes over it."""
    a = make_case(verify(4) + DECODE + EXTEND, dtype=torch.bfloat16, integer=True, topk=7)
    assert torch.equal(tri.indexer_topk(**a, config=dict(form=form)), ref.indexer_topk(**a))


def test_default_config_is_table_driven():
    """Every shape class takes its DEFAULTS row; every sweep candidate names known keys and forms."""
    cpu = torch.device("cpu")
    for (t, r), cls in {(5, 5): "decode", (8, 4): "verify2", (16, 4): "verify4", (1024, 1): "extend"}.items():
        assert tri.shape_class(t, r) == cls
        cfg = tri.default_config(t, r, 64, 4096, cpu)
        assert {k: cfg[k] for k in tri.DEFAULTS[cls]} == tri.DEFAULTS[cls] and cfg["nprog"] >= 1
        for cand in tri.CANDIDATES[cls]:
            assert set(cand) <= set(tri.DEFAULTS[cls]) and tri.DEFAULTS[cls] | cand != tri.DEFAULTS[cls]
            assert (tri.DEFAULTS[cls] | cand)["form"] in tri.FORMS


def test_indexer_topk_static_bound():
    """A static max_entries above what any row sees (a captured decode step): same picks, wider padding."""
    a = make_case(DECODE, integer=True, topk=40)
    a["max_entries"] += 21
    want = ref.indexer_topk(**a)
    assert want.shape[1] == 40 and (want[:, -1] == -1).all()
    assert torch.equal(tri.indexer_topk(**a), want)


def test_paged_scores_fp32():
    a = make_case(EXTEND + verify(2), n_heads=6, head_dim=48)
    args = {k: v for k, v in a.items() if k != "topk"}
    want = ref.paged_scores(**args)
    got = tri.paged_scores(**args, out=torch.full_like(want, float("-inf")))
    assert not torch.isnan(got).any()
    seen = want > float("-inf")
    assert torch.equal(got > float("-inf"), seen)
    err = (got - want).where(seen, 0.0).abs().amax(-1) / want.where(seen, 0.0).abs().amax(-1).clamp_min(1e-12)
    assert err.max() <= 1e-5


def test_real_inputs_pick_the_top_scores():
    """Random real inputs: the kernel's picks are a top-k set of the reference's scores."""
    a = make_case(EXTEND + DECODE, n_heads=8, topk=5)
    scores = ref.paged_scores(**{k: v for k, v in a.items() if k != "topk"})
    got = tri.indexer_topk(**a)
    vis = ref.visible_entries(a["positions"], a["ratio"], a["max_entries"])
    for i in range(got.shape[0]):
        picks = got[i][got[i] >= 0]
        assert picks.numel() == min(a["topk"], int(vis[i])) and picks.unique().numel() == picks.numel()
        assert (picks < vis[i]).all() and torch.equal(picks, picks.sort().values)
        if picks.numel():
            rest = torch.ones(int(vis[i]), dtype=torch.bool)
            rest[picks] = False
            kth = scores[i, picks].min()
            assert not rest.any() or scores[i, : int(vis[i])][rest].max() <= kth * (1 + 1e-5) + 1e-6


def _tied_scores(t: int, c: int) -> torch.Tensor:
    """Few distinct values (many ties) of both signs, with -0.0 and +0.0 mixed."""
    s = torch.randint(-3, 4, (t, c), device=DEV).float() * 0.25
    return torch.where((s == 0) & (torch.rand(t, c, device=DEV) < 0.5), -0.0, s)


@pytest.mark.parametrize("bf16", [False, True])
def test_select_topk_exact(bf16):
    t, c, k = 24, 150, 17
    scores = _tied_scores(t, c) if bf16 else torch.where(torch.rand(t, c, device=DEV) < 0.5, _tied_scores(t, c),
                                                          torch.randn(t, c, device=DEV) * 1e3)
    if bf16:
        scores = (scores * torch.randn(t, 1, device=DEV).exp()).bfloat16().float()
    positions = torch.randint(0, 4 * c + 8, (t,), device=DEV)
    want = ref.select_topk(scores, positions, 4, k)
    got = tri.select_topk(scores, positions, 4, k, config=dict(block=32), bf16_scores=bf16)
    assert torch.equal(got, want)


@pytest.mark.parametrize("integer", [False, True])
def test_batched_reference_matches_old_loop(integer):
    a = make_case(EXTEND + DECODE + verify(4), integer=integer)
    got = ref.indexer_topk(**a)
    want = old_loop(a)
    assert [set(row) - {-1} for row in got.tolist()] == want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quant", [True, False])
@pytest.mark.parametrize("t,h,d,rd", [(1, 8, 64, 16), (3, 6, 128, 64), (2, 64, 128, 64)])
def test_indexer_q_exact(dtype, quant, t, h, d, rd) -> None:
    """The query side in one launch equals the reference bit for bit (signs of zeros too) in the interpreter; on a
    GPU the rope's products may fuse into FMAs (as in qkv_triton), which can move an FP4 code by one step."""
    from dsv4.ops.rope import rope_cos_sin, rope_inv_freq

    torch.manual_seed(t * h + d)
    q, w = (torch.randn(t, h, d) * 3).to(dtype).to(DEV), torch.randn(t, h).to(dtype).to(DEV)
    q[0, 0, :4] = 0.0
    cos, sin = rope_cos_sin(torch.arange(t, device=DEV) * 977 + 5, rope_inv_freq(rd, 10000.0, None).to(DEV))
    scale = d**-0.5 * h**-0.5
    (wq, ww), (gq, gw) = ref.indexer_q(q, w, scale, cos, sin, quant), tri.indexer_q(q, w, scale, cos, sin, quant)
    assert gq.dtype == wq.dtype and gw.dtype == ww.dtype and torch.equal(gw, ww)
    if DEV == "cpu":
        assert torch.equal(gq, wq) and torch.equal(gq.signbit(), wq.signbit())
    elif quant:  # a fused rope product moves the rounded value across an FP4 boundary now and then
        assert (gq != wq).float().mean() < 0.02
    else:  # no rounding grid to hide the FMAs: fp32 rope differs in the last bits (5-13% of elements on an H200)
        err = ((gq.float() - wq.float()).norm() / wq.float().norm()).item()
        assert err <= (1e-6 if dtype == torch.float32 else 1e-2), err


@pytest.mark.parametrize("quant", [True, False])
def test_indexer_q_fp32_weights_round_as_they_load(quant) -> None:
    """The weights_proj part of the fused projection's fp32 accumulation read in place (strided rows) with
    ``w_dtype=bf16``: bit for bit the kernel on the pre-rounded bf16 weights (the reference likewise)."""
    from dsv4.ops.rope import rope_cos_sin, rope_inv_freq

    t, h, d, rd = 3, 8, 64, 16
    q = (torch.randn(t, h, d) * 3).to(torch.bfloat16).to(DEV)
    w = (torch.randn(t, h + 24) * 4).to(DEV)[:, 8: 8 + h]
    cos, sin = rope_cos_sin(torch.arange(t, device=DEV) * 977 + 5, rope_inv_freq(rd, 10000.0, None).to(DEV))
    scale = d**-0.5 * h**-0.5
    pre = w.to(torch.bfloat16)
    for impl in (tri, ref):
        gq, gw = impl.indexer_q(q, w, scale, cos, sin, quant, w_dtype=torch.bfloat16)
        wq, ww = impl.indexer_q(q, pre, scale, cos, sin, quant)
        assert gw.dtype == torch.bfloat16 and torch.equal(gw, ww) and torch.equal(gq, wq), impl.__name__
