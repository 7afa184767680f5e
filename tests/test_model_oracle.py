"""dsv4 against transformers 5.17.0 DeepseekV4ForCausalLM loading the same checkpoint files (fp32)."""

from __future__ import annotations

import pytest
import torch
from harness import build_model, new_cache, rel_err, run_chunks
from oracle import make_hf_model, tiny_config, tiny_config_b

from dsv4.config import ModelConfig
from dsv4.engine.llm import LLM
from dsv4.engine.sampling_params import SamplingParams
from dsv4.weights import load_weights

CONFIGS = {"a": tiny_config, "b": tiny_config_b}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(cfg, hf model, dsv4 model, checkpoint dir): transformers saves, dsv4 loads the same files."""
    cfg = CONFIGS[request.param]()
    hf = make_hf_model(cfg, seed=1)
    d = tmp_path_factory.mktemp(f"ckpt_{request.param}")
    hf.save_pretrained(d, safe_serialization=True)
    assert ModelConfig.from_json(d).layer_kinds == cfg.layer_kinds
    model = build_model(cfg)
    load_weights(model, cfg, d, progress=False)
    return cfg, hf, model, d


def test_logits_every_position(pair):
    cfg, hf, model, _ = pair
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (70,), generator=g)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    cache, mgr = new_cache(cfg)
    ours = run_chunks(model, cache, mgr, mgr.alloc(), ids.tolist(), [70])
    err = rel_err(ours, ref)
    assert err.max() <= 1e-4, err
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_greedy_32_tokens_match(pair):
    cfg, hf, _, d = pair
    prompt = torch.randint(0, cfg.vocab_size, (21,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.generate(prompt[None], max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, 21:].tolist()
    llm = LLM(str(d), dtype="float32", device="cpu", quant_sim=False, max_running_requests=2, progress=False)
    out = llm.generate([prompt.tolist()], SamplingParams(temperature=0, max_new_tokens=32, ignore_eos=True))
    assert out[0].token_ids == ref
