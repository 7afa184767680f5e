"""benchmarks/decode.py in its CPU smoke mode (tiny widths): the card, the rows, the floors, the JSON line; the
random weights it gives dsv4 and transformers are the same model; its FLOP count matches the model's shapes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import rel_err

from dsv4.cache.manager import CacheManager
from dsv4.cache.model_cache import ModelCache
from dsv4.engine.forward_batch import ForwardBatch
from dsv4.model.deepseek_v4 import DeepseekV4
from dsv4.model.layers import ModelOptions

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the smoke mode is the CPU run; on a GPU the script builds the real Flash widths")


def _load() -> Any:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py"
    spec = importlib.util.spec_from_file_location("decode_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load()


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[dict, str]:
    result = bench.main(list(argv))
    out = capsys.readouterr().out
    last = json.loads(out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(result))
    return result, out


def test_smoke_sweep_card_rows_and_transformers(capsys: pytest.CaptureFixture[str]) -> None:
    r, out = _run(capsys)
    for text in ("# model:", "# weight bytes:", "# cache per layer:", "# floor = max(", "random cache contents"):
        assert text in out, text
    assert r["layers"] == ["sliding", "csa", "hca", "csa"]
    assert r["copy_gbps"] > 0 and r["matmul_tflops"] > 0 and r["weight_bytes"]["routed_experts"] > 0
    assert r["cache"]["csa"]["bytes_per_token"] > r["cache"]["hca"]["bytes_per_token"] > 0
    rows = {(x["impl"], x["kind"], x["batch"], x["ctx"]): x for x in r["rows"]}
    want = [("dsv4", "decode", b, c) for b in bench.BATCHES for c in bench.CONTEXTS]
    want += [("dsv4", "prefill", 1, t) for t in bench.PREFILLS]
    want += [("transformers", "decode", b, bench.HF_CTX) for b in bench.HF_BATCHES]
    want += [("transformers", "prefill", 1, t) for t in bench.PREFILLS]
    assert sorted(rows) == sorted(want)
    k = 2  # the smoke config's top-k
    for key, x in rows.items():
        assert x["ms"] > 0 and x["floor_ms"] > 0 and x["gbytes"] > 0 and x["tflop"] > 0, key
        assert x["ratio"] == pytest.approx(x["ms"] / x["floor_ms"], rel=0.02), key
        if key[0] == "dsv4" and key[1] == "decode" and key[2] == 1:
            assert x["experts"] == k, key  # one token routes to exactly top-k distinct experts per layer
    for b in bench.HF_BATCHES:
        assert rows[("dsv4", "decode", b, bench.HF_CTX)]["speedup_vs_hf"] > 0
    # more context reads more cache: the floor's bytes grow with it
    lo, hi = (rows[("dsv4", "decode", 2, c)]["gbytes"] for c in bench.CONTEXTS)
    assert hi > lo


def test_quantized_variant_and_profile(capsys: pytest.CaptureFixture[str]) -> None:
    r, _ = _run(capsys, "--weights", "fp8-fp4", "--no-hf", "--quick", "--kv-cache-dtype", "fp8")
    assert r["weights"] == "fp8-fp4" and r["weight_format"] in ("native", "dequantized")
    assert r["kv_cache"].startswith("fp8") and r["cache"]["csa"]["bytes_per_token"] < 192  # fp32 KV on the CPU: (512 + 256) / 4
    assert len(r["rows"]) == 5 and all(x["floor_ms"] > 0 for x in r["rows"])
    r, out = _run(capsys, "--profile", "--no-hf")
    assert "calls/step" in out
    decode = [(b, bench.PROFILE_CTX) for b in bench.HF_BATCHES]
    assert [(p.get("batch"), p.get("ctx")) for p in r["profiles"][:-1]] == decode
    assert r["profiles"][-1]["prefill"] == max(bench.PREFILLS)  # then the longest prefill
    assert all(p["launches_per_step"] > 0 and p["step_us"] > 0 and p["top"] for p in r["profiles"])


@pytest.fixture
def one_thread() -> Any:
    # tiny ops: OpenMP threads spinning on a busy 2-core CI box make them 20x slower (main() does the same)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("weights", ["bf16", "fp8-fp4"])
def test_transformers_gets_the_same_weights(weights: str, one_thread: None) -> None:
    """dsv4 filled by the benchmark's loader and transformers filled by build_hf give the same logits (fp32,
    no quantisation simulation; FP8/FP4 values dequantized on both sides)."""
    cfg = bench.model_config(4, weights)
    model = DeepseekV4(cfg, torch.float32, ModelOptions(quant_sim=False, ops="ref"), with_mtp=False).eval()
    bench.random_loader(weights, seed=5)(model, cfg, None)
    hf = bench.build_hf(cfg, weights, seed=5)
    ids = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    mgr = CacheManager(ModelCache(cfg, 1, 64, 64, page_size=4, with_mtp=False))
    slot = mgr.alloc()
    mgr.reserve(slot, len(ids))
    fb = ForwardBatch.build([slot], [0], [ids.tolist()], all_logits=True)
    with torch.no_grad():
        ours = model.logits(model(fb, mgr.cache))
        ref = hf(ids[None]).logits[0]
    assert rel_err(ours, ref).max() <= 1e-4


def test_dense_macs_match_the_model() -> None:
    """Cost.dense_macs equals the multiply-adds of every matrix a token meets: all 2-D weights of the layers
    (experts: top-k of them) plus the mHC mixing matrices."""
    cfg = bench.model_config(4, "bf16")
    with torch.device("meta"):
        model = DeepseekV4(cfg, torch.float32, ModelOptions(ops="ref"), with_mtp=False)
        cache = ModelCache(cfg, 1, 64, 64, device="meta", with_mtp=False)
    cost = bench.Cost(cfg, model, cache)
    macs = 0
    for name, p in model.named_parameters():
        if not name.startswith("layers.") or p.dim() < 2 or name.endswith(".ape"):
            continue
        if ".ffn.experts." in name:
            macs += p[0].numel() * cfg.num_experts_per_tok
        else:
            macs += p.numel()
    assert cost.dense_macs() == macs
    assert cost.head_macs() == model.head.weight.numel() + model.hc_head_fn.numel()


@pytest.mark.parametrize("weights", ["fp8", "fp8-fp4"])
def test_native_fill_matches_dequantized(weights: str, one_thread: None) -> None:
    """Native FP8/FP4 weights and scales written by the loader stand-in hold the values the dequantized fill
    holds: the two models agree (the CPU reference GEMMs dequantize the native weights)."""
    cfg = bench.model_config(4, weights)
    ids = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    outs = []
    for fmt in ("dequant", "native"):
        opts = ModelOptions(quant_sim=False, act_quant=True, ops="ref", weight_format=fmt)
        model = DeepseekV4(cfg, torch.float32, opts, with_mtp=False).eval()
        bench.random_loader(weights, seed=3)(model, cfg, None)
        mgr = CacheManager(ModelCache(cfg, 1, 64, 64, page_size=4, with_mtp=False))
        slot = mgr.alloc()
        mgr.reserve(slot, len(ids))
        with torch.no_grad():
            outs.append(model.logits(model(ForwardBatch.build([slot], [0], [ids], all_logits=True), mgr.cache)))
    assert rel_err(outs[1], outs[0]).max() <= 1e-5


def test_spent_budget_still_measures_one_point_of_each_kind(capsys: pytest.CaptureFixture[str]) -> None:
    """A budget the build alone spends (a cold GPU build takes ~55 s) still gives one decode and one prefill row."""
    r, out = _run(capsys, "--time-budget", "1e-6", "--no-hf")
    kinds = sorted(x["kind"] for x in r["rows"])
    assert kinds == ["decode", "prefill"], kinds
    assert "past 70% of --time-budget" in out
