"""Vocabulary-parallel embedding and LM head: each tensor-parallel rank holds a contiguous block of rows.

The vocabulary is padded to ``tp * shard`` rows (``shard = ceil(V / tp)``); the padding rows of the last rank
stay zero and their logits are cut off after the gather. At ``tp == 1`` the factories return the plain
``nn.Embedding`` / ``nn.Linear`` the single-process model always had.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.distributed.comm import all_gather, all_reduce
from dsv4.distributed.parallel import Group, Parallel
from dsv4.ops.mm_fp32 import mm_fp32


def vocab_shard(vocab: int, group: Group) -> tuple[int, int]:
    """(first row, rows per rank) of this rank's block of the padded vocabulary."""
    shard = -(-vocab // group.size)
    return group.rank * shard, shard


class VocabParallelEmbedding(nn.Module):
    """``weight`` [shard, D] in ``dtype``: rows ``start .. start+shard-1`` of the embedding (zero past V)."""

    def __init__(self, vocab: int, dim: int, dtype: torch.dtype, group: Group) -> None:
        super().__init__()
        self.group = group
        self.start, self.shard = vocab_shard(vocab, group)
        self.weight = nn.Parameter(torch.zeros(self.shard, dim, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] int64 -> [T, D]: each id's row from the rank that holds it, zeros elsewhere, summed (exact)."""
        local = ids - self.start
        mine = (local >= 0) & (local < self.shard)
        y = F.embedding(torch.where(mine, local, 0), self.weight).masked_fill(~mine.unsqueeze(-1), 0)
        return all_reduce(y, self.group)


class LMHead(nn.Module):
    """The official fp32 head (``logits = x.float() @ head.float()^T``, DSV4_SPEC 4.9) with ``weight`` [V, D] held
    in the model dtype: the checkpoint stores it bf16 and the input is the final norm's bf16 output, so the fp32
    GEMM of the upcast operands equals a bf16 GEMM accumulating in fp32 (:func:`~dsv4.ops.mm_fp32.mm_fp32`), which
    reads half the bytes of an fp32 copy (2.1 -> 1.06 GB at V4's vocabulary, the largest read of a decode step)."""

    def __init__(self, dim: int, vocab: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab, dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [L, D] (the final norm's output, any float dtype) -> logits [L, V] fp32."""
        return mm_fp32(x, self.weight)


class VocabParallelHead(LMHead):
    """This rank's ``weight`` [shard, D] rows of :class:`LMHead`; the logits are gathered over the group."""

    def __init__(self, dim: int, vocab: int, dtype: torch.dtype, group: Group) -> None:
        _, shard = vocab_shard(vocab, group)
        super().__init__(dim, shard, dtype)
        self.group, self.vocab = group, vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [L, D] -> logits [L, V] fp32 (every rank gets all of them)."""
        logits = all_gather(super().forward(x), self.group, dim=-1)
        return logits if logits.shape[-1] == self.vocab else logits[:, : self.vocab].contiguous()


def vocab_embedding(vocab: int, dim: int, dtype: torch.dtype, par: Parallel) -> nn.Module:
    """The token embedding: ``nn.Embedding`` at tp 1, else :class:`VocabParallelEmbedding` (``weight`` either way)."""
    if par.tp_size > 1:
        return VocabParallelEmbedding(vocab, dim, dtype, par.tp)
    emb = nn.Embedding(vocab, dim, dtype=dtype)
    emb.weight.requires_grad_(False)
    return emb


def vocab_head(dim: int, vocab: int, dtype: torch.dtype, par: Parallel) -> nn.Module:
    """The LM head (fp32 math, ``dtype`` weights): :class:`LMHead` at tp 1, else :class:`VocabParallelHead`."""
    if par.tp_size > 1:
        return VocabParallelHead(dim, vocab, dtype, par.tp)
    return LMHead(dim, vocab, dtype)
