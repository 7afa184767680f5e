"""``dsv4 bench serving``: latency and throughput of any OpenAI-compatible server, over streaming HTTP.

Sends ``--num-prompts`` streaming ``/v1/completions`` requests, at most ``--concurrency`` at a time, and
times every stream: TTFT (send -> first chunk with a choice), ITL (gaps between later chunks), TPOT
((end - first chunk) / (output tokens - 1)), end-to-end latency. Token counts come from the server's own
``usage`` (``stream_options.include_usage``), so no tokenizer is needed and the same command measures
dsv4, SGLang or vLLM.

Prompts are random English words. Without a tokenizer the words-per-token ratio of the server's model is
unknown, so it is measured first from the ``usage`` of two probe requests; prompt lengths are then set
in words to hit the requested token lengths (reported input tokens are the server's counts).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from dsv4.bench.report import percentile, print_card, print_json, print_table, random_lengths

_WORDS = ("time year people way day man thing woman life child world school state family student group "
          "country problem hand part place case week company system program question work government number "
          "night point home water room mother area money story fact month lot right study book eye job word "
          "business issue side kind head house service friend father power hour game line end member law car "
          "city community name president team minute idea kid body information back parent face others level "
          "office door health person art war history party result change morning reason research girl guy").split()


@dataclass(frozen=True)
class ServingWorkload:
    base_url: str
    model: str | None = None
    num_prompts: int = 64
    concurrency: int = 16
    input_len: int = 256
    output_len: int = 64
    range_ratio: float = 0.5
    seed: int = 0
    api_key: str | None = None
    ignore_eos: bool = True
    timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or self.concurrency < 1:
            raise ValueError("--num-prompts and --concurrency must be >= 1")


@dataclass
class _Result:
    ok: bool = False
    error: str = ""
    ttft: float = float("nan")
    latency: float = float("nan")
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0


class _Client:
    def __init__(self, w: ServingWorkload) -> None:
        headers = {"Authorization": f"Bearer {w.api_key}"} if w.api_key else {}
        limits = httpx.Limits(max_connections=w.concurrency + 2, max_keepalive_connections=w.concurrency + 2)
        self.http = httpx.AsyncClient(base_url=w.base_url.rstrip("/"), headers=headers, limits=limits,
                                      timeout=httpx.Timeout(w.timeout, connect=30.0))
        self.w = w

    async def model(self) -> str:
        if self.w.model:
            return self.w.model
        r = await self.http.get("/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]

    async def prompt_tokens(self, model: str, text: str) -> int:
        body = {"model": model, "prompt": text, "max_tokens": 1}
        r = await self.http.post("/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"probe request failed: HTTP {r.status_code}: {r.text[:300]}")
        return int(r.json()["usage"]["prompt_tokens"])

    async def stream(self, model: str, prompt: str, max_tokens: int) -> _Result:
        body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                "stream": True, "stream_options": {"include_usage": True}}
        if self.w.ignore_eos:
            body["ignore_eos"] = True
        res, chunks = _Result(), 0
        t0 = last = time.perf_counter()
        try:
            async with self.http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                    return res
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    msg = json.loads(data)
                    if "error" in msg:
                        res.error = str(msg["error"].get("message"))
                        return res
                    if msg.get("usage"):
                        res.prompt_tokens = msg["usage"]["prompt_tokens"]
                        res.output_tokens = msg["usage"]["completion_tokens"]
                    if msg.get("choices"):
                        now = time.perf_counter()
                        if chunks == 0:
                            res.ttft = now - t0
                        else:
                            res.itl.append(now - last)
                        last, chunks = now, chunks + 1
        except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
            res.error = f"{type(e).__name__}: {e}"
            return res
        res.latency = time.perf_counter() - t0
        res.output_tokens = res.output_tokens or chunks  # a server without usage: about one token a chunk
        res.ok = chunks > 0
        return res


async def _run(w: ServingWorkload) -> dict[str, Any]:
    client = _Client(w)
    try:
        model = await client.model()
        rng = random.Random(w.seed)
        # words -> tokens: the slope between two probes cancels the fixed cost (BOS, template)
        short = await client.prompt_tokens(model, " ".join(rng.choice(_WORDS) for _ in range(4)))
        long = await client.prompt_tokens(model, " ".join(rng.choice(_WORDS) for _ in range(20)))
        per_word = max((long - short) / 16, 0.05)
        ins = random_lengths(rng, w.num_prompts, w.input_len, w.range_ratio)
        outs = random_lengths(rng, w.num_prompts, w.output_len, w.range_ratio)
        prompts = [" ".join(rng.choice(_WORDS) for _ in range(max(1, round(n / per_word)))) for n in ins]
        print_card("dsv4 bench serving", {
            "base url": w.base_url, "model": model, "tokens per word (measured)": round(per_word, 3),
            "workload": f"{w.num_prompts} requests, input <= {w.input_len}, output <= {w.output_len}, "
                        f"range ratio {w.range_ratio}, seed {w.seed}, concurrency {w.concurrency}",
        })
        gate = asyncio.Semaphore(w.concurrency)

        async def one(prompt: str, n: int) -> _Result:
            async with gate:
                return await client.stream(model, prompt, n)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, outs, strict=True)))
        duration = time.perf_counter() - t0
    finally:
        await client.http.aclose()
    return _summarise(results, duration)


def _summarise(results: list[_Result], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"dsv4 bench serving: {len(failed)} requests failed; first: {failed[0].error}", file=sys.stderr)
    n_in = sum(r.prompt_tokens for r in ok)
    n_out = sum(r.output_tokens for r in ok)
    ttft = [r.ttft * 1e3 for r in ok]
    itl = [x * 1e3 for r in ok for x in r.itl]
    tpot = [(r.latency - r.ttft) * 1e3 / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    e2e = [r.latency * 1e3 for r in ok]
    out: dict[str, Any] = {
        "bench": "serving", "completed": len(ok), "failed": len(failed), "duration_s": round(duration, 4),
        "input_tokens": n_in, "output_tokens": n_out,
        "requests_per_s": len(ok) / duration, "input_tokens_per_s": n_in / duration,
        "output_tokens_per_s": n_out / duration, "total_tokens_per_s": (n_in + n_out) / duration,
    }
    for name, xs in (("ttft", ttft), ("itl", itl), ("tpot", tpot), ("e2e", e2e)):
        out[f"{name}_p50_ms"] = percentile(xs, 50)
        out[f"{name}_p99_ms"] = percentile(xs, 99)
    return out


def run_serving(w: ServingWorkload) -> dict[str, Any]:
    """Run the benchmark; print card + table + JSON line; return the JSON dict."""
    result = asyncio.run(_run(w))
    rows = {"completed": result["completed"], "failed": result["failed"], "duration (s)": result["duration_s"],
            "input tokens": result["input_tokens"], "output tokens": result["output_tokens"],
            "requests/s": result["requests_per_s"], "input tokens/s": result["input_tokens_per_s"],
            "output tokens/s": result["output_tokens_per_s"]}
    for name in ("ttft", "itl", "tpot", "e2e"):
        rows[f"{name.upper()} p50 (ms)"] = result[f"{name}_p50_ms"]
        rows[f"{name.upper()} p99 (ms)"] = result[f"{name}_p99_ms"]
    print_table(rows)
    print_json(result)
    return result
