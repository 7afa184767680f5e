"""LLM.generate end to end on the embedded tiny model (fp32, CPU): batching invariance, sampling, stop rules,
logprobs against a direct forward, errors, and the cache left empty after every call."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from harness import build_model, new_cache, run_chunks

from dsv4 import LLM, EngineConfig, SamplingParams
from dsv4.engine.outputs import RequestOutput
from dsv4.weights import load_weights

GREEDY = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=1234, ignore_eos=True)
# Different lengths: shorter than one CSA window, past the sliding window (16) and several HCA windows (16).
PROMPTS: list[str | list[int]] = [
    "Hi",
    "The capital of France is",
    "A longer prompt that runs past the sliding window and several compressed windows.",
    [0] + [3 + (7 * i) % 250 for i in range(70)],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The embedded model written into a private cache (XDG_CACHE_HOME set before it is built)."""
    from dsv4.embedded import embedded_model_dir

    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("xdg")
        mp.setenv("XDG_CACHE_HOME", str(cache))
        d = embedded_model_dir()
        assert d.parent == cache / "dsv4"
        yield d
    assert os.environ.get("XDG_CACHE_HOME") != str(cache)


def make_llm(model_dir: Path | None, **kw: object) -> LLM:
    """``model_dir`` None: the embedded model (XDG_CACHE_HOME must point at the test cache)."""
    kw = {"device": "cpu", "dtype": "float32", "max_model_len": 512, **kw}
    return LLM(EngineConfig(model=None if model_dir is None else str(model_dir), **kw), progress=False)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> Iterator[LLM]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(model_dir.parent.parent))
        engine = make_llm(None)
    assert engine.model_dir == model_dir
    yield engine


def assert_cache_free(engine: LLM) -> None:
    mgr = engine.runner.cache_manager
    assert mgr.num_free_slots == engine.runner.cache.num_slots
    assert mgr.slot_pages == {}
    assert all(n == 0 for n in mgr.pages_in_use().values()), mgr.pages_in_use()
    assert all(int(t.abs().sum()) == 0 for t in engine.runner.cache.page_tables.values())


def gen(engine: LLM, prompts: str | list[int] | Sequence[str | list[int]],
        params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
    outs = engine.generate(prompts, params)
    assert_cache_free(engine)
    return outs


def ids_of(outs: list[RequestOutput]) -> list[list[int]]:
    return [o.token_ids for o in outs]


# ---- batching invariance ------------------------------------------------------------------------------------
def test_batched_equals_alone(llm: LLM) -> None:
    together = ids_of(gen(llm, PROMPTS, GREEDY))
    alone = [gen(llm, [p], GREEDY)[0].token_ids for p in PROMPTS]
    match = together == alone
    print(f"match: {match}")
    assert match
    assert all(len(t) == GREEDY.max_new_tokens for t in together)
    assert len({tuple(t) for t in together}) == len(PROMPTS)  # different prompts, different outputs
    # order inside the batch does not matter either, and outputs follow the prompts' order
    assert ids_of(gen(llm, PROMPTS[::-1], GREEDY)) == together[::-1]


def test_max_running_requests_and_chunked_prefill(model_dir: Path, llm: LLM) -> None:
    prompts = PROMPTS + ["x" * 40, [0, 50, 60]]
    ref = ids_of(gen(llm, prompts, GREEDY))
    one = make_llm(model_dir, max_running_requests=1)
    eight = make_llm(model_dir, max_running_requests=8)
    got_one, got_eight = ids_of(gen(one, prompts, GREEDY)), ids_of(gen(eight, prompts, GREEDY))
    print(f"match: {got_one == ref} (max_running_requests=1), {got_eight == ref} (8)")
    assert got_one == ref and got_eight == ref
    # prefill in chunks of 5 tokens, interleaved with the other requests' decodes
    small = make_llm(model_dir, chunked_prefill_size=5, max_running_requests=3)
    got_small = ids_of(gen(small, prompts, GREEDY))
    print(f"match: {got_small == ref} (chunked_prefill_size=5)")
    assert got_small == ref


def test_string_and_token_prompts(llm: LLM) -> None:
    text = "Hello"
    encoded = llm.tokenizer.encode(text, add_bos=True)
    assert encoded == [0] + [3 + b for b in text.encode()]
    outs = gen(llm, [text, encoded, "Hello"[::-1]], GREEDY)
    assert [o.prompt for o in outs] == [text, None, "olleH"]
    assert outs[0].prompt_token_ids == outs[1].prompt_token_ids == encoded
    assert outs[0].token_ids == outs[1].token_ids != outs[2].token_ids
    assert [o.request_id for o in outs] == sorted(o.request_id for o in outs)
    # a bare string and a bare list of ids are one prompt each
    assert ids_of(gen(llm, text, GREEDY)) == [outs[0].token_ids]
    assert ids_of(gen(llm, encoded, GREEDY)) == [outs[0].token_ids]
    # per-prompt params
    outs = gen(llm, [text, text], [GREEDY, GREEDY.replace(max_new_tokens=3)])
    assert [len(o.token_ids) for o in outs] == [24, 3] and outs[1].token_ids == outs[0].token_ids[:3]
    assert gen(llm, [], GREEDY) == []


# ---- sampling ----------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_batch_independent(llm: LLM) -> None:
    alone = gen(llm, "Hello", SAMPLED)[0].token_ids
    assert gen(llm, "Hello", SAMPLED)[0].token_ids == alone
    greedy = gen(llm, "Hello", GREEDY.replace(max_new_tokens=16))[0].token_ids
    assert alone != greedy  # temperature 0.8 really samples
    assert gen(llm, "Hello", SAMPLED.replace(seed=99))[0].token_ids != alone
    # the same request in a batch with others (greedy, other seeds, unseeded), at a different row
    mixed = gen(llm, ["abc", "Hello", "Hello", PROMPTS[3]],
                [SAMPLED.replace(seed=7), SAMPLED.replace(seed=None), SAMPLED, GREEDY])
    match = mixed[2].token_ids == alone
    print(f"match: {match}")
    assert match
    assert mixed[3].token_ids == gen(llm, [PROMPTS[3]], GREEDY)[0].token_ids


# ---- stop rules ----------------------------------------------------------------------------------------------
def test_max_new_tokens_is_length(llm: LLM) -> None:
    for n in (1, 5):
        (o,) = gen(llm, "Hi", SamplingParams(max_new_tokens=n, temperature=0))
        assert len(o.token_ids) == n and o.finish_reason == "length"


def test_stop_token_ids(llm: LLM) -> None:
    full = gen(llm, "Hello", GREEDY)[0]
    g = full.token_ids
    stop = g[5]
    k = g.index(stop)
    (o,) = gen(llm, "Hello", GREEDY.replace(stop_token_ids=[stop]))
    assert o.finish_reason == "stop" and o.token_ids == g[: k + 1]
    assert o.text == llm.tokenizer.decode(g[:k])  # the stop token itself is not text


def test_stop_strings(llm: LLM) -> None:
    full = gen(llm, PROMPTS[1], GREEDY.replace(max_new_tokens=40))[0]
    text, g = full.text, full.token_ids
    # a two-character stop string from the printable ASCII part of the output, not at its very start
    i = next(i for i in range(1, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].isprintable())
    s = text[i : i + 2]
    (o,) = gen(llm, PROMPTS[1], GREEDY.replace(max_new_tokens=40, stop=["\x00never", s]))
    assert o.finish_reason == "stop"
    assert o.text == text[: text.find(s)] and s not in o.text
    n = len(o.token_ids)
    assert o.token_ids == g[:n] and n < len(g)
    # it stopped at the first token whose text completes the stop string
    assert s in llm.tokenizer.decode(g[:n]) and s not in llm.tokenizer.decode(g[: n - 1])


def test_eos_and_ignore_eos(model_dir: Path, tmp_path: Path, llm: LLM) -> None:
    """A copy of the model whose EOS is a token the greedy output produces (weights do not depend on it)."""
    g = gen(llm, "Hello", GREEDY)[0].token_ids
    eos = g[4]
    k = g.index(eos)
    copy = tmp_path / "eos-model"
    shutil.copytree(model_dir, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (copy / "config.json").write_text(json.dumps(cfg))
    engine = make_llm(copy)
    assert engine.model_config.eos_token_ids == (eos,)
    (o,) = gen(engine, "Hello", GREEDY.replace(ignore_eos=False))
    assert o.finish_reason == "stop" and o.token_ids == g[: k + 1]
    (o,) = gen(engine, "Hello", GREEDY)  # ignore_eos=True
    assert o.finish_reason == "length" and o.token_ids == g
    # a stop id still stops under ignore_eos
    (o,) = gen(engine, "Hello", GREEDY.replace(stop_token_ids=[eos]))
    assert o.finish_reason == "stop" and o.token_ids == g[: k + 1]


# ---- logprobs ------------------------------------------------------------------------------------------------
def reference_logits(engine: LLM, prompt_ids: list[int], out_ids: list[int]) -> torch.Tensor:
    """Logits behind each generated token from a separately loaded model, fed as the engine fed it."""
    cfg = engine.model_config
    model = build_model(cfg, quant_sim=engine.config.quant_sim)
    load_weights(model, cfg, engine.model_dir, progress=False)
    cache, mgr = new_cache(cfg, slots=1, max_seq=512)
    ids = prompt_ids + out_ids[:-1]
    with torch.no_grad():
        logits = run_chunks(model, cache, mgr, mgr.alloc(), ids, [len(prompt_ids)] + [1] * (len(out_ids) - 1))
    return logits[len(prompt_ids) - 1 :]


def test_logprobs_match_direct_forward(llm: LLM) -> None:
    (o,) = gen(llm, PROMPTS[2], GREEDY.replace(max_new_tokens=12, logprobs=0))
    assert o.top_logprobs is None and o.logprobs is not None and len(o.logprobs) == len(o.token_ids) == 12
    ref = torch.log_softmax(reference_logits(llm, o.prompt_token_ids, o.token_ids).double(), dim=-1)
    assert ref.argmax(-1).tolist() == o.token_ids  # greedy
    want = ref.gather(1, torch.tensor(o.token_ids).view(-1, 1)).view(-1)
    got = torch.tensor(o.logprobs, dtype=torch.float64)
    print(f"max |logprob - reference| = {(got - want).abs().max():.2e}")
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert all(v < 0 for v in o.logprobs)


def test_top_logprobs(llm: LLM) -> None:
    params = SAMPLED.replace(max_new_tokens=12, logprobs=3, temperature=1.5, top_p=1.0)
    (o,) = gen(llm, PROMPTS[1], params)
    assert o.logprobs is not None and o.top_logprobs is not None
    assert len(o.logprobs) == len(o.top_logprobs) == len(o.token_ids) == 12
    # logprobs do not change what is sampled
    assert gen(llm, PROMPTS[1], params.replace(logprobs=None))[0].token_ids == o.token_ids
    ref = torch.log_softmax(reference_logits(llm, o.prompt_token_ids, o.token_ids).double(), dim=-1)
    outside = 0
    for i, (tok, lp, top) in enumerate(zip(o.token_ids, o.logprobs, o.top_logprobs, strict=True)):
        assert len(top) == 3
        vals = list(top.values())
        assert vals == sorted(vals, reverse=True)
        ref_top = torch.topk(ref[i], 3)
        assert list(top) == ref_top.indices.tolist()
        assert torch.allclose(torch.tensor(vals, dtype=torch.float64), ref_top.values, atol=1e-4, rtol=0)
        # the sampled token's logprob is the raw (untempered) one: in the top-3 dict if it is there
        assert math.isclose(lp, float(ref[i, tok]), abs_tol=1e-4)
        if tok in top:
            assert top[tok] == lp
        else:
            assert lp <= vals[-1]
            outside += 1
    assert outside > 0  # temperature 1.5 sampled below the top 3 at least once: that branch ran


# ---- errors ----------------------------------------------------------------------------------------------------
def test_request_errors(llm: LLM) -> None:
    good = gen(llm, "Hello", GREEDY)[0].token_ids
    with pytest.raises(ValueError, match=r"maximum context of 512 tokens"):
        llm.generate([[0] * 500], SamplingParams(max_new_tokens=13))
    llm.generate([[0] * 500], SamplingParams(max_new_tokens=12, temperature=0))  # exactly at the limit is fine
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[0, 5, 512]], GREEDY)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[0, -1]], GREEDY)
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate("Hello", GREEDY.replace(stop_token_ids=[512]))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="2 prompts but 1 SamplingParams"):
        llm.generate(["a", "b"], [GREEDY])
    # a good prompt in the same call as a bad one: nothing runs, nothing leaks
    with pytest.raises(ValueError, match="out of range"):
        llm.generate(["Hello", [9999]], GREEDY)
    assert_cache_free(llm)
    assert gen(llm, "Hello", GREEDY)[0].token_ids == good


@pytest.mark.parametrize("kw, name", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"stop": [""]}, "stop"),
])
def test_bad_sampling_params(kw: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name} "):
        SamplingParams(**kw)  # type: ignore[arg-type]


def test_missing_model_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as e:
        make_llm(missing)
    assert str(missing) in str(e.value)


def test_max_model_len_beyond_the_model(model_dir: Path) -> None:
    limit = 1048576  # the embedded model's max_position_embeddings
    with pytest.raises(ValueError, match=rf"--max-model-len {limit + 1} exceeds .*max_position_embeddings \({limit}\)"):
        make_llm(model_dir, max_model_len=limit + 1)


def test_request_too_big_for_the_page_pool(model_dir: Path) -> None:
    """max_total_tokens too small for one request: refused up front, before other requests run."""
    engine = make_llm(model_dir, max_model_len=4096, max_total_tokens=16, max_running_requests=1)
    with pytest.raises(ValueError, match="max-total-tokens"):
        engine.generate(["Hi", [5] * 1000], GREEDY)
    assert_cache_free(engine)
    assert len(gen(engine, "Hi", GREEDY)[0].token_ids) == GREEDY.max_new_tokens


def test_failure_mid_generation_frees_the_cache(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_llm(model_dir)
    ref = ids_of(gen(engine, PROMPTS, GREEDY))
    real_forward, calls = engine.runner.forward, [0]

    def failing_forward(batch: object) -> object:
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected failure")
        return real_forward(batch)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.runner, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="injected failure"):
        engine.generate(PROMPTS, GREEDY)
    assert calls[0] == 3
    assert_cache_free(engine)
    monkeypatch.setattr(engine.runner, "forward", real_forward)
    assert ids_of(gen(engine, PROMPTS, GREEDY)) == ref
