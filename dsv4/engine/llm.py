"""``LLM(model).generate(prompts, SamplingParams)``: offline generation with continuous batching.

Requests are admitted while a cache slot and pages for their whole length (prompt + max_new_tokens) are
free; each step packs prefill chunks (under ``chunked_prefill_size`` tokens) beside one decode token for
every running request into one forward, samples, and retires finished requests so waiting ones can start.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from dsv4.config import ModelConfig
from dsv4.engine.engine_config import EngineConfig
from dsv4.engine.forward_batch import ForwardBatch
from dsv4.engine.model_runner import ModelRunner
from dsv4.engine.outputs import RequestOutput
from dsv4.engine.request import Request
from dsv4.engine.sampling_params import SamplingParams, stop_ids_for
from dsv4.ops.sampling import compute_logprobs, sample
from dsv4.tokenizer import IncrementalDetokenizer, load_tokenizer

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
        if config.model is None:
            from dsv4.embedded import embedded_model_dir

            model_dir = embedded_model_dir()
        else:
            model_dir = Path(config.model)
            if not model_dir.is_dir():
                raise FileNotFoundError(f"model directory not found: {model_dir}")
        self.model_dir = model_dir
        self.model_config = ModelConfig.from_json(model_dir)
        limit = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"--max-model-len {config.max_model_len} exceeds the model's max_position_embeddings "
                             f"({limit})")
        self.tokenizer = load_tokenizer(model_dir if (model_dir / "tokenizer.json").is_file() else None,
                                        self.model_config.vocab_size)
        self.runner = ModelRunner(self.model_config, config, model_dir, progress=progress)
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
        reqs = [self._make_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        self._run(reqs, progress)
        return [r.to_output() for r in reqs]

    # ---- internals -----------------------------------------------------------------------------------------
    def _make_request(self, prompt: Prompt, params: SamplingParams) -> Request:
        params.validate(self.model_config.vocab_size)
        if isinstance(prompt, str):
            ids, text = self.tokenizer.encode(prompt, add_bos=True), prompt
        else:
            ids, text = [int(t) for t in prompt], None
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids out of range [0, {self.model_config.vocab_size}): {bad[:5]}")
        if not ids:
            raise ValueError("prompt is empty")
        limit = self.runner.max_seq_len
        if len(ids) + params.max_new_tokens > limit:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                             f"maximum context of {limit} tokens")
        # A request that would not fit even in an empty cache is refused now, not after the others ran.
        mgr = self.runner.cache_manager
        short = {r: n for r, n in mgr.extra_pages(None, len(ids) + params.max_new_tokens).items()
                 if n > mgr.cache.num_pages[r] - 1}
        if short:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) needs more "
                             f"compressed-KV pages than the cache holds ({short}); raise --max-total-tokens")
        rid, self._next_id = self._next_id, self._next_id + 1
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=self.runner.device)
            gen.manual_seed(params.seed if params.seed is not None else self.config.seed * 1_000_003 + rid)
        return Request(rid, text, ids, params, stop_ids_for(params, self.model_config.eos_token_ids),
                       IncrementalDetokenizer(self.tokenizer, ids), gen)

    def _run(self, reqs: list[Request], progress: bool) -> None:
        mgr = self.runner.cache_manager
        waiting: deque[Request] = deque(reqs)
        running: list[Request] = []
        bar = tqdm(total=len(reqs), desc="generate", disable=not progress, unit="req")
        try:
            while waiting or running:
                while (waiting and len(running) < self.config.max_running_requests
                       and mgr.can_fit(None, waiting[0].max_len)):
                    r = waiting.popleft()
                    r.slot = mgr.alloc()
                    running.append(r)
                    mgr.reserve(r.slot, r.max_len)
                if not running:
                    r = waiting.popleft()
                    raise RuntimeError(f"request {r.request_id} ({r.max_len} tokens) cannot fit in the cache")
                self._step(running)
                for r in [r for r in running if r.finish_reason]:
                    mgr.free(r.slot)
                    running.remove(r)
                    bar.update(1)
        finally:
            # NOTE: an error (or Ctrl-C) mid-generation must not leak slots and pages into the next call.
            for r in running:
                mgr.free(r.slot)
            bar.close()

    def _step(self, running: list[Request]) -> None:
        budget = self.config.chunked_prefill_size
        batch_reqs, toks = [], []
        for r in running:
            if r.prefilling:
                if budget <= 0:
                    continue
                chunk = r.prompt_ids[r.num_cached : r.num_cached + budget]
                budget -= len(chunk)
            else:
                chunk = [r.output_ids[-1]]
            batch_reqs.append(r)
            toks.append(chunk)
        batch = ForwardBatch.build([r.slot for r in batch_reqs], [r.num_cached for r in batch_reqs], toks,
                                   device=self.runner.device)
        logits, _ = self.runner.forward(batch)
        for r, chunk in zip(batch_reqs, toks, strict=True):
            r.num_cached += len(chunk)
        ready = [i for i, r in enumerate(batch_reqs) if not r.prefilling]
        if not ready:
            return
        self._sample([batch_reqs[i] for i in ready], logits[ready])

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> None:
        dev = logits.device
        temp = torch.tensor([r.params.temperature for r in reqs], dtype=torch.float32, device=dev)
        top_k = torch.tensor([r.params.top_k_or_off for r in reqs], dtype=torch.int64, device=dev)
        top_p = torch.tensor([r.params.top_p for r in reqs], dtype=torch.float32, device=dev)
        min_p = torch.tensor([r.params.min_p for r in reqs], dtype=torch.float32, device=dev)
        ids = sample(logits, temp, top_k, top_p, min_p, [r.generator for r in reqs])
        want = [r.params.logprobs for r in reqs if r.params.logprobs is not None]
        lp = compute_logprobs(logits, ids, max(want)) if want else None
        ids_host = ids.tolist()
        for i, r in enumerate(reqs):
            if lp is not None and r.params.logprobs is not None:
                r.logprobs.append(float(lp[0][i]))
                n = r.params.logprobs
                if n:
                    r.top_logprobs.append({int(t): float(v) for t, v in zip(lp[1][i, :n], lp[2][i, :n], strict=True)})
            r.append(ids_host[i])
