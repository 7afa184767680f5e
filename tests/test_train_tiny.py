"""Smoke test of tools/prepare_data.py + tools/train_tiny.py on CPU: a tiny random corpus, 3 steps, a checkpoint
that dsv4.LLM loads."""

from __future__ import annotations

import json
import math
import random
import sys
from argparse import Namespace
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

from prepare_data import prepare  # noqa: E402
from train_tiny import train  # noqa: E402


def test_train_tiny_smoke(tmp_path: Path) -> None:
    rng = random.Random(0)
    words = "the lord god said unto moses and israel king land people house day son father shall not".split()
    docs = [" ".join(rng.choice(words) for _ in range(120)) for _ in range(40)]
    data = tmp_path / "data"
    meta = prepare(data, vocab_size=300, heldout_every=4, docs=docs)
    assert meta["heldout_tokens"] > 8 * 257  # the fixed evaluation slice fits
    tok = json.loads((data / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert specials["<｜begin▁of▁sentence｜>"] == 0 and specials["<｜end▁of▁sentence｜>"] == 1
    assert {"<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"} <= set(specials)
    out = tmp_path / "out"
    args = Namespace(data=str(data), out=str(out), size="test", device="cpu", seed=0, batch=2, seq=32, steps=3,
                     lr=3e-3, warmup=1, mtp_weight=0.3, max_minutes=1.0, log_every=1, eval_every=3, eval_windows=1,
                     fp32=True, eval_on_device=False, no_eval=False, evaluate=None)
    report = train(args)
    losses = [h["train"] for h in report["history"]]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(report["heldout_loss"]) and len(report["greedy_token_ids"]) == 32
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json",
                                               "tokenizer_config.json", "train_report.json"}

    from dsv4 import LLM, EngineConfig, SamplingParams

    llm = LLM(EngineConfig(model=str(out), device="cpu", ops="ref", max_running_requests=1))
    o = llm.generate(["the lord"], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(o.token_ids) == 4
