"""``LLM(model).generate(prompts, SamplingParams)``: offline generation on :class:`EngineCore`.

All prompts are checked before any runs (one bad prompt fails the call and nothing is queued), then the
core steps until they are done: continuous batching, chunked prefill and preemption are the scheduler's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from tqdm import tqdm

from dsv4.engine.engine_config import EngineConfig
from dsv4.engine.engine_core import EngineCore
from dsv4.engine.outputs import RequestDelta, RequestOutput
from dsv4.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]


class LLM:
    def __init__(self, model: str | EngineConfig | None = None, *, config: EngineConfig | None = None,
                 progress: bool = True, **overrides: object) -> None:
        if isinstance(model, EngineConfig):
            config, model = model, None
        if config is None:
            config = EngineConfig(model=model, **overrides)  # type: ignore[arg-type]
        self.config = config
        self.core = EngineCore(config, progress=progress)
        self.model_dir = self.core.model_dir
        self.model_config = self.core.model_config
        self.tokenizer = self.core.tokenizer
        self.runner = self.core.runner
        self._next_id = 0

    # ---- public API ----------------------------------------------------------------------------------------
    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """Generate for each prompt (a string, or a list of token ids). Outputs keep the prompts' order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if params is None:
            params = SamplingParams()
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(plist)} SamplingParams")
        encoded = [self._encode(p) for p in prompts]
        for (ids, _), sp in zip(encoded, plist, strict=True):
            self.core.check_request(ids, sp)
        first = self._next_id
        self._next_id += len(prompts)
        rids = [str(first + i) for i in range(len(prompts))]
        for rid, (ids, text), sp in zip(rids, encoded, plist, strict=True):
            self.core.add_request(ids, sp, request_id=rid, prompt_text=text)
        return self._run(rids, first, encoded, progress)

    # ---- internals -----------------------------------------------------------------------------------------
    def _encode(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_bos=True), prompt
        return [int(t) for t in prompt], None

    def _run(self, rids: list[str], first: int, encoded: list[tuple[list[int], str | None]],
             progress: bool) -> list[RequestOutput]:
        # Outputs are assembled from the streamed deltas, so this path also checks what a server streams.
        acc = {rid: _Accumulator(*e) for rid, e in zip(rids, encoded, strict=True)}
        unfinished = set(rids)
        bar = tqdm(total=len(rids), desc="generate", disable=not progress, unit="req")
        try:
            while unfinished:
                for d in self.core.step():
                    if d.request_id not in unfinished:
                        continue
                    acc[d.request_id].add(d)
                    if d.finish_reason is not None:
                        unfinished.discard(d.request_id)
                        bar.update(1)
        finally:
            # NOTE: an error (or Ctrl-C) mid-generation must not leak slots and pages into the next call.
            for rid in unfinished:
                self.core.abort(rid)
            if unfinished:
                self.core.step()  # only drains the abort deltas: nothing of ours is left to run
            bar.close()
        return [acc[rid].output(first + i) for i, rid in enumerate(rids)]


class _Accumulator:
    """One request's deltas, joined."""

    def __init__(self, prompt_ids: list[int], prompt: str | None) -> None:
        self.prompt_ids, self.prompt = prompt_ids, prompt
        self.token_ids: list[int] = []
        self.text: list[str] = []
        self.logprobs: list[float] | None = None
        self.top_logprobs: list[dict[int, float]] | None = None
        self.finish_reason = "abort"

    def add(self, d: RequestDelta) -> None:
        self.token_ids += d.token_ids
        self.text.append(d.text)
        if d.logprobs is not None:
            self.logprobs = (self.logprobs or []) + d.logprobs
        if d.top_logprobs is not None:
            self.top_logprobs = (self.top_logprobs or []) + d.top_logprobs
        if d.finish_reason is not None:
            self.finish_reason = d.finish_reason

    def output(self, request_id: int) -> RequestOutput:
        return RequestOutput(request_id=request_id, prompt=self.prompt, prompt_token_ids=self.prompt_ids,
                             token_ids=self.token_ids, text="".join(self.text), finish_reason=self.finish_reason,
                             logprobs=self.logprobs, top_logprobs=self.top_logprobs)
