"""The synchronous engine: requests in, one forward + sampling per :meth:`EngineCore.step`, deltas out.

``EngineCore`` owns the model runner (model + caches), the tokenizer and the :class:`Scheduler`. It is not
thread-safe: :class:`~dsv4.engine.llm.LLM` drives it in a loop, :class:`~dsv4.engine.async_engine.AsyncEngine`
from its one engine thread.

Failures: a request whose sampling or stop handling raises is finished with ``finish_reason="abort"`` and
the error in its delta; the others go on. A forward that raises leaves every cache in doubt, so every
request is aborted (their final deltas come from the next ``step``) and the exception propagates.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path

import torch

from dsv4.config import ModelConfig
from dsv4.engine.draft_graph import DraftGraphRunner
from dsv4.engine.engine_config import EngineConfig
from dsv4.engine.forward_batch import ForwardBatch, ForwardMode
from dsv4.engine.model_runner import ModelRunner
from dsv4.engine.outputs import FINISH_REASONS, EngineStats, RequestDelta
from dsv4.engine.request import Request
from dsv4.engine.sampler import Sampled, request_generator, sample_ids, sample_isolated
from dsv4.engine.sampling_params import SamplingParams, stop_ids_for
from dsv4.engine.scheduler import ScheduledBatch, Scheduler
from dsv4.engine.spec_decode import (
    DRAFT_PLACEHOLDER,
    CatchUp,
    MTPDrafter,
    SpecStats,
    VerifyPlan,
    accept_on_device,
    accept_prefix,
    batch_to_device,
    plan_verify,
    read_host,
)
from dsv4.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)
SPEC_LOG_EVERY = 1000  # verifies between two acceptance log lines


def resolve_model_dir(model: str | None) -> Path:
    """The model directory of ``--model`` (None: the embedded tiny model, written on first use)."""
    if model is None:
        from dsv4.embedded import embedded_model_dir

        return embedded_model_dir()
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    return path


def _ids(req: Request, lo: int, hi: int) -> list[int]:
    """``req.all_ids[lo:hi]`` without building ``all_ids`` (a copy of the whole context, every step)."""
    n = len(req.prompt_ids)
    if hi <= n:
        return req.prompt_ids[lo:hi]
    if lo >= n:
        return req.output_ids[lo - n : hi - n]
    return req.prompt_ids[lo:] + req.output_ids[: hi - n]


class EngineCore:
    def __init__(self, config: EngineConfig, progress: bool = True) -> None:
        self.config = config
        self.model_dir = resolve_model_dir(config.model)
        self.model_config = ModelConfig.from_json(self.model_dir)
        limit = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"--max-model-len {config.max_model_len} exceeds the model's max_position_embeddings "
                             f"({limit})")
        has_tok = (self.model_dir / "tokenizer.json").is_file()
        self.tokenizer: Tokenizer = load_tokenizer(self.model_dir if has_tok else None, self.model_config.vocab_size)
        self.runner = ModelRunner(self.model_config, config, self.model_dir, progress=progress)
        self.max_model_len: int = self.runner.max_seq_len
        self.scheduler = Scheduler(self.runner.cache_manager, config.max_running_requests,
                                   config.chunked_prefill_size, self.max_model_len)
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._ended: list[Request] = []  # aborted outside a step: their last delta goes out with the next step
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._finished_total = dict.fromkeys(FINISH_REASONS, 0)
        self.spec_stats = SpecStats()
        self._spec_logged = 0
        self.drafter: MTPDrafter | None = None
        if config.speculative_algorithm == "MTP":
            graphs = self.runner.graphs
            draft_graphs = None
            if graphs is not None:  # the draft steps replay graphs in the target's pool (dsv4/engine/draft_graph.py)
                draft_graphs = DraftGraphRunner(self.runner.model, self.runner.cache, config.speculative_num_steps,
                                                graphs.max_bs, graphs.pad_slot, self.max_model_len,
                                                self.runner.device, pool=graphs.pool)
                draft_graphs.capture()
            self.drafter = MTPDrafter(self.runner.model, self.runner.cache, config.speculative_num_steps,
                                      self.runner.device, graphs=draft_graphs)

    # ---- requests ------------------------------------------------------------------------------------------
    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ``ValueError`` naming the problem if this request cannot be served."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate(self.model_config.vocab_size)
        if len(prompt_ids) == 0:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        self.scheduler.check(len(prompt_ids), params.max_new_tokens)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    prompt_text: str | None = None) -> str:
        """Queue a request (checked first: ``ValueError`` if it can never run); returns its id.

        ``request_id`` must not name an unfinished request; None picks a random one.
        """
        self.check_request(prompt_ids, params)
        rid = uuid.uuid4().hex if request_id is None else str(request_id)
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in use")
        ids = list(prompt_ids)
        req = Request(
            rid, prompt_text, ids, params, stop_ids_for(params, self.model_config.eos_token_ids),
            IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens),
            request_generator(params, self.config.seed, rid, self.runner.device),
        )
        self._requests[rid] = req
        self.scheduler.add(req)
        return rid

    def abort(self, request_id: str, error: str | None = None) -> None:
        """Cancel a request wherever it is (waiting, prefilling, decoding); frees its cache now. Its final
        delta (``finish_reason="abort"``, ``error``) comes out of the next :meth:`step`. Unknown ids are
        ignored."""
        req = self._requests.get(request_id)
        if req is not None:
            req.error = error
            self._end(req, "abort")
            self._ended.append(req)

    def abort_all(self, error: str | None = None) -> None:
        """:meth:`abort` every unfinished request."""
        for rid in list(self._requests):
            self.abort(rid, error)

    def has_unfinished(self) -> bool:
        return bool(self._requests or self._ended)

    # ---- one step ------------------------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        """One forward over the scheduled tokens and one sample per request that completed its input.

        Returns a delta for every request that produced a token or finished (including ones aborted since the
        last step). Raises what the forward raised, after aborting every request.
        """
        deltas = [r.take_delta() for r in self._ended]
        self._ended.clear()
        if not self.scheduler.has_unfinished():
            return deltas
        batch = self.scheduler.schedule()
        if self.drafter is not None:
            self._spec_step(batch, deltas)
            return deltas
        fb = ForwardBatch.build([r.slot for r in batch.reqs], [r.num_cached for r in batch.reqs],  # type: ignore[misc]
                                batch.chunks, device=self.runner.device, need_logits=batch.sample)
        logits, _ = self._forward(fb)
        row_reqs = [r for r, s in zip(batch.reqs, batch.sample, strict=True) if s]
        results = iter(sample_isolated(row_reqs, logits) if row_reqs else [])
        for req, chunk, want in zip(batch.reqs, batch.chunks, batch.sample, strict=True):
            if want:
                self._take(req, next(results))
                deltas.append(req.take_delta())
                if req.finished:
                    continue
            req.num_cached += len(chunk)
        return deltas

    def _forward(self, fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.runner.forward(fb)
        except BaseException as e:
            self.abort_all(f"model forward failed: {type(e).__name__}: {e}")
            raise

    # ---- one step with speculation (module doc of spec_decode.py) -------------------------------------------
    def _spec_step(self, batch: ScheduledBatch, deltas: list[RequestDelta]) -> None:
        """Verify the drafts (on the device, one host read), emit the accepted tokens, launch the next drafts."""
        drafter, k, dev = self.drafter, self.config.speculative_num_steps, self.runner.device
        slots: list[int] = [r.slot for r in batch.reqs]  # type: ignore[misc]
        prefix = [r.num_cached for r in batch.reqs]
        n = self._verify_rows(batch)
        if n:  # every request padded to n rows: the verify CUDA graph's shape (module doc of spec_decode.py);
            # padding rows repeat the last token: a hash-routed MoE layer then reads no more experts for them
            chunks = [c + c[-1:] * (n - len(c)) for c in batch.chunks]
            kw: dict = {"mode": ForwardMode.VERIFY}
        else:
            chunks = batch.chunks
            verify = all(s and len(d) == k for s, d in zip(batch.sample, batch.drafts, strict=True))
            kw = {"mode": ForwardMode.VERIFY if verify else None, "need_logits": batch.sample,
                  "all_logits": [bool(d) for d in batch.drafts]}
        starts = list(accumulate((len(c) for c in chunks), initial=0))[:-1]
        plan = plan_verify(slots, batch.chunks, batch.sample, batch.drafts, starts, k, n)
        fb, (dst, src, *acc_plan) = batch_to_device(slots, prefix, chunks, dev, plan.lists(), **kw)
        if plan.draft_dst:  # the drafts were never on the host: the table fills their rows
            fb.input_ids[dst] = drafter.table.view(-1)[src]  # type: ignore[union-attr]
        logits, streams = self._forward(fb)
        verified = iter(self._verify(batch, plan, fb.input_ids, logits, n, acc_plan))
        # per request: (fed rows, accepted drafts, emitted tokens, its catch-up or None); the catch-up is planned
        # from the verify's results before the host takes them, so the drafts run while it detokenizes
        steps: list[tuple[int, int, list[Sampled | Exception], CatchUp | None]] = []
        for req, chunk, want, drafts, start in zip(batch.reqs, batch.chunks, batch.sample, batch.drafts, starts,
                                                   strict=True):
            accepted, emitted = next(verified) if want else (0, [])
            fed = len(chunk) - (len(drafts) - accepted)  # the drafts past the first rejection never happened
            steps.append((fed, accepted, emitted, self._catch_up(req, start, fed, want, emitted)))
        items = [c for *_, c in steps if c is not None]
        if items:
            try:  # launched, not waited for: it runs while the host takes the tokens and plans the next step
                drafter.propose(streams, items)  # type: ignore[union-attr]
            except BaseException as e:
                self.abort_all(f"draft forward failed: {type(e).__name__}: {e}")
                raise
        for req, want, drafts, (fed, accepted, emitted, item) in zip(batch.reqs, batch.sample, batch.drafts, steps,
                                                                     strict=True):
            if want:
                if drafts:
                    self.spec_stats.add(len(drafts), accepted)
                req.drafts = []
                for res in emitted:
                    self._take(req, res)
                    if req.finished:
                        break
                deltas.append(req.take_delta())
                if req.finished:
                    continue  # its drafts (if a stop string ended it) are never read
            req.num_cached += fed
            if item is not None:
                req.drafts = [DRAFT_PLACEHOLDER] * item.num_drafts
        self._log_spec()

    def _verify(self, batch: ScheduledBatch, plan: VerifyPlan, input_ids: torch.Tensor, logits: torch.Tensor,
                n: int, acc_plan: list[torch.Tensor]) -> list[tuple[int, list[Sampled | Exception]]]:
        """Per sampled request (``plan.reqs``): accepted drafts and the tokens it emits. Every logits row is
        sampled as a decode row would be (a verify's rows in order); acceptance on the device and one host read,
        or, for logprobs (or when batched sampling fails), :func:`sample_isolated` and acceptance on the host."""
        reqs = [batch.reqs[i] for i in plan.reqs]
        nd = [len(batch.drafts[i]) for i in plan.reqs]
        if not reqs:
            return []
        k = self.config.speculative_num_steps
        if all(r.params.logprobs is None for r in reqs):
            row_reqs = [r for r, d in zip(reqs, nd, strict=True) for _ in range(n or 1 + d)]
            try:
                out = read_host(accept_on_device(sample_ids(row_reqs, logits), input_ids, *acc_plan, k))
                return [(a, [Sampled(t) for t in toks[: a + 1]]) for a, *toks in out]
            except Exception:
                log.exception("batched sampling failed; sampling %d requests one by one", len(reqs))
        if n:  # the padding rows' logits are never sampled
            keep = [i * n + j for i, d in enumerate(nd) for j in range(1 + d)]
            logits = logits[torch.tensor(keep, dtype=torch.int64, device=logits.device)]
        results = iter(sample_isolated([r for r, d in zip(reqs, nd, strict=True) for _ in range(1 + d)], logits))
        fed = input_ids.tolist()  # the drafts, read back from the batch
        out: list[tuple[int, list[Sampled | Exception]]] = []
        for r, d in enumerate(nd):
            got = [next(results) for _ in range(1 + d)]
            drafts = [fed[plan.nexts[r * k + j]] for j in range(d)]
            accepted = accept_prefix([g.token_id if isinstance(g, Sampled) else -1 for g in got], drafts)
            out.append((accepted, got[: accepted + 1]))
        return out

    def _log_spec(self) -> None:
        st = self.spec_stats
        if st.verifies >= self._spec_logged + SPEC_LOG_EVERY:
            self._spec_logged = st.verifies
            log.info("speculative decoding: %d verifies, %.3f of %d drafts accepted, %.2f tokens per verify, "
                     "accepted-drafts histogram %s", st.verifies, st.accepted / max(1, st.proposed), st.proposed,
                     st.mean_accepted_length, st.histogram)

    def _verify_rows(self, batch: ScheduledBatch) -> int:
        """k + 1 when this step's target forward is a verify the CUDA graphs take once every request is padded
        to k + 1 rows, else 0 (eager, or plain decode: the decode graph).

        That is when some request carries drafts, every request is decoding (it samples, and its chunk is its
        last token and its drafts: no prompt chunk in the batch), the batch fits the largest bucket, and the
        padding rows' positions (up to ``num_cached + k``) stay inside the context, where the caches' position
        indexing (rope, page tables) is defined.
        """
        g, k = self.runner.graphs, self.config.speculative_num_steps
        if self.drafter is None or g is None or g.verify_n != k + 1 or self.runner.parallel.dp_size > 1:
            return 0
        if len(batch) > g.max_bs or not any(batch.drafts):
            return 0
        ok = all(s and len(c) == 1 + len(d) and r.num_cached + k < self.max_model_len
                 for r, c, s, d in zip(batch.reqs, batch.chunks, batch.sample, batch.drafts, strict=True))
        return k + 1 if ok else 0

    def _catch_up(self, req: Request, start: int, fed: int, want: bool,
                  emitted: list[Sampled | Exception]) -> CatchUp | None:
        """The MTP block's rows for ``req`` after a target step that fed ``fed`` rows from batch row ``start`` and
        is about to emit ``emitted`` (it sampled: ``want``; else no drafts): the block at position p reads the
        target's streams at p and the token at p + 1. None when the request ends with these tokens (max_tokens,
        a stop id, a failed sample)."""
        if any(isinstance(e, Exception) or e.token_id in req.stop_ids for e in emitted):
            return None
        out = len(req.output_ids) + len(emitted)
        if out >= req.params.max_new_tokens:
            return None
        p0, total = req.num_cached, req.total_len
        ids = _ids(req, p0 + 1, min(p0 + fed + 1, total)) + [e.token_id for e in emitted][: p0 + fed + 1 - total]
        # drafts worth proposing: at most k, none past max_tokens (the last token needs no draft), none past the
        # context limit
        n = max(0, min(self.config.speculative_num_steps, req.params.max_new_tokens - out - 1,
                       self.max_model_len - total - len(emitted))) if want else 0
        return CatchUp(req.slot, p0, list(range(start, start + fed)), ids, n)  # type: ignore[arg-type]

    def _take(self, req: Request, res: Sampled | Exception) -> None:
        """Give ``req`` its sampled token (stop rules, detokenizing); a failure aborts only this request."""
        try:
            if isinstance(res, Exception):
                raise res
            if not req.output_ids:
                self._prompt_tokens_total += len(req.prompt_ids)
            if req.params.logprobs is not None:
                req.logprobs.append(res.logprob)  # type: ignore[arg-type]
                if req.params.logprobs:
                    req.top_logprobs.append(res.top_logprobs or {})
            req.append(res.token_id)
            self._generation_tokens_total += 1
        except Exception as e:
            log.exception("request %s failed; aborting it", req.request_id)
            req.error = f"{type(e).__name__}: {e}"
            req.finish_reason = "abort"
        if req.finished:
            self._end(req, req.finish_reason)  # type: ignore[arg-type]

    def _end(self, req: Request, reason: str) -> None:
        if reason == "abort":
            self.scheduler.abort(req)  # it may still be waiting
        else:
            self.scheduler.finish(req)
        req.finish_reason = reason
        del self._requests[req.request_id]
        self._finished_total[reason] += 1

    # ---- accounting ----------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running), num_waiting=len(s.waiting), cache_usage=s.cache_usage(),
            prompt_tokens_total=self._prompt_tokens_total, generation_tokens_total=self._generation_tokens_total,
            preemptions_total=s.preemptions_total, finished_total=dict(self._finished_total),
            spec_verifies_total=self.spec_stats.verifies, spec_draft_tokens_total=self.spec_stats.proposed,
            spec_accepted_tokens_total=self.spec_stats.accepted,
            spec_accepted_histogram=list(self.spec_stats.histogram),
        )
