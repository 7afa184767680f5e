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


class VocabParallelHead(nn.Module):
    """``weight`` [shard, D] fp32: this rank's rows of the LM head; the logits are gathered over the group."""

    def __init__(self, dim: int, vocab: int, group: Group) -> None:
        super().__init__()
        self.group, self.vocab = group, vocab
        _, shard = vocab_shard(vocab, group)
        self.weight = nn.Parameter(torch.zeros(shard, dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [L, D] fp32 -> logits [L, V] fp32 (every rank gets all of them)."""
        logits = all_gather(F.linear(x, self.weight), self.group, dim=-1)
        return logits if logits.shape[-1] == self.vocab else logits[:, : self.vocab].contiguous()


def vocab_embedding(vocab: int, dim: int, dtype: torch.dtype, par: Parallel) -> nn.Module:
    """The token embedding: ``nn.Embedding`` at tp 1, else :class:`VocabParallelEmbedding` (``weight`` either way)."""
    if par.tp_size > 1:
        return VocabParallelEmbedding(vocab, dim, dtype, par.tp)
    emb = nn.Embedding(vocab, dim, dtype=dtype)
    emb.weight.requires_grad_(False)
    return emb


def vocab_head(dim: int, vocab: int, par: Parallel) -> nn.Module:
    """The fp32 LM head: ``nn.Linear`` at tp 1 (the official head runs in fp32), else :class:`VocabParallelHead`."""
    if par.tp_size > 1:
        return VocabParallelHead(dim, vocab, par.tp)
    head = nn.Linear(dim, vocab, bias=False, dtype=torch.float32)
    head.weight.requires_grad_(False)
    return head
