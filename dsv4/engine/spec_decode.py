"""MTP speculative decoding: the NextN block drafts ``k`` tokens, the target verifies them in its next step.

One engine step with speculation (:meth:`dsv4.engine.engine_core.EngineCore._spec_step`):

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
of ``k`` drafts may leave behind, so the argument above covers them; their samples are never emitted
(acceptance stops at a request's last draft). A request whose padding would pass the context limit
(``num_cached + k >= max_model_len``) sends the step eager.

Host traffic of a step with drafts: the drafts never reach the host. The drafter writes them into ``table``
[slots, k] on the device; ``req.drafts`` holds placeholders of the right length (the scheduler only needs
the count), and :func:`plan_verify` lists which batch rows the table fills (``draft_dst``/``draft_src``). The
batch goes up in one pinned non-blocking copy (:func:`batch_to_device`); acceptance runs on the device
(:func:`accept_on_device`: each request's samples against the drafts it was fed, accepted length by cumprod);
one device-to-host read (:func:`read_host`) brings back, per request, the accepted count and the samples, of
which the first ``accepted + 1`` are emitted. The draft step at the end of the engine step then launches with
no read, so it runs on the GPU while the host plans the next step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from dsv4.engine.forward_batch import ForwardBatch
from dsv4.engine.sampler import to_device
from dsv4.ops import sampling
from dsv4.ops.dispatch import triton_available

DRAFT_PLACEHOLDER = 0  # what req.drafts holds on the host: the real drafts are in MTPDrafter.table


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


_TENSORS = ("input_ids", "positions", "slots", "prefix_lens", "extend_lens", "starts", "logits_rows")


def batch_to_device(slots: list[int], prefix_lens: list[int], token_ids: list[list[int]], device: torch.device | str,
                    extra: list[list[int]] = (), **kw) -> tuple[ForwardBatch, list[torch.Tensor]]:
    """``ForwardBatch.build(slots, prefix_lens, token_ids, device=device, **kw)``, and ``extra`` int64 lists beside
    it, in one pinned non-blocking copy (:func:`dsv4.engine.sampler.to_device`): ``build`` on the device makes a
    blocking copy (a stream sync) per tensor. ``build`` runs on the meta device for its checks and host layout."""
    fb = ForwardBatch.build(slots, prefix_lens, token_ids, device="meta", **kw)
    ids = [t for c in token_ids for t in c]
    pos = [p + j for p, c in zip(prefix_lens, token_ids, strict=True) for j in range(len(c))]
    parts = [ids, pos, fb.slots_cpu, fb.prefix_lens_cpu, fb.extend_lens_cpu, fb.starts_cpu, fb.logits_rows_cpu,
             *extra]
    flat = to_device([v for p in parts for v in p], device)
    views = list(flat.split([len(p) for p in parts]))
    return replace(fb, **dict(zip(_TENSORS, views, strict=False))), views[len(_TENSORS):]


@dataclass
class VerifyPlan:
    """Host index lists of one target step with a drafter (:func:`plan_verify`): ``draft_dst`` the batch token
    rows fed a draft and ``draft_src`` where it is in the drafter's flat table; per sampled request (``reqs``:
    indices into the scheduled batch) ``rows`` its ``k + 1`` logits rows (its last repeated), ``nexts`` the ``k``
    token rows fed after its first ``k`` logits rows (its drafts, clamped to its chunk), ``live`` 1 where that
    draft exists."""

    reqs: list[int]
    draft_dst: list[int]
    draft_src: list[int]
    rows: list[int]
    nexts: list[int]
    live: list[int]

    def lists(self) -> list[list[int]]:
        return [self.draft_dst, self.draft_src, self.rows, self.nexts, self.live]


def plan_verify(slots: list[int], chunks: list[list[int]], sample: list[bool], drafts: list[list[int]],
                starts: list[int], k: int, pad: int) -> VerifyPlan:
    """The plan of a scheduled batch (``chunks`` unpadded, ``starts`` the batch's request offsets) whose logits
    rows are ``pad`` per request (the padded verify graph layout) or, with ``pad`` 0, one per sampled request
    plus one per draft, in order (ForwardBatch.build with ``need_logits=sample``, ``all_logits`` where drafts)."""
    plan = VerifyPlan([], [], [], [], [], [])
    row = 0
    for i, (slot, c, want, d, s) in enumerate(zip(slots, chunks, sample, drafts, starts, strict=True)):
        nd, first = len(d), s + len(c) - 1 - len(d)  # first: the token row whose logits sample the first token
        for ci in range(len(c) - nd, max(len(c), pad) if nd else 0):  # drafts, and padding repeating the last
            plan.draft_dst.append(s + ci)
            plan.draft_src.append(slot * k + min(ci - (len(c) - nd), nd - 1))
        if not want:
            continue
        plan.reqs.append(i)
        plan.rows += [row + min(j, nd) for j in range(k + 1)]
        plan.nexts += [min(first + 1 + j, s + len(c) - 1) for j in range(k)]
        plan.live += [int(j < nd) for j in range(k)]
        row += pad or 1 + nd
    return plan


def accept_on_device(samples: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor, nexts: torch.Tensor,
                     live: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy acceptance without the host: ``samples`` [L] (one per logits row), the plan's index tensors.
    Returns [R, k + 2] int64: per sampled request the accepted drafts (longest prefix whose sample equals the
    draft fed after it), then its k + 1 samples; it emits the first ``accepted + 1`` of them."""
    s = samples.to(torch.int64)[rows].view(-1, k + 1)
    match = (s[:, :k] == input_ids[nexts].view(-1, k)) * live.view(-1, k)  # bool x int64: int64
    return torch.cat([match.cumprod(1).sum(1, keepdim=True), s], 1)


def read_host(t: torch.Tensor) -> list:
    """``t.tolist()`` through a pinned buffer and one event wait: the step's one device-to-host sync."""
    if t.device.type != "cuda":
        return t.tolist()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return host.tolist()


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
    rows and drafts greedily into ``table`` [slots, k] on the device (:meth:`propose`; the host never reads it).

    ``graphs`` (a :class:`dsv4.engine.draft_graph.DraftGraphRunner`, or None) replays the steps it fits: every
    item with 1..k+1 catch-up rows (each decoding step), the catch-up and all k chained steps in one graph. The
    rest (a prompt chunk in the batch) run eagerly.
    """

    def __init__(self, model, cache, num_steps: int, device: torch.device, graphs=None) -> None:
        self.model, self.cache, self.k, self.device = model, cache, num_steps, device
        self.graphs = graphs
        self.greedy = greedy_for(torch.device(device))
        self.table = torch.zeros(cache.num_slots, num_steps, dtype=torch.int64, device=device)

    @torch.no_grad()
    def propose(self, streams: torch.Tensor, items: list[CatchUp]) -> None:
        """Draft for ``items`` from the target's final streams [T, hc, D] of the step; item i's drafts go to
        ``table[items[i].slot]`` (its first ``num_drafts`` entries are meaningful). No host sync."""
        if items:
            drafts = self.draft(streams, items)
            self.table.index_copy_(0, to_device([it.slot for it in items], self.table.device), drafts)

    @torch.no_grad()
    def draft(self, streams: torch.Tensor, items: list[CatchUp]) -> torch.Tensor:
        """Each item's drafts: [len(items), k] int64 on the device (row i's first ``num_drafts`` entries)."""
        if self.graphs is not None and self.graphs.can_run(items):
            return self.graphs.run(streams, items)
        return self._draft_eager(streams, items)

    def _draft_eager(self, streams: torch.Tensor, items: list[CatchUp]) -> torch.Tensor:
        dev = streams.device
        out = torch.zeros(len(items), self.k, dtype=torch.int64, device=dev)
        live = [i for i, it in enumerate(items) if it.num_drafts > 0]
        batch, (rows,) = batch_to_device([it.slot for it in items], [it.start for it in items],
                                         [it.next_ids for it in items], self.device,
                                         [[r for it in items for r in it.rows]],
                                         need_logits=[it.num_drafts > 0 for it in items])
        if not live:  # the catch-up only writes the window cache
            self.model.forward_mtp(batch, self.cache, streams[rows])
            return out
        h_last = self.model.forward_mtp(batch, self.cache, streams[rows], rows=batch.logits_rows)
        toks = [self.greedy(self.model.mtp_logits(h_last))]
        steps = max(items[i].num_drafts for i in live)
        if steps > 1:
            # one chained batch, moved one position per step on the device
            pos = [items[i].start + len(items[i].rows) for i in live]  # position of the next chained row
            chain, _ = batch_to_device([items[i].slot for i in live], pos, [[0] for _ in live], self.device)
            for step in range(1, steps):
                at = chain.positions + (step - 1)
                h_last = self.model.forward_mtp(
                    replace(chain, input_ids=toks[-1], positions=at, prefix_lens=at,
                            prefix_lens_cpu=[p + step - 1 for p in pos]), self.cache, h_last)
                toks.append(self.greedy(self.model.mtp_logits(h_last)))
        drafted = torch.stack([t.to(torch.int64) for t in toks], dim=1)  # [live, steps]
        out[:, :steps].index_copy_(0, to_device(live, dev), drafted)
        return out
