"""Triton kernels for token sampling (references: :mod:`dsv4.ops.sampling`).

``greedy``: argmax with ties to the lowest index, written into a preallocated integer buffer, no host sync.
Each program scans a contiguous chunk of one row in tiles of ``BLOCK`` lanes, keeping per lane the largest
value seen and its index (a later tile replaces a lane only when strictly larger, so each lane keeps its
earliest maximum); the chunk's answer is the smallest index among the lanes holding the chunk's maximum. A row
holding any NaN answers V-1, as the reference does (its max is NaN, equal to nothing, clamped to V-1). Small
batches split each row over several programs (a second tiny kernel reduces the per-chunk answers in chunk
order); batches that fill the GPU on their own take one program per row and write the answer directly.

``sample``: the reference's filters (one stable sort per row, no host sync) and its per-row generators (so a
seeded request draws the same tokens whatever else is in the batch) are kept as they are; the argmaxes (the
exponential race and the greedy rows) run on the kernel above, so the tokens equal the reference's exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops import sampling as ref

_BLOCK = 2048
_TARGET_PROGRAMS = 264  # about two programs per SM of an H100: enough chunks in flight to stream the logits


@triton.jit
def _chunk_argmax(ptr, start, end, BLOCK: tl.constexpr):
    """(max, first index of it, any NaN) over ``ptr[start:end]`` (end > start), fp32 / int32 / int1."""
    lanes = tl.arange(0, BLOCK)
    offs = start + lanes
    ok = offs < end
    x = tl.load(ptr + offs, mask=ok, other=float("-inf")).to(tl.float32)
    nan = x != x
    best = tl.where(nan, float("-inf"), x)
    # a lane outside the chunk must never win, even on a row of -inf: its index is past every real one
    idx = tl.where(ok, offs, 2147483647)
    for s in range(start + BLOCK, end, BLOCK):
        offs = s + lanes
        ok = offs < end
        x = tl.load(ptr + offs, mask=ok, other=float("-inf")).to(tl.float32)
        is_nan = x != x
        nan = nan | is_nan
        better = (x > best) & ~is_nan
        best = tl.where(better, x, best)
        idx = tl.where(better, offs, idx)
    m = tl.max(best, axis=0)
    first = tl.min(tl.where(best == m, idx, 2147483647), axis=0)
    return m, first, tl.max(nan.to(tl.int32), axis=0) > 0


@triton.jit
def _greedy_kernel(logits_ptr, out_ptr, part_v_ptr, part_i_ptr, V, stride, chunk, SPLIT: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Program (row, c) scans logits[row, c*chunk : (c+1)*chunk]; SPLIT writes the partial answer (NaN for a
    chunk holding a NaN), else the final id."""
    row = tl.program_id(0)
    c = tl.program_id(1)
    start = c * chunk
    end = tl.minimum(start + chunk, V)
    m, first, nan = _chunk_argmax(logits_ptr + row.to(tl.int64) * stride, start, end, BLOCK)
    if SPLIT:
        tl.store(part_v_ptr + row * tl.num_programs(1) + c, tl.where(nan, float("nan"), m))
        tl.store(part_i_ptr + row * tl.num_programs(1) + c, first)
    else:
        tl.store(out_ptr + row, tl.where(nan, V - 1, first).to(out_ptr.dtype.element_ty))


@triton.jit
def _greedy_reduce_kernel(part_v_ptr, part_i_ptr, out_ptr, V, NSPLIT, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    ok = s < NSPLIT
    v = tl.load(part_v_ptr + row * NSPLIT + s, mask=ok, other=float("-inf"))
    i = tl.load(part_i_ptr + row * NSPLIT + s, mask=ok, other=2147483647)
    nan = tl.max((v != v).to(tl.int32), axis=0) > 0
    v = tl.where(v != v, float("-inf"), v)
    m = tl.max(v, axis=0)
    first = tl.min(tl.where(ok & (v == m), i, 2147483647), axis=0)
    tl.store(out_ptr + row, tl.where(nan, V - 1, first).to(out_ptr.dtype.element_ty))


def _split(r: int, v: int) -> tuple[int, int]:
    """(chunk length, number of chunks) for r rows of v: whole rows once r alone fills the GPU."""
    tiles = triton.cdiv(v, _BLOCK)
    per = triton.cdiv(tiles, max(1, min(tiles, triton.cdiv(_TARGET_PROGRAMS, max(r, 1)))))
    return per * _BLOCK, triton.cdiv(tiles, per)


def greedy(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Kernel for :func:`dsv4.ops.sampling.greedy`: logits [R, V] (fp32/bf16/fp16, rows contiguous) -> ids [R]
    written into ``out`` (int32 or int64) when given, else a new int64 tensor."""
    r, v = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if out is None:
        out = torch.empty(r, dtype=torch.int64, device=logits.device)
    if r == 0:
        return out
    chunk, nsplit = _split(r, v)
    if nsplit == 1:
        _greedy_kernel[(r, 1)](logits, out, out, out, v, logits.stride(0), chunk, SPLIT=False, BLOCK=_BLOCK,
                               num_warps=8)
        return out
    part_v = torch.empty((r, nsplit), dtype=torch.float32, device=logits.device)
    part_i = torch.empty((r, nsplit), dtype=torch.int32, device=logits.device)
    _greedy_kernel[(r, nsplit)](logits, out, part_v, part_i, v, logits.stride(0), chunk, SPLIT=True,
                                BLOCK=_BLOCK, num_warps=8)
    _greedy_reduce_kernel[(r,)](part_v, part_i, out, v, nsplit, BLOCK_S=triton.next_power_of_2(nsplit),
                                num_warps=1)
    return out


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Kernel-backed :func:`dsv4.ops.sampling.sample` (same arguments, same tokens): the reference's filters and
    per-request noise, with this module's argmax kernel. [R] int64 token ids."""
    return ref.sample(logits, temperature, top_k, top_p, min_p, generators, argmax=greedy)
