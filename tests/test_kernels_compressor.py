"""The compressor update: the batched reference against the per-request loop the model ran before it, and the
Triton kernels (interpreter on CPU) against the batched reference, on fresh random inputs each run."""

from __future__ import annotations

import pytest
import torch
from harness import rel_err

from dsv4.engine.forward_batch import ForwardBatch
from dsv4.ops import compressor as ref
from dsv4.ops.norm import rms_norm
from dsv4.ops.quant import act_quant_sim, fp4_act_quant_sim, hadamard_transform
from dsv4.ops.rope import apply_rope, rope_inv_freq

DEV = "cuda" if torch.cuda.is_available() else "cpu"
D, RD, PAGE = 32, 8, 4


def loop_update(kv_all, z_all, ape, w, eps, inv_freq, quant, batch, kv_state, score_state, pool, table) -> None:
    """The per-request loop of ``Compressor.update`` before the batched op (host lists, one request at a time)."""
    m, d = ape.shape[0], w.shape[0]
    overlap = kv_all.shape[1] == 2 * d
    off = m if overlap else 0
    for r, slot in enumerate(batch.slots_cpu):
        s, n, p0 = batch.starts_cpu[r], batch.extend_lens_cpu[r], batch.prefix_lens_cpu[r]
        pos = batch.positions[s : s + n]
        z = z_all[s : s + n].float() + ape[pos % m]
        tail = p0 % m
        seq_kv = torch.cat((kv_state[slot, off : off + tail], kv_all[s : s + n].float()))
        seq_z = torch.cat((score_state[slot, off : off + tail], z))
        first, nwin = p0 // m, (p0 + n) // m - p0 // m
        if nwin:
            cur_kv, cur_z = seq_kv[: nwin * m].view(nwin, m, -1), seq_z[: nwin * m].view(nwin, m, -1)
            if overlap:
                prev_kv = torch.cat((kv_state[slot, None, :m], cur_kv[:-1]))[..., :d]
                prev_z = torch.cat((score_state[slot, None, :m], cur_z[:-1]))[..., :d]
                pooled = ref.pool_windows(torch.cat((prev_kv, cur_kv[..., d:]), 1),
                                          torch.cat((prev_z, cur_z[..., d:]), 1))
                kv_state[slot, :m] = cur_kv[-1]
                score_state[slot, :m] = cur_z[-1]
            else:
                pooled = ref.pool_windows(cur_kv, cur_z)
            e = rms_norm(pooled.to(pool.dtype), w, eps)
            angle = ((first + torch.arange(nwin, device=pool.device)) * m).float()[:, None] * inv_freq[None, :]
            e = apply_rope(e, angle.cos(), angle.sin())
            if quant == "fp8":
                e = torch.cat((act_quant_sim(e[..., : d - RD], 64), e[..., d - RD :]), dim=-1)
            elif quant == "fp4":
                e = fp4_act_quant_sim(hadamard_transform(e), 32)
            idx = torch.arange(first, first + nwin, device=pool.device)
            pool[table[slot, idx // pool.shape[1]], idx % pool.shape[1]] = e.to(pool.dtype)
        rest = (p0 + n) % m
        if rest:
            kv_state[slot, off : off + rest] = seq_kv[nwin * m :]
            score_state[slot, off : off + rest] = seq_z[nwin * m :]


def make_case(requests: list[tuple[int, int]], ratio: int, overlap: bool, dtype=torch.float32, d: int = D,
              pool_dtype=torch.float32, device: str = DEV, rd: int = RD, page: int = PAGE,
              rope_base: float = 10000.0) -> dict:
    """Random projections, tails and a poisoned pool for (prefix_len, extend_len) requests on shuffled slots.

    Tails are random (any carried rows are valid inputs); a slot whose request has no closed window yet holds
    the reset values in its previous-window rows, as a fresh slot does."""
    c, m = (2 if overlap else 1), ratio
    slots = len(requests) + 2
    slot_ids = torch.randperm(slots)[: len(requests)].tolist()
    batch = ForwardBatch.build(slot_ids, [p for p, _ in requests], [[0] * n for _, n in requests], device=device)
    t = batch.num_tokens
    kv_state = torch.randn(slots, c * m, c * d, device=device)
    score_state = torch.randn(slots, c * m, c * d, device=device)
    for (p0, _), s in zip(requests, slot_ids, strict=True):
        if overlap and p0 < m:
            kv_state[s, :m], score_state[s, :m] = 0.0, float("-inf")
    per_slot = max(p + n for p, n in requests) // m // page + 1
    pages = slots * per_slot + 1
    return dict(
        kv=(torch.randn(t, c * d, device=device) * 2).to(dtype), score=(torch.randn(t, c * d, device=device) * 2).to(dtype),
        ape=torch.randn(m, c * d, device=device), norm_weight=1 + 0.1 * torch.randn(d, device=device), eps=1e-6,
        inv_freq=rope_inv_freq(rd, rope_base, None).to(device), quant=None, positions=batch.positions,
        slots=batch.slots, prefix_lens=batch.prefix_lens, extend_lens=batch.extend_lens, starts=batch.starts,
        kv_state=kv_state, score_state=score_state,
        pool=torch.full((pages, page, d), float("nan"), device=device).to(pool_dtype),
        table=(torch.randperm(pages - 1, device=device)[: slots * per_slot] + 1).view(slots, per_slot),
        batch=batch,
    )


def clone_case(case: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def run(fn, case: dict, **kw) -> dict:
    """Run ``fn`` on a copy of ``case``; returns the copy (its state and pool updated)."""
    c = clone_case(case)
    c.update(kw)
    args = {k: v for k, v in c.items() if k != "batch"}
    fn(**args)
    return c


def run_loop(case: dict, **kw) -> dict:
    c = clone_case(case)
    c.update(kw)
    loop_update(c["kv"], c["score"], c["ape"], c["norm_weight"], c["eps"], c["inv_freq"], c["quant"], c["batch"],
                c["kv_state"], c["score_state"], c["pool"], c["table"])
    return c


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN (unwritten pool rows) included."""
    return torch.equal(a.view(torch.int32) if a.dtype == torch.float32 else a.view(torch.int16),
                       b.view(torch.int32) if b.dtype == torch.float32 else b.view(torch.int16))


DECODE = [(3, 1), (6, 1), (0, 1), (11, 1), (40, 1), (7, 1)]  # ratio 4: closes at 3, 11, 7; ratio 8: at 7
PREFILL = [(0, 13)]
UNALIGNED = [(5, 11), (2, 1), (9, 3)]
MIXED = [(7, 1), (0, 9), (13, 6), (3, 1), (30, 17), (1, 2)]
CASES = {"decode": DECODE, "prefill": PREFILL, "unaligned": UNALIGNED, "mixed": MIXED}
RATIOS = [(4, True), (8, False)]


@pytest.mark.parametrize("ratio,overlap", RATIOS + [(16, False)])
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("quant", [None, "fp8", "fp4"])
def test_reference_matches_loop(ratio, overlap, name, quant):
    """The batched reference is bit-identical to the old per-request loop: pool (unwritten rows stay NaN)
    and both tails."""
    case = make_case(CASES[name], ratio, overlap)
    want = run_loop(case, quant=quant)
    got = run(ref.compress_update, case, quant=quant)
    for k in ("pool", "kv_state", "score_state"):
        assert same(got[k], want[k]), k


def test_reference_bf16_pool_matches_loop():
    case = make_case(MIXED, 4, True, pool_dtype=torch.bfloat16)
    want, got = run_loop(case, quant="fp8"), run(ref.compress_update, case, quant="fp8")
    assert same(got["pool"], want["pool"])


def test_reference_chunking_invariance():
    """One request's 42 tokens fed in chunks (1, 6, 3, 1, 13, 18) leave the pool and the live tail rows of one
    42-token prefill."""
    for ratio, overlap in RATIOS:
        whole = make_case([(0, 42)], ratio, overlap)
        one = run(ref.compress_update, whole)
        state = {k: whole[k].clone() for k in ("kv_state", "score_state", "pool")}
        p = 0
        for n in (1, 6, 3, 1, 13, 18):
            b = ForwardBatch.build(whole["batch"].slots_cpu, [p], [[0] * n], device=DEV)
            ref.compress_update(whole["kv"][p : p + n], whole["score"][p : p + n], whole["ape"], whole["norm_weight"],
                                whole["eps"], whole["inv_freq"], None, b.positions, b.slots, b.prefix_lens,
                                b.extend_lens, b.starts, state["kv_state"], state["score_state"], state["pool"],
                                whole["table"])
            p += n
        assert same(state["pool"], one["pool"])
        slot, off = whole["batch"].slots_cpu[0], ratio if overlap else 0
        live = slice(0, off + 42 % ratio)  # (CSA) the last closed window, then the open window's rows
        for k in ("kv_state", "score_state"):
            assert same(state[k][slot, live], one[k][slot, live]), k


@pytest.mark.parametrize("quant", [None, "fp4"])
def test_reference_needs_no_host_sync(quant):
    """On fake tensors (no data) any op that needs values on the host (.item(), nonzero, a 0-d index, a
    data-dependent shape) raises: the reference plans from shapes alone, so a decode step can be graph-captured."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for reqs, ratio, overlap in ((MIXED, 4, True), (DECODE, 8, False)):
        case = make_case(reqs, ratio, overlap)
        mode = FakeTensorMode(allow_non_fake_inputs=True)  # constants the ops keep (lookup tables) stay real
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in case.items() if k != "batch"}
        with mode:
            ref.compress_update(**dict(fake, quant=quant))


# ---- the Triton kernels ------------------------------------------------------------------------------------
triton = pytest.importorskip("triton")
from dsv4.ops import compressor_triton as tri  # noqa: E402


def check_kernel(case: dict, quant: str | None, tol: float = 1e-5) -> None:
    want = run(ref.compress_update, case, quant=quant)
    got = run(tri.compress_update, case, quant=quant)
    # tails are copies (and one fp32 add): bit-exact
    assert same(got["kv_state"], want["kv_state"]) and same(got["score_state"], want["score_state"])
    written = ~torch.isnan(want["pool"][..., 0])
    assert torch.equal(written, ~torch.isnan(got["pool"][..., 0]))  # the same rows written, no others
    g, w = got["pool"][written].float(), want["pool"][written].float()
    if quant is None:
        assert rel_err(g, w).max() <= tol
        return
    # the quantisation is the reference's own, bit for bit, applied to the kernel's unquantised entries
    plain = run(tri.compress_update, case, quant=None)["pool"][written]
    if quant == "fp8":
        nope = plain.shape[-1] - 2 * case["inv_freq"].shape[0]
        expect = torch.cat((act_quant_sim(plain[:, :nope], 64), plain[:, nope:]), dim=-1)
    else:
        expect = fp4_act_quant_sim(hadamard_transform(plain), 32)
    assert same(got["pool"][written], expect)
    # and close to the reference (a value at a rounding boundary may land one FP8/FP4 step away)
    assert (g - w).norm() / w.norm() <= 0.02


@pytest.mark.parametrize("ratio,overlap", RATIOS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_fp32(ratio, overlap, name):
    check_kernel(make_case(CASES[name], ratio, overlap), None)


@pytest.mark.parametrize("quant", ["fp8", "fp4"])
@pytest.mark.parametrize("name", ["decode", "mixed"])
def test_kernel_quant(quant, name):
    check_kernel(make_case(CASES[name], 4, True), quant)


def test_kernel_long_window_bf16_inputs():
    """Ratio 32 pools in several row blocks; bf16 projections in (upcast in the kernel as in the reference),
    a bf16 pool; 72 channels (not a power of two)."""
    case = make_case([(20, 50), (31, 1), (63, 1), (0, 33)], 32, False, dtype=torch.bfloat16, d=72,
                     pool_dtype=torch.bfloat16)
    want = run(ref.compress_update, case)
    got = run(tri.compress_update, case)
    assert same(got["kv_state"], want["kv_state"]) and same(got["score_state"], want["score_state"])
    written = ~torch.isnan(want["pool"][..., 0])
    g, w = got["pool"][written].float(), want["pool"][written].float()
    assert torch.equal(written, ~torch.isnan(got["pool"][..., 0]))
    # one bf16 step where the fp32 pooling rounds differently before the bf16 casts
    assert (g - w).norm() / w.norm() <= 1e-2 and rel_err(g, w).max() <= 0.02
