"""One flat batch of tokens from many requests: what the model sees of the scheduler's work.

Every request contributes ``extend_len`` new tokens at positions ``prefix_len .. prefix_len+extend_len-1``
and owns one cache slot. ``extend`` is a prefill or a prefill chunk after any prefix; ``decode`` is one
token per request; ``verify`` checks ``next_n`` tokens per request (all rows need logits); ``draft`` runs the
MTP block. Requests of different lengths and kinds mix in one batch: the model runs one code path for all.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class ForwardMode(Enum):
    EXTEND = "extend"
    DECODE = "decode"
    VERIFY = "verify"
    DRAFT = "draft"


@dataclass
class ForwardBatch:
    """Flat token batch.

    Device tensors: ``input_ids`` [T] int64, ``positions`` [T] int64, ``slots`` / ``prefix_lens`` /
    ``extend_lens`` / ``starts`` [R] int64 (``starts`` = offset of each request's first token in the flat
    batch), ``logits_rows`` [L] int64 (token rows whose logits are wanted). Host mirrors (``*_cpu``) let the
    reference ops plan without syncing the device.
    """

    mode: ForwardMode
    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    prefix_lens: torch.Tensor
    extend_lens: torch.Tensor
    starts: torch.Tensor
    logits_rows: torch.Tensor
    slots_cpu: list[int]
    prefix_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    starts_cpu: list[int]
    logits_rows_cpu: list[int] | None = None  # host mirror of logits_rows where known (data-parallel split)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_requests(self) -> int:
        return len(self.slots_cpu)

    @classmethod
    def build(
        cls,
        slots: list[int],
        prefix_lens: list[int],
        token_ids: list[list[int]],
        mode: ForwardMode | None = None,
        all_logits: bool | list[bool] = False,
        device: torch.device | str = "cpu",
        need_logits: list[bool] | None = None,
    ) -> ForwardBatch:
        """Lay out requests back to back. ``token_ids[r]`` are request r's new tokens (at least one).

        Logits are returned for the last token of each request, or for every token when ``all_logits``
        (verify mode implies it; a list chooses per request: speculative verify rows beside prefill chunks). ``need_logits[r]`` False leaves request r out of ``logits_rows`` (a prefill
        chunk that does not finish its prompt samples nothing); None wants logits for every request.
        """
        if not (len(slots) == len(prefix_lens) == len(token_ids)) or not slots:
            raise ValueError("slots, prefix_lens and token_ids must be non-empty and of equal length")
        if need_logits is None:
            need_logits = [True] * len(slots)
        elif len(need_logits) != len(slots):
            raise ValueError("need_logits must have one entry per request")
        if any(len(t) == 0 for t in token_ids):
            raise ValueError("every request needs at least one new token")
        if len(set(slots)) != len(slots):
            raise ValueError("a cache slot appears twice in one batch")
        extend = [len(t) for t in token_ids]
        if mode is None:
            mode = ForwardMode.DECODE if all(n == 1 for n in extend) else ForwardMode.EXTEND
        if isinstance(all_logits, bool):
            all_logits = [all_logits or mode == ForwardMode.VERIFY] * len(slots)
        elif len(all_logits) != len(slots):
            raise ValueError("all_logits must be a bool or have one entry per request")
        starts, rows, ids, pos = [], [], [], []
        off = 0
        for p, t, want, every in zip(prefix_lens, token_ids, need_logits, all_logits, strict=True):
            starts.append(off)
            ids.extend(t)
            pos.extend(range(p, p + len(t)))
            if want:
                rows.extend(range(off, off + len(t)) if every else [off + len(t) - 1])
            off += len(t)

        def dev(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64, device=device)

        return cls(
            mode=mode, input_ids=dev(ids), positions=dev(pos), slots=dev(slots), prefix_lens=dev(prefix_lens),
            extend_lens=dev(extend), starts=dev(starts), logits_rows=dev(rows), slots_cpu=list(slots),
            prefix_lens_cpu=list(prefix_lens), extend_lens_cpu=extend, starts_cpu=starts, logits_rows_cpu=rows,
        )
