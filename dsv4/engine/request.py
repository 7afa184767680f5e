"""A request's life inside the engine: its tokens, its cache slot, its sampling state."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsv4.engine.outputs import RequestOutput
from dsv4.engine.sampling_params import SamplingParams
from dsv4.tokenizer import IncrementalDetokenizer


@dataclass
class Request:
    request_id: int
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

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_len(self) -> int:
        """Tokens this request may ever hold in the cache (its admission size)."""
        return len(self.prompt_ids) + self.params.max_new_tokens

    @property
    def prefilling(self) -> bool:
        return self.num_cached < len(self.prompt_ids)

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

    def to_output(self) -> RequestOutput:
        want = self.params.logprobs is not None
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=list(self.prompt_ids),
            token_ids=list(self.output_ids), text=self.text, finish_reason=self.finish_reason or "abort",
            logprobs=list(self.logprobs) if want else None,
            top_logprobs=list(self.top_logprobs) if want and self.params.logprobs else None,
        )
