"""What the engine returns for each finished request."""

from __future__ import annotations

from dataclasses import dataclass
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
