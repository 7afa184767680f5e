"""``dsv4 bench``: offline throughput of the engine (no HTTP), through :class:`~dsv4.engine.llm.LLM`.

``N`` requests of random token ids, with input and output lengths drawn from a seed (so two runs, or two
engines, see the same workload), all submitted at once with ``ignore_eos`` so each produces exactly its
output length. One short warm-up request runs first and is not counted. Reports requests/s and input,
output and total tokens/s.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from typing import Any

from dsv4.bench.report import print_card, print_json, print_table, random_lengths
from dsv4.engine.engine_config import EngineConfig
from dsv4.engine.sampling_params import SamplingParams
from dsv4.tokenizer import BYTE_OFFSET, ByteTokenizer


@dataclass(frozen=True)
class OfflineWorkload:
    num_prompts: int = 64
    input_len: int = 256
    output_len: int = 64
    range_ratio: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {self.num_prompts}")


def _token_range(llm: Any) -> tuple[int, int, set[int]]:
    """Ids to draw prompt tokens from: real text bytes for the byte tokenizer, else the whole vocabulary
    minus the special ids (a prompt of EOS tokens would be a strange workload)."""
    tok = llm.tokenizer
    if isinstance(tok, ByteTokenizer):
        return BYTE_OFFSET, min(tok.vocab_size, BYTE_OFFSET + 256), set()
    specials = {i for i in (tok.bos_id, *tok.eos_ids) if i is not None}
    return 0, llm.model_config.vocab_size, specials


def make_requests(llm: Any, w: OfflineWorkload) -> tuple[list[list[int]], list[SamplingParams]]:
    """The seeded workload: prompt token ids and per-request sampling parameters (greedy, fixed length)."""
    rng = random.Random(w.seed)
    limit = llm.core.max_model_len
    if w.input_len + w.output_len > limit:
        raise ValueError(f"--input-len {w.input_len} + --output-len {w.output_len} exceeds max_model_len {limit}")
    ins = random_lengths(rng, w.num_prompts, w.input_len, w.range_ratio)
    outs = random_lengths(rng, w.num_prompts, w.output_len, w.range_ratio)
    lo, hi, skip = _token_range(llm)
    prompts = []
    for n in ins:
        ids: list[int] = []
        while len(ids) < n:
            t = rng.randrange(lo, hi)
            if t not in skip:
                ids.append(t)
        prompts.append(ids)
    params = [SamplingParams(max_new_tokens=m, temperature=0, ignore_eos=True) for m in outs]
    return prompts, params


def _card(llm: Any, config: EngineConfig, w: OfflineWorkload) -> dict[str, Any]:
    mc = llm.model_config
    weights = sum(p.numel() * p.element_size() for p in llm.runner.model.parameters())
    per_token = llm.runner.cache.bytes_per_token()
    return {
        "device": str(llm.runner.device) + _gpu_name(llm.runner.device),
        "model": config.model or "embedded tiny model",
        "shape": f"hidden {mc.hidden_size}, layers {mc.num_layers}, experts {mc.n_routed_experts}, vocab {mc.vocab_size}",
        "weight bytes": weights,
        "cache bytes/token": round(sum(per_token.values()), 1),
        "max_model_len": llm.core.max_model_len,
        "workload": f"{w.num_prompts} requests, input <= {w.input_len}, output <= {w.output_len}, "
                    f"range ratio {w.range_ratio}, seed {w.seed}",
    }


def _gpu_name(device: Any) -> str:
    if getattr(device, "type", "") != "cuda":
        return ""
    import torch

    return f" ({torch.cuda.get_device_name(device)})"


def run_offline(config: EngineConfig, w: OfflineWorkload, progress: bool = False) -> dict[str, Any]:
    """Load the engine, run the workload, print card + table + JSON line; return the JSON dict."""
    from dsv4.engine.llm import LLM

    llm = LLM(config, progress=progress)
    prompts, params = make_requests(llm, w)
    print_card("dsv4 bench (offline)", _card(llm, config, w))
    llm.generate([prompts[0][:8]], SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True))  # warm-up
    spec0 = llm.core.stats()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, progress=progress)
    dt = time.perf_counter() - t0
    n_in = sum(len(p) for p in prompts)
    n_out = sum(len(o.token_ids) for o in outs)
    result = {
        "bench": "offline",
        "requests": len(prompts),
        "duration_s": round(dt, 4),
        "input_tokens": n_in,
        "output_tokens": n_out,
        "requests_per_s": len(prompts) / dt,
        "input_tokens_per_s": n_in / dt,
        "output_tokens_per_s": n_out / dt,
        "total_tokens_per_s": (n_in + n_out) / dt,
    }
    table = {
        "requests": result["requests"], "duration (s)": dt, "input tokens": n_in, "output tokens": n_out,
        "requests/s": result["requests_per_s"], "input tokens/s": result["input_tokens_per_s"],
        "output tokens/s": result["output_tokens_per_s"], "total tokens/s": result["total_tokens_per_s"],
    }
    if config.speculative_algorithm:
        s1 = llm.core.stats()  # this run's speculative counters (the warm-up's taken off)
        verifies = s1.spec_verifies_total - spec0.spec_verifies_total
        drafts = s1.spec_draft_tokens_total - spec0.spec_draft_tokens_total
        accepted = s1.spec_accepted_tokens_total - spec0.spec_accepted_tokens_total
        result.update(spec_verifies=verifies, spec_draft_tokens=drafts, spec_accepted_tokens=accepted,
                      spec_acceptance=accepted / max(1, drafts), spec_tokens_per_verify=1 + accepted / max(1, verifies))
        table.update({"spec acceptance": result["spec_acceptance"],
                      "spec tokens/verify": result["spec_tokens_per_verify"]})
    print_table(table)
    print_json(result)
    if any(o.finish_reason != "length" for o in outs):
        print("dsv4 bench: warning: some requests ended early", file=sys.stderr)
    return result
