"""Acceptance of the shipped MTP draft head: k = 1 teacher-forced on greedy continuations, and k = 1, 2, 3 through
the engine's speculative decoding (``--engine-k``).

For each prompt the target model continues greedily; then, over that sequence, the draft at position i (fed the
target's final streams at i and token i+1) predicts token i+2, and it is "accepted" when its argmax equals the
target's own greedy token there. This is the k = 1 acceptance rate of greedy speculative decoding.

``--engine-k 1,2,3`` instead runs ``LLM.generate`` with ``--speculative-algorithm MTP --speculative-num-steps k``
(greedy, CPU fp32) and reports the engine's own counters (drafts proposed / accepted, tokens per verify, the
histogram of accepted drafts per verify), after checking the tokens equal plain greedy decoding.
Prints a table, then one JSON line.

    python tools/mtp_acceptance.py [--model DIR] [--prompts 8] [--tokens 128] [--engine-k 1,2,3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dsv4.cache.manager import CacheManager
from dsv4.cache.model_cache import ModelCache
from dsv4.config import ModelConfig
from dsv4.embedded import embedded_model_dir
from dsv4.engine.forward_batch import ForwardBatch
from dsv4.model.deepseek_v4 import DeepseekV4
from dsv4.model.layers import ModelOptions
from dsv4.tokenizer import load_tokenizer
from dsv4.weights import load_weights

PROMPTS = ["And God said unto Moses,", "In the beginning", "And it came to pass", "The LORD is my shepherd",
           "Then said Jesus unto", "And the king", "Blessed are", "And he answered and said"]


@torch.no_grad()
def accept_rate(model_dir: Path, n_prompts: int, n_tokens: int) -> tuple[int, int]:
    cfg = ModelConfig.from_json(model_dir)
    model = DeepseekV4(cfg, torch.float32, ModelOptions(quant_sim=False, ops="ref"), with_mtp=True).eval()
    load_weights(model, cfg, model_dir, progress=False)
    tok = load_tokenizer(model_dir, cfg.vocab_size)
    hits = total = 0
    for text in PROMPTS[:n_prompts]:
        ids = tok.encode(text, add_bos=True)
        cache = ModelCache(cfg, 1, 4096, 4096, page_size=16, with_mtp=True)
        mgr = CacheManager(cache)
        slot = mgr.alloc()
        seq, streams = list(ids), []
        pos = 0
        toks = list(ids)
        while len(seq) < len(ids) + n_tokens:  # greedy continuation, keeping the target's final streams
            mgr.reserve(slot, pos + len(toks))
            b = ForwardBatch.build([slot], [pos], [toks], all_logits=True)
            x = model(b, cache)
            streams.append(x)
            nxt = int(model.logits(x[-1:]).argmax(-1))
            pos += len(toks)
            seq.append(nxt)
            toks = [nxt]
        h = torch.cat(streams)  # [len(seq) - 1, hc, D]: streams of positions 0 .. len(seq)-2
        # draft at position i sees h[i] and token i+1, predicts token i+2
        n = len(seq) - 2
        b = ForwardBatch.build([slot], [0], [seq[1 : n + 1]], all_logits=True)
        draft = model.mtp_logits(model.forward_mtp(b, cache, h[:n])).argmax(-1).tolist()
        start = len(ids) - 1  # score only drafts of generated tokens
        for i in range(start, n):
            hits += int(draft[i] == seq[i + 2])
            total += 1
    return hits, total


def engine_acceptance(model_dir: Path, ks: list[int], n_prompts: int, n_tokens: int) -> list[dict]:
    from dsv4 import LLM, EngineConfig, SamplingParams

    params = SamplingParams(max_new_tokens=n_tokens, temperature=0, ignore_eos=True)

    def run(**kw):
        llm = LLM(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", **kw), progress=False)
        return llm, [o.token_ids for o in llm.generate(PROMPTS[:n_prompts], params)]

    _, plain = run()
    rows = []
    for k in ks:
        llm, got = run(speculative_algorithm="MTP", speculative_num_steps=k)
        st = llm.core.spec_stats
        rows.append({"k": k, "same_tokens": got == plain, "verifies": st.verifies, "drafts": st.proposed,
                     "accepted": st.accepted, "acceptance": round(st.accepted / max(1, st.proposed), 4),
                     "tokens_per_verify": round(st.mean_accepted_length, 4), "histogram": st.histogram})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--engine-k", default="", help="comma-separated k: measure through the engine instead")
    args = ap.parse_args()
    if args.engine_k:
        rows = engine_acceptance(args.model or embedded_model_dir(), [int(k) for k in args.engine_k.split(",")],
                                 args.prompts, args.tokens)
        print(f"{'k':>3} {'same':>5} {'verifies':>9} {'drafts':>7} {'accepted':>9} {'rate':>6} {'tok/verify':>10}  hist")
        for r in rows:
            print(f"{r['k']:>3} {r['same_tokens']!s:>5} {r['verifies']:>9} {r['drafts']:>7} {r['accepted']:>9} "
                  f"{r['acceptance']:>6.3f} {r['tokens_per_verify']:>10.3f}  {r['histogram']}")
        print(json.dumps(rows))
        return
    hits, total = accept_rate(args.model or embedded_model_dir(), args.prompts, args.tokens)
    print(f"{'k':>3} {'drafts':>7} {'accepted':>9} {'rate':>6}")
    print(f"{1:>3} {total:>7} {hits:>9} {hits / total:>6.3f}")
    print(json.dumps({"k": 1, "drafts": total, "accepted": hits, "acceptance": round(hits / total, 4)}))


if __name__ == "__main__":
    main()
