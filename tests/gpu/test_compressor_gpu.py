"""Compressor kernels against the reference on the GPU at V4-Flash shapes (skipped without CUDA).

Main CSA compressor (head_dim 512, ratio 4, overlapping, FP8 nope simulation), the indexer's (128, ratio 4,
Hadamard + FP4), HCA (512, ratio 128); rope 64 on the compress table's base; fp32 projections (what the model
feeds) and bf16 ones; bf16 pools. Tails must be bit-exact, the same pool rows written, entries within bf16
tolerance (norm-wise 1e-2) and their quantisation bit-exact given the kernel's own unquantised entries; a
captured CUDA graph of a decode step must replay what eager runs compute. Tails are position-indexed rings
(c*m + slack rows); speculative verifies whose rejected rows close windows leave exactly what plain decoding
leaves.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from test_kernels_compressor import check_rollback, make_case, run, same

from dsv4.engine.forward_batch import ForwardBatch
from dsv4.ops import compressor as ref
from dsv4.ops import compressor_triton as tri
from dsv4.ops.quant import act_quant_sim, fp4_act_quant_sim, hadamard_transform

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
RD, PAGE, BASE = 64, 64, 160000.0
# name: (head_dim, ratio, overlap, quant)
KINDS = {"csa": (512, 4, True, "fp8"), "indexer": (128, 4, True, "fp4"), "hca": (512, 128, False, "fp8")}
BATCHES = {
    "decode64": [(int(p), 1) for p in torch.randint(0, 65536, (60,))] + [(127, 1), (255, 1), (3, 1), (65535, 1)],
    "prefill4096": [(0, 4096)],
    "mixed": [(3000, 1), (4095, 1), (517, 4), (1201, 300), (0, 200), (9000, 1), (130, 129), (65535, 1)],
}


def _norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    return ((a - b).norm() / b.norm()).item()


def _case(kind: str, batch: str, proj=torch.float32, pool=torch.bfloat16) -> dict:
    d, ratio, overlap, _ = KINDS[kind]
    return make_case(BATCHES[batch], ratio, overlap, dtype=proj, d=d, pool_dtype=pool, device="cuda", rd=RD,
                     page=PAGE, rope_base=BASE)


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_compressor_flash(kind, batch):
    case = _case(kind, batch)
    quant = KINDS[kind][3]
    for q in (None, quant):
        want = run(ref.compress_update, case, quant=q)
        got = run(tri.compress_update, case, quant=q)
        assert same(got["kv_state"], want["kv_state"]) and same(got["score_state"], want["score_state"])
        written = ~torch.isnan(want["pool"][..., 0])
        assert torch.equal(written, ~torch.isnan(got["pool"][..., 0]))
        g, w = got["pool"][written], want["pool"][written]
        bits = (g == w).float().mean().item()
        err = _norm_rel(g, w)
        print(f"\ncompressor {kind} {batch} quant={q}: {int(written.sum())} entries, norm rel err {err:.2e}, "
              f"bit-identical {bits:.4f}")
        assert err <= (1e-2 if q is None else 3e-2)
        if q is not None:
            plain = run(tri.compress_update, case, quant=None)["pool"][written]
            if q == "fp8":
                nope = plain.shape[-1] - RD
                expect = torch.cat((act_quant_sim(plain[:, :nope], 64), plain[:, nope:]), dim=-1)
            else:
                expect = fp4_act_quant_sim(hadamard_transform(plain), 32)
            assert same(g, expect)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_compressor_flash_fp32_and_bf16_projections(kind):
    """fp32 pool: per-row max relative error <= 1e-5 (no quantisation); bf16 projections in, bf16 pool."""
    case = _case(kind, "mixed", pool=torch.float32)
    want, got = run(ref.compress_update, case), run(tri.compress_update, case)
    written = ~torch.isnan(want["pool"][..., 0])
    g, w = got["pool"][written], want["pool"][written]
    err = ((g - w).abs().amax(-1) / w.abs().amax(-1)).max().item()
    print(f"\ncompressor {kind} mixed fp32: worst row rel err {err:.2e}")
    assert err <= 1e-5
    case = _case(kind, "mixed", proj=torch.bfloat16)
    want, got = run(ref.compress_update, case), run(tri.compress_update, case)
    assert same(got["kv_state"], want["kv_state"]) and same(got["score_state"], want["score_state"])
    written = ~torch.isnan(want["pool"][..., 0])
    assert _norm_rel(got["pool"][written], want["pool"][written]) <= 1e-2


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_decode_step_graph_capture(kind, impl):
    """Capture one decode step of 64 requests (the reference without its quantisation simulation: quant.py
    builds constants on the host); replay it 2m times over fresh inputs, advancing positions in the captured
    buffers; pool and tails equal an eager run of the same steps."""
    d, ratio, overlap, quant = KINDS[kind]
    fn = tri.compress_update if impl == "triton" else ref.compress_update
    quant = quant if impl == "triton" else None
    case = make_case([(int(p), 1) for p in torch.randint(0, 4096, (64,))], ratio, overlap, d=d,
                     pool_dtype=torch.bfloat16, device="cuda", rd=RD, page=PAGE, rope_base=BASE)
    steps = 2 * min(ratio, 8)  # positions stay below 4096 + 16: the case's pages hold them
    b = case["batch"]
    inputs = [(torch.randn_like(case["kv"]), torch.randn_like(case["score"])) for _ in range(steps)]
    eager = {k: case[k].clone() for k in ("kv_state", "score_state", "pool")}
    static = {k: case[k].clone() for k in ("kv_state", "score_state", "pool", "kv", "score")}
    pos, p0 = b.positions.clone(), b.prefix_lens.clone()

    def step(bufs: dict, kv, score, positions, prefix_lens) -> None:
        fn(kv, score, case["ape"], case["norm_weight"], 1e-6, case["inv_freq"], quant, positions, b.slots, prefix_lens,
           b.extend_lens, b.starts, bufs["kv_state"], bufs["score_state"], bufs["pool"], case["table"])

    for i, (kv, score) in enumerate(inputs):
        step(eager, kv, score, b.positions + i, b.prefix_lens + i)
    # capture on a copy (warm-up runs compile the kernels and must not touch the checked buffers)
    scratch = {k: v.clone() for k, v in static.items()}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(scratch, scratch["kv"], scratch["score"], pos, p0)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step(static, static["kv"], static["score"], pos, p0)
    for i, (kv, score) in enumerate(inputs):
        static["kv"].copy_(kv)
        static["score"].copy_(score)
        pos.copy_(b.positions + i)
        p0.copy_(b.prefix_lens + i)
        g.replay()
    torch.cuda.synchronize()
    for k in ("kv_state", "score_state", "pool"):
        assert same(static[k], eager[k]), k


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_rejected_verify_rows_roll_back_flash(kind):
    """k = 3 verifies with random rejections on rings with slack 4, Flash shapes, bf16 pool, the quantisation
    on: entries and live ring rows bit-identical to a plain prefill of the accepted tokens."""
    d, ratio, overlap, quant = KINDS[kind]
    check_rollback(tri.compress_update, ratio, overlap, quant, windows=3 if ratio > 8 else 8, d=d,
                   pool_dtype=torch.bfloat16, device="cuda", rd=RD, page=PAGE, rope_base=BASE)


def test_forward_batch_layout_assumption():
    """The kernels find a token's request by binary search over ``starts``: requests laid out back to back."""
    b = ForwardBatch.build([3, 0, 2], [5, 0, 9], [[1] * 4, [1] * 2, [1]], device="cuda")
    assert torch.all(b.starts[1:] > b.starts[:-1])


@pytest.mark.parametrize("cand", range(len(tri.CANDIDATES["long"])))
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_hca_pooling_candidates_flash(batch, cand):
    """Every HCA pooling point the benchmark sweep may make the default (split off, other channel blocks and
    row steps): fp32 pool rows within 1e-5 of the reference's, the tails bit-exact."""
    case = _case("hca", batch, pool=torch.float32)
    cfg = tri.DEFAULTS["long"] | tri.CANDIDATES["long"][cand]
    want = run(ref.compress_update, case)
    got = run(partial(tri.compress_update, config=cfg), case)
    assert same(got["kv_state"], want["kv_state"]) and same(got["score_state"], want["score_state"])
    written = ~torch.isnan(want["pool"][..., 0])
    assert torch.equal(written, ~torch.isnan(got["pool"][..., 0]))
    err = ((got["pool"][written] - want["pool"][written]).abs().amax(-1)
           / want["pool"][written].abs().amax(-1).clamp_min(1e-12)).max().item()
    print(f"\nhca pooling {cfg} {batch}: fp32 max rel err {err:.2e}")
    assert err <= 1e-5
