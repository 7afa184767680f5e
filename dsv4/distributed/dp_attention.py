"""Data-parallel attention (``--enable-dp-attention --dp-size D``): D attention groups, each running only its
own requests and holding only their caches (window rings, compressor tails, paged pools); the MoE stays
expert parallel over every rank.

Design. The ranks form D attention groups of ``A = world / D`` consecutive ranks (tensor parallel inside a
group, as without DP). Rank 0 still tokenizes, schedules, samples and serves, and is the only process that
decides anything:

* caches: rank 0 holds one :class:`~dsv4.distributed.cache_mirror.MirroredCacheManager` per group (its own
  group's over its real cache, the others' over a :func:`shadow_cache`: the same slot and page bookkeeping
  without tensors). :class:`DPCacheManager` puts them behind the one-manager interface the scheduler uses:
  a global slot ``d * S + s`` is slot ``s`` of group ``d``; a new request goes to the group with the fewest
  requests among those whose pages fit it. Each group's ranks replay that group's recorded calls, so every
  rank's manager hands out what rank 0's copy of it did.
* a step: the engine builds one batch over global slots; :func:`drive` splits it by group (a group without
  requests runs one padding token on its withheld slot, so every rank enters every collective), sends every
  group its batch with the per-group token and logits-row counts (dsv4/distributed/batch_sync.py), and runs
  group 0's. Every rank runs its own batch (:func:`run_group`); in each MoE layer the groups' rows, padded to
  the step's largest group, are all-gathered, routed and run through this rank's experts, and the summed
  output scattered back (dsv4/distributed/moe.py). The counts are host values of the step, so no rank syncs.
* logits: every group's first rank computes the logits of its own rows only; rank 0 gathers them (padded to
  the largest count) and puts them back in the batch's row order, so the engine samples as with one process.

* CUDA graphs (decode steps): every rank captures the same decode buckets, each with the MoE gathering that
  bucket's rows from every group (:func:`graph_forward`). A step whose groups all decode (an idle group's padding
  token is a decode row) replays on every rank the smallest bucket that holds the largest group's requests;
  smaller groups pad up to it on their padding slot, as one process pads to its bucket. Prefill and mixed steps
  run eagerly. Rank 0 picks the bucket (:func:`graph_bucket`) and sends it with the step's counts.

MTP speculation is not supported under DP attention yet.
"""

from __future__ import annotations

import bisect
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from dsv4.cache.manager import CacheFullError, CacheManager, SlotSnapshot
from dsv4.distributed.batch_sync import send_batches
from dsv4.distributed.cache_mirror import MirroredCacheManager, Op
from dsv4.distributed.parallel import Parallel
from dsv4.engine.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from dsv4.engine.engine_config import EngineConfig
    from dsv4.engine.model_runner import ModelRunner


def slots_per_group(max_running_requests: int, dp_size: int) -> int:
    """Cache slots of one attention group: its share of --max-running-requests and one padding slot."""
    return -(-max_running_requests // dp_size) + 1


def graph_max_bs(cfg: EngineConfig) -> int:
    """Largest per-group decode batch replayed from a CUDA graph under DP attention (0: none): the one-process rule
    (CUDA, not --disable-cuda-graph, --cuda-graph-max-bs or 256) capped at one group's requests.
    ``EngineConfig.graph_max_bs`` answers 0 for DP attention; the model runner asks this instead."""
    if cfg.disable_cuda_graph or cfg.torch_device().type != "cuda":
        return 0
    return min(cfg.cuda_graph_max_bs or 256, slots_per_group(cfg.max_running_requests, cfg.attn_dp_size) - 1)


def shadow_cache(cache: Any) -> SimpleNamespace:
    """What a :class:`CacheManager` needs of another group's cache: its sizes and page tables on the meta device
    (writes cost nothing), no layers."""
    return SimpleNamespace(num_slots=cache.num_slots, num_pages=dict(cache.num_pages), page_size=cache.page_size,
                           max_seq_len=cache.max_seq_len, layers={},
                           page_tables={r: torch.empty(t.shape, dtype=t.dtype, device="meta")
                                        for r, t in cache.page_tables.items()})


def group_managers(par: Parallel, cache: Any) -> tuple[CacheManager, int]:
    """This rank's cache manager under DP attention and the padding slot (withheld in every group's manager):
    on rank 0 a :class:`DPCacheManager` over every group, elsewhere a plain manager that replays its group's
    calls."""
    if par.rank != 0:
        mgr = CacheManager(cache)
        return mgr, mgr.withhold_slot()
    managers = [MirroredCacheManager(cache if d == 0 else shadow_cache(cache)) for d in range(par.dp_size)]
    pads = {m.withhold_slot() for m in managers}
    assert len(pads) == 1
    return DPCacheManager(managers), pads.pop()


class DPCacheManager:
    """Rank 0's managers of every attention group as one (module doc): global slot ``d * S + s``."""

    def __init__(self, managers: list[MirroredCacheManager]) -> None:
        self.managers = managers
        self.per_group = managers[0].cache.num_slots
        first = managers[0].cache
        # what the scheduler reads of "the cache": every group's slots, one group's pages (a request's limit)
        self.cache = SimpleNamespace(num_slots=self.per_group * len(managers), num_pages=dict(first.num_pages),
                                     page_size=first.page_size, max_seq_len=first.max_seq_len)

    def _at(self, slot: int) -> tuple[MirroredCacheManager, int]:
        return self.managers[slot // self.per_group], slot % self.per_group

    def group_of(self, slot: int) -> int:
        return slot // self.per_group

    @property
    def num_free_slots(self) -> int:
        return sum(m.num_free_slots for m in self.managers)

    def pages_in_use(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for m in self.managers:
            for r, n in m.pages_in_use().items():
                out[r] = out.get(r, 0) + n
        return out

    def usage(self) -> dict[str, float]:
        total = sum(m.cache.num_slots - 1 for m in self.managers)  # the padding slots are never free
        out = {"slots": 1 - self.num_free_slots / max(1, total)}
        for r, used in sorted(self.pages_in_use().items()):
            out[f"compressed_kv_pages:{r}"] = used / max(1, len(self.managers) * (self.cache.num_pages[r] - 1))
        return out

    def extra_pages(self, slot: int | None, total_tokens: int) -> dict[int, int]:
        if slot is None:
            return self.managers[0].extra_pages(None, total_tokens)
        m, s = self._at(slot)
        return m.extra_pages(s, total_tokens)

    def can_fit(self, slot: int | None, total_tokens: int) -> bool:
        if slot is None:
            return any(m.can_fit(None, total_tokens) for m in self.managers)
        m, s = self._at(slot)
        return m.can_fit(s, total_tokens)

    def shares_pool(self, a: int, b: int) -> bool:
        return a // self.per_group == b // self.per_group

    def alloc(self, fit_tokens: int = 0) -> int:
        """A slot in the group with the fewest requests (then the most free pages) that fits ``fit_tokens``."""
        fits = [d for d, m in enumerate(self.managers) if m.can_fit(None, fit_tokens)]
        if not fits:
            raise CacheFullError(f"no attention group has a free slot and pages for {fit_tokens} tokens")
        d = min(fits, key=lambda d: (len(self.managers[d].slot_pages),
                                     -sum(len(f) for f in self.managers[d].free_pages.values()), d))
        return d * self.per_group + self.managers[d].alloc(fit_tokens)

    def reserve(self, slot: int, total_tokens: int) -> None:
        m, s = self._at(slot)
        m.reserve(s, total_tokens)

    def free(self, slot: int) -> None:
        m, s = self._at(slot)
        m.free(s)

    def withhold_slot(self) -> int:
        raise NotImplementedError("every group withholds its padding slot already (group_managers)")

    def snapshot(self, slot: int) -> SlotSnapshot:
        raise NotImplementedError("cache snapshots are not mirrored to the other ranks yet")

    def restore(self, slot: int, snap: SlotSnapshot) -> None:
        raise NotImplementedError("cache snapshots are not mirrored to the other ranks yet")

    def take_ops(self) -> list[list[Op]]:
        return [m.take_ops() for m in self.managers]


def split(batch: ForwardBatch, per_group: int, dp_size: int, pad_slot: int) -> tuple[list[ForwardBatch], list[int]]:
    """Batch over global slots -> one batch per attention group (local slots; a padding token on ``pad_slot``
    for a group without requests) and, for each logits row of ``batch`` in order, its index in the groups'
    rows laid end to end (group ``d``'s rows at ``d * L``, ``L`` the largest group's count)."""
    dev = batch.input_ids.device
    rows_cpu = batch.logits_rows_cpu if batch.logits_rows_cpu is not None else batch.logits_rows.tolist()
    parts: list[dict[str, list[int]]] = [{"tok": [], "pos": [], "slot": [], "pre": [], "ext": [], "start": [],
                                          "rows": []} for _ in range(dp_size)]
    where: list[tuple[int, int]] = []  # (group, row within the group's logits) per logits row
    for slot, pre, ext, start in zip(batch.slots_cpu, batch.prefix_lens_cpu, batch.extend_lens_cpu, batch.starts_cpu,
                                     strict=True):
        p = parts[slot // per_group]
        off = len(p["tok"])
        p["slot"].append(slot % per_group)
        p["pre"].append(pre)
        p["ext"].append(ext)
        p["start"].append(off)
        p["tok"].extend(range(start, start + ext))
        p["pos"].extend(range(pre, pre + ext))
        lo, hi = bisect.bisect_left(rows_cpu, start), bisect.bisect_left(rows_cpu, start + ext)
        for row in rows_cpu[lo:hi]:
            where.append((slot // per_group, len(p["rows"])))
            p["rows"].append(row - start + off)

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int64, device=dev)

    out = []
    for p in parts:
        if not p["slot"]:
            out.append(ForwardBatch.build([pad_slot], [0], [[0]], need_logits=[False], device=dev))
            continue
        mode = ForwardMode.DECODE if all(n == 1 for n in p["ext"]) else ForwardMode.EXTEND
        out.append(ForwardBatch(mode=mode, input_ids=batch.input_ids[t(p["tok"])], positions=t(p["pos"]),
                                slots=t(p["slot"]), prefix_lens=t(p["pre"]), extend_lens=t(p["ext"]),
                                starts=t(p["start"]), logits_rows=t(p["rows"]), slots_cpu=p["slot"],
                                prefix_lens_cpu=p["pre"], extend_lens_cpu=p["ext"], starts_cpu=p["start"],
                                logits_rows_cpu=p["rows"]))
    most = max(len(p["rows"]) for p in parts)
    return out, [d * most + j for d, j in where]


def graph_forward(runner: ModelRunner, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward a decode graph captures (and off CUDA runs per replay): every group runs this bucket's rows."""
    runner.parallel.step.tokens = [batch.num_tokens] * runner.parallel.dp_size
    return runner._forward_eager(batch)


def graph_bucket(runner: ModelRunner, parts: list[ForwardBatch], logits: list[int]) -> int:
    """Rank 0: the decode bucket every rank replays for the groups' ``parts`` (``logits``: rows each wants), or
    0 to run the step eagerly (no graphs, a group that is not decoding, or more requests than the largest)."""
    graphs = runner.graphs
    if graphs is None:
        return 0
    if any(b.mode != ForwardMode.DECODE or n not in (0, b.num_tokens) for b, n in zip(parts, logits, strict=True)):
        return 0
    most = max(b.num_requests for b in parts)
    return next((bs for bs in graphs.buckets if bs >= most), 0)


def run_group(runner: ModelRunner, batch: ForwardBatch, extra: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank: run this group's ``batch`` with the step's counts (``extra``: "tokens" and "logits" per
    group; "graph_bs": the decode bucket every rank replays, 0 = eager); returns rank 0 the groups' logits rows
    end to end [D * L, V] (others get theirs), and the streams."""
    par = runner.parallel
    bs = extra.get("graph_bs", 0)
    if bs:
        logits, streams = runner.graphs.run(batch, bs=bs)  # type: ignore[union-attr]
        logits = logits[: extra["logits"][par.dp_rank]]  # an idle group's padding row wants none
    else:
        par.step.tokens = extra["tokens"]
        logits, streams = runner._forward_eager(batch)
    most = max(extra["logits"])
    if most == 0:
        return logits, streams
    if logits.shape[0] < most:  # padded to the step's largest count: one shape on every rank
        logits = torch.cat([logits, logits.new_zeros(most - logits.shape[0], logits.shape[1])])
    box = [torch.empty_like(logits) for _ in range(par.world_size)] if par.rank == 0 else None
    dist.gather(logits.contiguous(), box, dst=0, group=par.world.pg)
    if par.rank != 0:
        return logits, streams
    # each group's first rank: its other ranks hold the same logits (the vocabulary was gathered in the group)
    return torch.cat(box[:: par.tp_size]), streams  # type: ignore[index]


def drive(runner: ModelRunner, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0: one DP step (module doc). Returns the logits of ``batch.logits_rows`` [L, V] fp32, in order, and
    group 0's streams (rows of group 0's requests only; MTP is refused under parallelism)."""
    par, mgr = runner.parallel, runner.cache_manager
    parts, order = split(batch, mgr.per_group, par.dp_size, runner.dp_pad_slot)  # type: ignore[attr-defined]
    extra: dict[str, Any] = {"tokens": [b.num_tokens for b in parts],
                             "logits": [0 if b.logits_rows_cpu is None else len(b.logits_rows_cpu) for b in parts]}
    extra["graph_bs"] = graph_bucket(runner, parts, extra["logits"])
    send_batches(par, parts, mgr.take_ops(), extra)  # type: ignore[attr-defined]
    logits, streams = run_group(runner, parts[0], extra)
    if not order:
        return logits[:0], streams
    return logits[torch.tensor(order, dtype=torch.int64, device=logits.device)], streams
