"""What the engine returns: a finished request's result, a streamed step of one request, engine counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class RequestOutput:
    """One request's result.

    ``finish_reason``: "stop" (EOS, a stop token id or a stop string), "length" (max_new_tokens or the
    model's context limit), "abort" (cancelled or rejected). ``logprobs`` holds, per generated token, its
    log-probability under the raw (untempered) model distribution when the request asked for logprobs;
    ``top_logprobs`` holds per generated token ``{token_id: logprob}`` for the top ``n`` when n > 0.
    """

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"RequestOutput.finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (JSON object keys are strings, so top_logprobs' token ids become strings)."""
        return {
            "request_id": self.request_id,
            "prompt": self.prompt,
            "prompt_token_ids": self.prompt_token_ids,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "logprobs": self.logprobs,
            "top_logprobs": None if self.top_logprobs is None
            else [{str(k): v for k, v in d.items()} for d in self.top_logprobs],
        }


@dataclass
class RequestDelta:
    """What one request produced in one engine step (streaming).

    ``token_ids`` / ``logprobs`` / ``top_logprobs`` hold only this step's new tokens (the last two are None
    unless the request asked for logprobs; ``top_logprobs`` also needs ``logprobs`` > 0). ``text`` is the new
    text: it never ends inside a UTF-8 character, and while the request runs it holds back the last
    ``len(longest stop string) - 1`` characters, so text that a stop string later cuts is never sent.
    Concatenating every delta's text gives the final text. ``finish_reason`` is None until the last delta
    ("stop", "length" or "abort"); ``error`` says why a request was aborted by the engine (None for a plain
    cancel). ``prompt_tokens`` / ``completion_tokens`` are totals so far (for ``usage``).
    """

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    top_logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    """Counters and gauges for /metrics.

    ``cache_usage``: fraction in use per cache kind: ``"slots"`` (request slots: the sliding-window rings and
    compressor state) and ``"compressed_kv_pages:<ratio>"`` per compression ratio (the paged pools; CSA's
    indexer keys share the ratio-4 pages). ``finished_total`` counts finished requests by finish reason.
    """

    num_running: int
    num_waiting: int
    cache_usage: dict[str, float]
    prompt_tokens_total: int
    generation_tokens_total: int
    preemptions_total: int
    finished_total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))
    # speculative decoding (zero without it): verifies run, drafts proposed and accepted, and how many verifies
    # accepted 0, 1, .. k drafts
    spec_verifies_total: int = 0
    spec_draft_tokens_total: int = 0
    spec_accepted_tokens_total: int = 0
    spec_accepted_histogram: list[int] = field(default_factory=list)
