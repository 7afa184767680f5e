"""The KV compressors' update, as a reference (DSV4_SPEC 4.6, 6.2, 6.3).

Every ``m`` tokens (m = ratio) become one entry by a per-channel softmax-gated pooling: HCA pools the ``m``
tokens of its window; CSA (``overlap``: projections of 2d channels) pools ``2m`` rows, the first halves
``[:d]`` of the previous window's tokens and the second halves ``[d:]`` of its own. A closed window's entry is
RMSNormed (after a cast to the pool's dtype, as the official code casts to bf16), roped at the window's first
position, quantisation-simulated, and stored into the paged pool.

:func:`compress_update` runs a whole flat batch (decode rows, prefill chunks after any prefix, verify rows)
from device tensors alone: no host sync, no loop over requests, so a decode step can be captured in a CUDA
graph. The Triton kernels with the same signature are in :mod:`dsv4.ops.compressor_triton`.

Tail layout (dsv4/cache/model_cache.py; not the official code's, which keeps the previous and the open window
and shifts one into the other): per slot a ring of ``S >= c*m`` rows [S, c*d] fp32, position q's kv and score
rows (all channels, the score with its bias ``ape`` added) at row ``q % S``. ``S = c*m + slack``: with a slack of
at least k + 1, rows a speculative verify writes for positions it then rejects only overwrite positions older
than any window still to close reads, so the tails stay what plain decoding of the accepted tokens leaves. A
fresh slot holds kv = 0, score = -inf; the CSA window closing at m - 1 reads positions -m..-1 from rows
S-m..S-1, which nothing has written yet (positions written before that read, rejected ones included, are below
m - 1 + k < m + slack = S - m), so they hold that "no previous window". Rows are only ever written with their
own position's values, never shifted: a decode token's row may be stored before or after the emit that reads
the ring, since it replaces position q - S, older than anything that emit reads.
"""

from __future__ import annotations

import torch

from dsv4.ops.kv_fp8 import Fp8KV, quantize_rows
from dsv4.ops.norm import rms_norm
from dsv4.ops.quant import act_quant_sim, fp4_act_quant_sim, hadamard_transform
from dsv4.ops.rope import apply_rope

KV_QUANT_BLOCK = 64  # the main compressor's FP8 simulation of the nope dims (the window ring's too)
INDEX_QUANT_BLOCK = 32  # the indexer compressor's FP4 simulation
QUANT_MODES = (None, "fp8", "fp4")


def pool_windows(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Pool each window's rows with a per-channel softmax over the rows.

    kv, score: [W, rows, d] fp32 (score includes the position bias; -inf rows get zero weight).
    Returns [W, d] fp32: ``sum_r softmax_r(score)[r] * kv[r]``.
    """
    return (torch.softmax(score.float(), dim=1) * kv.float()).sum(dim=1)


def finish_entries(e: torch.Tensor, start: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                   inv_freq: torch.Tensor, quant: str | None) -> torch.Tensor:
    """RMSNorm, rope at each window's first position, then the quantisation simulation.

    e: [W, d] pooled entries already cast to the pool's dtype; start: [W] int64 first positions; inv_freq:
    [rd/2] fp32 (the compress rope table). ``quant``: None, "fp8" (main compressor: the nope dims through FP8
    in blocks of 64) or "fp4" (indexer compressor: Hadamard rotation, then FP4 in blocks of 32). Returns
    [W, d] in e.dtype.
    """
    e = rms_norm(e, norm_weight, eps)
    angle = start.float()[:, None] * inv_freq[None, :]
    e = apply_rope(e, angle.cos(), angle.sin())
    if quant == "fp8":
        nope = e.shape[-1] - 2 * inv_freq.shape[0]
        e = torch.cat((act_quant_sim(e[..., :nope], KV_QUANT_BLOCK), e[..., nope:]), dim=-1)
    elif quant == "fp4":
        e = fp4_act_quant_sim(hadamard_transform(e), INDEX_QUANT_BLOCK)
    return e


def write_rows(target: torch.Tensor, dest: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
    """``target[dest[k]] = values[k]`` for every ``valid[k]``, without a host sync.

    target: [N, C]; dest: [K] int64 (distinct where valid; anything where not); values: [K, C]. Masked-out
    rows repeat the first valid write (or, when none is valid, write row 0's own value back), so every index
    written twice gets the same value twice and the result is deterministic.
    """
    # NOTE: index with 1-element tensors, never 0-d ones: torch turns a 0-d integer index into .item(), a sync
    first = valid.to(torch.int8).argmax()[None]
    any_valid = valid[first]
    dest = torch.where(valid, dest, torch.where(any_valid, dest[first], 0))
    fill = torch.where(any_valid[:, None], values[first].to(target.dtype), target[:1])
    target[dest] = torch.where(valid[:, None], values.to(target.dtype), fill)


def store_entries(pool: torch.Tensor | Fp8KV, table: torch.Tensor, slot: torch.Tensor, index: torch.Tensor,
                  entries: torch.Tensor, valid: torch.Tensor) -> None:
    """The compressed-entry store: entry ``index[k]`` of slot ``slot[k]`` lives at
    ``pool[table[slot, index // page_size], index % page_size]``; rows with ``valid[k]`` False write nothing.

    pool: [pages, page_size, d] or an FP8 store (``--kv-cache-dtype fp8``: the entries are quantised as they are
    stored); table: [slots, max_pages] int64; slot, index: [W] int64; entries: [W, d].
    """
    ps = pool.shape[1]
    index = torch.where(valid, index, 0)
    page = table[slot, (index // ps).clamp_max(table.shape[1] - 1)]
    if isinstance(pool, Fp8KV):
        for part, v in zip(pool, quantize_rows(entries, pool.rope.shape[-1]), strict=True):
            write_rows(part.view(-1, part.shape[-1]), page * ps + index % ps, v, valid)
        return
    write_rows(pool.view(-1, pool.shape[-1]), page * ps + index % ps, entries, valid)


def _gather_rows(q: torch.Tensor, req: torch.Tensor, kv_b: torch.Tensor, sc_b: torch.Tensor,
                 kv_state: torch.Tensor, score_state: torch.Tensor, slots: torch.Tensor, prefix_lens: torch.Tensor,
                 starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kv and score rows (all channels) of positions ``q`` [N, k] of requests ``req`` [N].

    Positions at or after the request's prefix come from this batch (kv_b, sc_b [T, C] fp32, bias added),
    earlier ones (negative ones too: the reset values) from the slot's ring at row ``q % S``. Returns two
    [N, k, C] fp32.
    """
    p0 = prefix_lens[req][:, None]
    from_batch = (q >= p0)[..., None]
    row = (starts[req][:, None] + q - p0).clamp(0, kv_b.shape[0] - 1)
    srow = q % kv_state.shape[1]  # torch's % of a negative int is >= 0 (floor division)
    slot = slots[req][:, None].expand_as(q)
    kv = torch.where(from_batch, kv_b[row], kv_state[slot, srow])
    sc = torch.where(from_batch, sc_b[row], score_state[slot, srow])
    return kv, sc


def compress_update(
    kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    inv_freq: torch.Tensor, quant: str | None, positions: torch.Tensor, slots: torch.Tensor,
    prefix_lens: torch.Tensor, extend_lens: torch.Tensor, starts: torch.Tensor, kv_state: torch.Tensor,
    score_state: torch.Tensor, pool: torch.Tensor, table: torch.Tensor,
) -> None:
    """Feed a flat batch of tokens to one compressor: emit every window they close, keep the new tails.

    kv, score: [T, c*d] the wkv / wgate projections (fp32 as the official code, or bf16; pooled in fp32);
    ape: [m, c*d] fp32 position-in-window bias; norm_weight: [d] fp32; inv_freq: [rd/2] fp32; quant: None,
    "fp8" or "fp4" (:func:`finish_entries`). The batch (``ForwardBatch`` tensors, int64): positions [T];
    slots, prefix_lens, extend_lens, starts [R] (requests back to back, each with at least one token).
    kv_state, score_state: [slots, S, c*d] fp32 tails (rings of S >= c*m rows, layout above), updated in
    place; pool: [pages, page_size, d]; table: [slots, max_pages] int64. c = 2 (CSA, overlapping windows) when kv has 2d channels, else 1.
    """
    t, r = positions.shape[0], slots.shape[0]
    m, d, ch, ring = ape.shape[0], norm_weight.shape[0], kv.shape[1], kv_state.shape[1]
    overlap = ch == 2 * d
    if ring < (1 + overlap) * m:
        raise ValueError(f"the compressor tails need at least {(1 + overlap) * m} rows per slot, got {ring}")
    req = torch.repeat_interleave(torch.arange(r, device=positions.device), extend_lens, output_size=t)
    kv_b = kv.float()
    sc_b = score.float() + ape[positions % m]
    rows = (kv_b, sc_b, kv_state, score_state, slots, prefix_lens, starts)

    # windows closing in this batch: at most T // m + R of them, found without a host sync
    closing = (positions + 1) % m == 0
    cand = torch.argsort((~closing).to(torch.int8), stable=True)[: min(t, t // m + r)]
    valid, wreq = closing[cand], req[cand]
    start = positions[cand] + 1 - m
    j = torch.arange(m, device=positions.device)
    cur_kv, cur_sc = _gather_rows(start[:, None] + j, wreq, *rows)
    if overlap:
        prev_kv, prev_sc = _gather_rows(start[:, None] - m + j, wreq, *rows)
        pooled = pool_windows(torch.cat((prev_kv[..., :d], cur_kv[..., d:]), 1),
                              torch.cat((prev_sc[..., :d], cur_sc[..., d:]), 1))
    else:
        pooled = pool_windows(cur_kv, cur_sc)
    entries = finish_entries(pooled.to(pool.dtype), start, norm_weight, eps, inv_freq, quant)
    store_entries(pool, table, slots[wreq], start.div(m, rounding_mode="floor"), entries, valid)

    # new tails, after every read: each request's last min(S, n) positions at row (position % S)
    end = (prefix_lens + extend_lens)[req]
    keep = positions >= end - ring
    dest = slots[req] * ring + positions % ring
    write_rows(kv_state.view(-1, ch), dest, kv_b, keep)
    write_rows(score_state.view(-1, ch), dest, sc_b, keep)
