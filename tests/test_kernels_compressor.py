"""The compressor update: the batched reference against the per-request loop the model ran before it (that loop
kept the official shifting tail layout: its tails are translated to and from the position-indexed ring), the
Triton kernels (interpreter on CPU) against the batched reference, and speculative rollback (rejected verify
rows leave pool entries and ring rows equal to plain decoding), on fresh random inputs each run."""

from __future__ import annotations

from functools import partial

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
    """The per-request loop of ``Compressor.update`` before the batched op (host lists, one request at a time),
    on tails in the official layout [slots, c*m, c*d]: CSA rows [0, m) the last closed window, [m, 2m) the open
    one; HCA rows [0, m) the open one."""
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


def to_official(ring: torch.Tensor, slot: int, end: int, m: int, overlap: bool) -> torch.Tensor:
    """A slot's ring [S, C] as the official layout [c*m, C] after ``end`` tokens (rows of the open window past
    ``end`` and, before the first window closes, the closed window: the ring's reset rows for positions < 0)."""
    s, off = ring.shape[1], (m if overlap else 0)
    out = torch.zeros((2 if overlap else 1) * m, ring.shape[-1], dtype=ring.dtype, device=ring.device)
    last = end // m * m
    out[off : off + end - last] = ring[slot, torch.arange(last, end) % s]
    if overlap:
        out[:m] = ring[slot, torch.arange(last - m, last) % s]
    return out


def make_case(requests: list[tuple[int, int]], ratio: int, overlap: bool, dtype=torch.float32, d: int = D,
              pool_dtype=torch.float32, device: str = DEV, rd: int = RD, page: int = PAGE,
              rope_base: float = 10000.0, slack: int = 3) -> dict:
    """Random projections, tails and a poisoned pool for (prefix_len, extend_len) requests on shuffled slots.

    Tails are rings of c*m + slack rows (3 by default: neither a multiple of m nor a power of two) holding random
    rows (any carried rows are valid inputs); a slot whose request has no closed window yet holds the reset
    values in the rows of positions -m..-1, as a fresh slot does."""
    c, m = (2 if overlap else 1), ratio
    slots = len(requests) + 2
    slot_ids = torch.randperm(slots)[: len(requests)].tolist()
    batch = ForwardBatch.build(slot_ids, [p for p, _ in requests], [[0] * n for _, n in requests], device=device)
    t = batch.num_tokens
    rows = c * m + slack
    kv_state = torch.randn(slots, rows, c * d, device=device)
    score_state = torch.randn(slots, rows, c * d, device=device)
    for (p0, _), s in zip(requests, slot_ids, strict=True):
        if overlap and p0 < m:
            kv_state[s, rows - m :], score_state[s, rows - m :] = 0.0, float("-inf")
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
    """The old loop on the case's rings translated to the official layout; returns the copy with its pool and
    the loop's official-layout tails ``old_kv`` / ``old_score`` (per request, after the batch)."""
    c = clone_case(case)
    c.update(kw)
    b, m, overlap = c["batch"], c["ape"].shape[0], c["kv"].shape[1] == 2 * c["norm_weight"].shape[0]
    old = {}
    for k in ("kv_state", "score_state"):
        old[k] = torch.zeros(c[k].shape[0], (2 if overlap else 1) * m, c[k].shape[-1], device=c[k].device)
        for slot, p0 in zip(b.slots_cpu, b.prefix_lens_cpu, strict=True):
            old[k][slot] = to_official(c[k], slot, p0, m, overlap)
    loop_update(c["kv"], c["score"], c["ape"], c["norm_weight"], c["eps"], c["inv_freq"], c["quant"], b,
                old["kv_state"], old["score_state"], c["pool"], c["table"])
    c["old_kv"], c["old_score"] = old["kv_state"], old["score_state"]
    return c


def ring_after(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The rings a batch must leave: each request's last min(S, n) rows (kv; score + ape) at row position % S,
    every other row untouched."""
    kv, sc = case["kv_state"].clone(), case["score_state"].clone()
    b, m, s = case["batch"], case["ape"].shape[0], kv.shape[1]
    for slot, p0, n, start in zip(b.slots_cpu, b.prefix_lens_cpu, b.extend_lens_cpu, b.starts_cpu, strict=True):
        for q in range(max(p0, p0 + n - s), p0 + n):
            t = start + q - p0
            kv[slot, q % s] = case["kv"][t].float()
            sc[slot, q % s] = case["score"][t].float() + case["ape"][q % m]
    return kv, sc


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
    """The batched reference is bit-identical to the old per-request loop: the pool (unwritten rows stay NaN)
    and the live tail rows, translated; every ring row is the one its position wrote, no other row changes."""
    case = make_case(CASES[name], ratio, overlap)
    want = run_loop(case, quant=quant)
    got = run(ref.compress_update, case, quant=quant)
    assert same(got["pool"], want["pool"])
    kv, sc = ring_after(case)
    assert same(got["kv_state"], kv) and same(got["score_state"], sc)
    b = case["batch"]
    for slot, p0, n in zip(b.slots_cpu, b.prefix_lens_cpu, b.extend_lens_cpu, strict=True):
        end, off = p0 + n, ratio if overlap else 0
        live = slice(0, off + end % ratio)  # (CSA) the last closed window, then the open window's rows
        for k, old in (("kv_state", "old_kv"), ("score_state", "old_score")):
            assert same(to_official(got[k], slot, end, ratio, overlap)[live], want[old][slot, live]), k


def test_reference_bf16_pool_matches_loop():
    case = make_case(MIXED, 4, True, pool_dtype=torch.bfloat16)
    want, got = run_loop(case, quant="fp8"), run(ref.compress_update, case, quant="fp8")
    assert same(got["pool"], want["pool"])


def test_reference_chunking_invariance():
    """One request's 42 tokens fed in chunks (1, 6, 3, 1, 13, 18) leave the pool and the tails of one 42-token
    prefill."""
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
        for k in ("kv_state", "score_state"):  # every ring row holds the last position written to it
            assert same(state[k], one[k]), k


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


def check_kernel(case: dict, quant: str | None, tol: float = 1e-5, config: dict | None = None) -> None:
    want = run(ref.compress_update, case, quant=quant)
    got = run(partial(tri.compress_update, config=config), case, quant=quant)
    # tails are copies (and one fp32 add): bit-exact
    assert same(got["kv_state"], want["kv_state"]) and same(got["score_state"], want["score_state"])
    written = ~torch.isnan(want["pool"][..., 0])
    assert torch.equal(written, ~torch.isnan(got["pool"][..., 0]))  # the same rows written, no others
    g, w = got["pool"][written].float(), want["pool"][written].float()
    if quant is None:
        assert rel_err(g, w).max() <= tol
        return
    # the quantisation is the reference's own, bit for bit, applied to the kernel's unquantised entries
    plain = run(partial(tri.compress_update, config=config), case, quant=None)["pool"][written]
    if quant == "fp8":
        nope = plain.shape[-1] - 2 * case["inv_freq"].shape[0]
        expect = torch.cat((act_quant_sim(plain[:, :nope], 64), plain[:, nope:]), dim=-1)
    else:
        expect = fp4_act_quant_sim(hadamard_transform(plain), 32)
    assert same(got["pool"][written], expect)
    # and close to the reference (a value at a rounding boundary may land one FP8/FP4 step away)
    assert (g - w).norm() / w.norm() <= 0.02


@pytest.mark.parametrize("slack", [0, 3])
@pytest.mark.parametrize("ratio,overlap", RATIOS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_fp32(ratio, overlap, name, slack):
    check_kernel(make_case(CASES[name], ratio, overlap, slack=slack), None)


@pytest.mark.parametrize("quant", ["fp8", "fp4"])
@pytest.mark.parametrize("name", ["decode", "mixed"])
def test_kernel_quant(quant, name):
    check_kernel(make_case(CASES[name], 4, True), quant)


@pytest.mark.parametrize("quant", [None, "fp8"])
@pytest.mark.parametrize("name", ["decode", "mixed"])
def test_kernel_pool_split(name, quant):
    """Windows pooled by channel-block programs before the emit (the HCA default), and the one-program form
    where the split is turned off for a long window."""
    case = make_case(CASES[name], 8, False)
    check_kernel(case, quant, config=dict(pool_split=True, pool_block_c=8, pool_elems=32))
    assert tri.default_config(128, 512, False)["pool_split"] and not tri.default_config(4, 512, True)["pool_split"]


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


def _feed(fn, case: dict, state: dict, slots: list[int], chunks: list[tuple[int, torch.Tensor, torch.Tensor]],
          quant: str | None) -> None:
    """One batch: request i feeds rows (kv, score) at positions p.. into slot slots[i] (chunks: (p, kv, score))."""
    b = ForwardBatch.build(slots, [p for p, _, _ in chunks], [[0] * kv.shape[0] for _, kv, _ in chunks],
                           device=case["kv"].device)
    fn(torch.cat([kv for _, kv, _ in chunks]), torch.cat([z for _, _, z in chunks]), case["ape"], case["norm_weight"],
       case["eps"], case["inv_freq"], quant, b.positions, b.slots, b.prefix_lens, b.extend_lens, b.starts,
       state["kv_state"], state["score_state"], state["pool"], case["table"])


def check_rollback(fn, ratio: int, overlap: bool, quant: str | None = None, k: int = 3, windows: int = 5,
                   **case_kw) -> None:
    """Speculative decoding on rings with slack k + 1: after a prompt, each step feeds k + 1 rows (the last
    token, then k drafts; drafts after a random accepted count are garbage rows, so rejected rows close windows
    and write entries and ring rows past what is kept), until ``windows`` windows are accepted. The pool entries
    of the accepted positions and the ring rows a later window reads equal one plain prefill of the accepted
    tokens, bit for bit, and so do the entries of a plain continuation fed to both (prompts start at 0: the
    first window's reset rows are read too)."""
    prompts = [5, 1]
    c, m, goal = (2 if overlap else 1), ratio, windows * ratio + 3
    size = goal + k + 2 * m + 1  # positions a request may reach, continuation included
    case = make_case([(0, size)] * len(prompts), ratio, overlap, slack=k + 1, **case_kw)
    slots = case["batch"].slots_cpu
    for st in ("kv_state", "score_state"):  # fresh slots
        case[st][slots] = 0.0 if st == "kv_state" else float("-inf")
    true_kv, true_sc = (case[x].view(len(prompts), size, -1) for x in ("kv", "score"))
    spec = {x: case[x].clone() for x in ("kv_state", "score_state", "pool")}
    plain = {x: case[x].clone() for x in ("kv_state", "score_state", "pool")}
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    _feed(fn, case, spec, slots, [(0, true_kv[i, :n], true_sc[i, :n]) for i, n in enumerate(prompts)], quant)
    ends = list(prompts)
    while min(ends) < goal:
        chunks, live = [], [i for i, e in enumerate(ends) if e < goal]  # a request past the goal stops
        for i in live:
            p = ends[i]
            kv, sc = true_kv[i, p : p + k + 1].clone(), true_sc[i, p : p + k + 1].clone()
            acc = int(torch.randint(0, k + 1, (), generator=gen))
            kv[1 + acc :], sc[1 + acc :] = torch.randn_like(kv[1 + acc :]), torch.randn_like(sc[1 + acc :])
            chunks.append((p, kv, sc))
            ends[i] = p + 1 + acc
        _feed(fn, case, spec, [slots[i] for i in live], chunks, quant)
    _feed(fn, case, plain, slots, [(0, true_kv[i, :e], true_sc[i, :e]) for i, e in enumerate(ends)], quant)
    ring, ps = spec["kv_state"].shape[1], case["pool"].shape[1]
    for i, (slot, e) in enumerate(zip(slots, ends, strict=True)):
        live = torch.arange(e - c * m, e) % ring
        for x in ("kv_state", "score_state"):
            assert same(spec[x][slot, live], plain[x][slot, live]), (x, i)
        idx = torch.arange(e // m)
        rows = case["table"][slot, idx // ps], idx % ps
        assert same(spec["pool"][rows], plain["pool"][rows]), i
    more = [(e, true_kv[i, e : e + 2 * m + 1], true_sc[i, e : e + 2 * m + 1]) for i, e in enumerate(ends)]
    for state in (spec, plain):
        _feed(fn, case, state, slots, more, quant)
    for slot, e in zip(slots, ends, strict=True):
        idx = torch.arange((e + 2 * m + 1) // m)
        rows = case["table"][slot, idx // ps], idx % ps
        assert same(spec["pool"][rows], plain["pool"][rows])


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("ratio,overlap", RATIOS)
def test_rejected_verify_rows_roll_back(impl, ratio, overlap):
    check_rollback(ref.compress_update if impl == "ref" else tri.compress_update, ratio, overlap)


def test_ring_too_short_is_refused():
    case = make_case([(3, 1)], 4, True, slack=-1)
    for fn in (ref.compress_update, tri.compress_update):
        with pytest.raises(ValueError, match="at least 8 rows"):
            run(fn, case)
