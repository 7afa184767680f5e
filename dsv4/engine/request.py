"""A request's life inside the engine: its tokens, its cache slot, its sampling state."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsv4.engine.outputs import RequestDelta, RequestOutput
from dsv4.engine.sampling_params import SamplingParams
from dsv4.tokenizer import IncrementalDetokenizer


@dataclass(eq=False)  # identity: the scheduler finds requests in its queues by `is`, not by field values
class Request:
    """One request.

    The tokens whose KV must be in the cache before the next token can be sampled are ``all_ids`` (prompt
    + generated); ``num_cached`` of them are. A fresh request prefills its prompt; a decoding one feeds its
    last sampled token; a request preempted by recompute lost its cache and prefills prompt + generated
    tokens again, which gives the same cache (and so the same next token) as never being preempted.
    """

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    detok: IncrementalDetokenizer
    generator: torch.Generator | None = None
    slot: int | None = None
    num_cached: int = 0  # tokens whose KV is in the cache
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None  # why the engine aborted it (None for a cancel)
    arrival: int = 0  # admission order key: smaller arrived earlier
    times_overtaken: int = 0  # later requests admitted while this one waited at the head of the queue
    # speculative decoding: draft tokens proposed after the last sample, verified with it in the next step
    drafts: list[int] = field(default_factory=list)
    # how much of the outputs the streamed deltas have already carried
    sent_tokens: int = 0
    sent_chars: int = 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to feed before the next sample (1 while decoding)."""
        return self.total_len - self.num_cached

    @property
    def prefilling(self) -> bool:
        """True until only the last sampled token is left to feed (a preempted request prefills again)."""
        return self.num_pending > 1 or not self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def next_chunk(self, budget: int) -> list[int]:
        """The next tokens to feed: up to ``budget`` while prefilling, else the last sampled token."""
        if not self.prefilling:
            return self.output_ids[-1:]
        # NOTE: slices of the two lists, not of all_ids: that would copy the whole context every step
        start, end, n = self.num_cached, self.num_cached + min(budget, self.num_pending), len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[max(0, start - n) : end - n]

    def append(self, token: int) -> None:
        """Take one sampled token; decide whether the request is done (stop id, stop string, length)."""
        self.output_ids.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            self._add_text(self.detok.flush())
            return
        if self._add_text(self.detok.push([token])):
            return
        if len(self.output_ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
            self._add_text(self.detok.flush())

    def _add_text(self, new: str) -> bool:
        """Append decoded text; cut at the first stop string it completes (True when one did)."""
        if not new:
            return False
        # only the tail that the new text can complete needs searching
        start = max(0, len(self.text) - max((len(s) for s in self.params.stop), default=0) + 1)
        self.text += new
        cuts = [c for c in (self.text.find(s, start) for s in self.params.stop) if c >= 0]
        if not cuts:
            return False
        self.text, self.finish_reason = self.text[: min(cuts)], "stop"
        return True

    def take_delta(self) -> RequestDelta:
        """What is new since the last delta; marks it sent.

        While running, the last ``len(longest stop) - 1`` characters stay back: a stop string completed by a
        later token may start inside them, and text that gets cut must never have been streamed.
        """
        want = self.params.logprobs is not None
        new = slice(self.sent_tokens, len(self.output_ids))
        hold = 0 if self.finished else max((len(s) for s in self.params.stop), default=1) - 1
        end = max(self.sent_chars, len(self.text) - hold)
        delta = RequestDelta(
            request_id=self.request_id, token_ids=self.output_ids[new], text=self.text[self.sent_chars : end],
            logprobs=self.logprobs[new] if want else None,
            top_logprobs=self.top_logprobs[new] if want and self.params.logprobs else None,
            finish_reason=self.finish_reason, prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids), error=self.error,
        )
        self.sent_tokens, self.sent_chars = len(self.output_ids), end
        return delta

    def to_output(self, request_id: int) -> RequestOutput:
        """The finished result, under the caller's numbering (LLM numbers the prompts of one engine)."""
        want = self.params.logprobs is not None
        return RequestOutput(
            request_id=request_id, prompt=self.prompt, prompt_token_ids=list(self.prompt_ids),
            token_ids=list(self.output_ids), text=self.text, finish_reason=self.finish_reason or "abort",
            logprobs=list(self.logprobs) if want else None,
            top_logprobs=list(self.top_logprobs) if want and self.params.logprobs else None,
        )
