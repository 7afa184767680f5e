"""MTP speculative decoding: the NextN block drafts ``k`` tokens, the target verifies them in its next step.

One engine step with speculation (see :meth:`dsv4.engine.engine_core.EngineCore.step`):

1. The target runs every scheduled chunk; a decoding request's chunk is its last sampled token followed by
   its drafts ``d1..dn`` (the verify), and every row of it gets logits.
2. Each verify row is sampled as a plain decode row would be (greedy or the request's own sampling); the
   drafts are accepted while they equal those samples, and the first sample that differs (or the one after
   the last draft: the bonus) ends the step. With a greedy draft (a point mass) this is exactly rejection
   sampling: ``d`` is accepted with probability ``p(d)`` and a rejection draws from ``p`` without ``d``, so
   the output distribution is the target's (:func:`accept_prefix`).
3. The MTP block catches up on every target row whose next token is now known (prompt rows, accepted rows)
   - it pairs the target's final streams at position ``p`` with the token at ``p + 1`` - and drafts from
   the last of them; ``k - 1`` more chained steps feed it its own streams and drafts.

Caches stay exact without copies: a verify writes rows for positions past what is accepted, and those
positions are written again, with the accepted tokens, before anything reads them. The window ring has
``k + 1`` rows of slack so a rejected row never overwrites a row still in some query's window, and the
compressor tails are indexed by position (``dsv4/cache/model_cache.py``) for the same reason. A compressed
entry (or indexer key) that a rejected row closes is only read by queries past that row, so it is rewritten
first too; its page may not be reserved yet, and then the page table's 0 sends it to the dummy page.

Under CUDA graphs every request of a decoding batch is padded to ``k + 1`` rows (``EngineCore._verify_rows``):
one with fewer drafts (near ``max_tokens``, or none at all) repeats its last token at the positions after
its drafts. Those rows are rejected drafts by construction: the same positions ``p + 1 .. p + k`` a verify
of ``k`` drafts may leave behind, so the argument above covers them; their logits are dropped before
sampling. A request whose padding would pass the context limit (``num_cached + k >= max_model_len``) sends
the step eager.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from dsv4.engine.forward_batch import ForwardBatch
from dsv4.ops import sampling
from dsv4.ops.dispatch import triton_available


def greedy_for(device: torch.device):
    """The draft's argmax for logits on ``device``: on CUDA the Triton kernel (one or two launches; the reference
    takes seven full passes over the vocabulary, and a draft step runs it once per chained step), else the
    reference. Both take ties to the lowest index."""
    if device.type == "cuda" and triton_available():
        from dsv4.ops import sampling_triton

        return sampling_triton.greedy
    return sampling.greedy


def accept_prefix(samples: list[int], drafts: list[int]) -> int:
    """How many drafts are accepted: the longest prefix with ``drafts[i] == samples[i]``. The emitted tokens
    are ``samples[: accepted + 1]`` (accepted drafts, then the correction or the bonus token)."""
    n = 0
    while n < len(drafts) and drafts[n] == samples[n]:
        n += 1
    return n


@dataclass
class CatchUp:
    """One request's rows for the MTP block after a target step: target rows ``rows`` (flat indices into the
    target batch) at positions ``start..``, paired with ``next_ids`` (the token after each row), and how many
    tokens to draft from the last row (0: none, e.g. a prefill chunk that did not finish its prompt)."""

    slot: int
    start: int
    rows: list[int]
    next_ids: list[int]
    num_drafts: int


@dataclass
class SpecStats:
    """Acceptance counters: verifies run, drafts proposed and accepted, histogram of accepted per verify."""

    verifies: int = 0
    proposed: int = 0
    accepted: int = 0
    histogram: list[int] = field(default_factory=list)

    def add(self, proposed: int, accepted: int) -> None:
        self.verifies += 1
        self.proposed += proposed
        self.accepted += accepted
        while len(self.histogram) <= accepted:
            self.histogram.append(0)
        self.histogram[accepted] += 1

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify (accepted drafts + the one sampled token)."""
        return 1 + self.accepted / self.verifies if self.verifies else 0.0


class MTPDrafter:
    """Runs the model's MTP block (depth 0, reused for every chained step as DeepSeek does) over catch-up
    rows and drafts greedily.

    ``graphs`` (a :class:`dsv4.engine.draft_graph.DraftGraphRunner`, or None) replays the steps it fits: every
    item with 1..k+1 catch-up rows (each decoding step). The rest (a prompt chunk in the batch) run eagerly;
    either way the drafts stay on the device until one read at the end.
    """

    def __init__(self, model, cache, num_steps: int, device: torch.device, graphs=None) -> None:
        self.model, self.cache, self.k, self.device = model, cache, num_steps, device
        self.graphs = graphs
        self.greedy = greedy_for(torch.device(device))

    @torch.no_grad()
    def draft(self, streams: torch.Tensor, items: list[CatchUp]) -> list[list[int]]:
        """streams: the target's final streams [T, hc, D] of the step. Returns each item's drafts."""
        if not items:
            return []
        if self.graphs is not None and self.graphs.can_run(items):
            return self.graphs.run(streams, items)
        return self._draft_eager(streams, items)

    def _draft_eager(self, streams: torch.Tensor, items: list[CatchUp]) -> list[list[int]]:
        rows = torch.tensor([r for it in items for r in it.rows], dtype=torch.int64, device=streams.device)
        batch = ForwardBatch.build([it.slot for it in items], [it.start for it in items],
                                   [it.next_ids for it in items], device=self.device,
                                   need_logits=[it.num_drafts > 0 for it in items])
        h = self.model.forward_mtp(batch, self.cache, streams[rows])
        live = [i for i, it in enumerate(items) if it.num_drafts > 0]
        if not live:
            return [[] for _ in items]
        h_last = h[batch.logits_rows]
        toks = [self.greedy(self.model.mtp_logits(h_last))]
        steps = max(items[i].num_drafts for i in live)
        if steps > 1:
            # one chained batch, moved one position per step on the device: no host read until the end
            pos = [items[i].start + len(items[i].rows) for i in live]  # position of the next chained row
            chain = ForwardBatch.build([items[i].slot for i in live], pos, [[0] for _ in live], device=self.device)
            for step in range(1, steps):
                at = chain.positions + (step - 1)
                h_last = self.model.forward_mtp(
                    replace(chain, input_ids=toks[-1], positions=at, prefix_lens=at,
                            prefix_lens_cpu=[p + step - 1 for p in pos]), self.cache, h_last)
                toks.append(self.greedy(self.model.mtp_logits(h_last)))
        drafted = torch.stack(toks, dim=1).tolist()  # [live, steps]: the one host read
        out: list[list[int]] = [[] for _ in items]
        for j, i in enumerate(live):
            out[i] = drafted[j][: items[i].num_drafts]
        return out
