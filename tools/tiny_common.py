"""Shared pieces of the tiny-model tools: the configs, a trainable model, the saver, the engine-side evaluation.

The evaluation goes through the engine's own :class:`ModelRunner` (fp32, reference ops) and :class:`LLM`, so
the numbers in ``train_report.json`` are the ones the quality tests recompute from the shipped files.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from dsv4.checkpoint import config_json, random_tensor
from dsv4.config import CSA, HCA, SLIDING, ModelConfig
from dsv4.model.deepseek_v4 import DeepseekV4
from dsv4.model.layers import ModelOptions
from dsv4.weights import checkpoint_tensors, fused_placements, spec_view

# The fixed held-out slice and greedy sample every report (and the quality tests) use.
EVAL_WINDOWS, EVAL_SEQ = 8, 256
SAMPLE_PROMPT, SAMPLE_TOKENS = "And God said unto Moses,", 32


def tiny_config(size: str = "small", vocab_size: int = 4096) -> ModelConfig:
    """``small``: the shipped model (~7M params); ``test``: a few-second CPU smoke size.

    Layers: sliding, CSA(4), HCA(16), CSA(4); the first is hash-routed, the rest scored; one MTP block.
    """
    common = dict(
        vocab_size=vocab_size, num_layers=4, layer_kinds=(SLIDING, CSA, HCA, CSA), compress_ratios=(0, 4, 16, 4),
        num_mtp_layers=1, num_hash_layers=1, hc_mult=4, n_shared_experts=1, num_experts_per_tok=2,
        bos_token_id=0, eos_token_ids=(1,), quantization=None, expert_dtype="bf16",
    )
    if size == "test":
        return ModelConfig(hidden_size=64, num_heads=4, head_dim=32, rope_dim=16, q_lora_rank=32, o_groups=2,
                           o_lora_rank=16, sliding_window=16, index_n_heads=4, index_head_dim=32, index_topk=4,
                           moe_intermediate_size=32, n_routed_experts=4, **common)
    return ModelConfig(hidden_size=256, num_heads=8, head_dim=64, rope_dim=16, q_lora_rank=128, o_groups=2,
                       o_lora_rank=128, sliding_window=64, index_n_heads=4, index_head_dim=32, index_topk=16,
                       moe_intermediate_size=96, n_routed_experts=8, **common)


def build_train_model(cfg: ModelConfig, device: torch.device, seed: int = 0) -> DeepseekV4:
    """fp32 model (reference ops, no quantisation simulation) with the random writer's initial values, every
    floating parameter trainable. Residual output projections start small (GPT-2 style) so the 4 streams
    are not swamped at step 0."""
    with torch.device(device):
        model = DeepseekV4(cfg, torch.float32, ModelOptions(quant_sim=False, ops="ref"), with_mtp=True)
    state = model.state_dict()
    specs = checkpoint_tensors(cfg)
    placed = fused_placements(specs)
    with torch.no_grad():
        for spec in specs.values():
            value = random_tensor(spec, seed, cfg)
            if spec.name.endswith(("wo_b.weight", "w2.weight")):
                value = value * (2 * (cfg.num_layers + 1)) ** -0.5
            dst = spec_view(state, spec, placed)
            dst.copy_(value.to(dst.dtype))
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point())
    return model.train()


def save_checkpoint(model: DeepseekV4, cfg: ModelConfig, out: Path, tokenizer_dir: Path) -> None:
    """model.safetensors with the official names and dtypes (the loader's table inverted), config.json and
    the tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    specs = checkpoint_tensors(cfg)
    placed = fused_placements(specs)
    for spec in specs.values():
        t = spec_view(state, spec, placed).detach()
        tensors[spec.name] = t.to(spec.storage).cpu().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_json(cfg), indent=2, sort_keys=True) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, out / name)


def heldout_slice(heldout_bin: Path) -> list[list[int]]:
    """The fixed evaluation slice: the first EVAL_WINDOWS consecutive windows of EVAL_SEQ + 1 tokens."""
    ids = np.fromfile(heldout_bin, dtype=np.uint16).astype(np.int64)
    return [ids[i * EVAL_SEQ:(i + 1) * EVAL_SEQ + 1].tolist() for i in range(EVAL_WINDOWS)]


def engine_heldout_loss(model_dir: Path, windows: list[list[int]], quant_sim: bool = False,
                        device: str = "cpu") -> float:
    """Mean next-token loss over ``windows`` through the engine's ModelRunner (fp32, reference ops)."""
    from dsv4.config import ModelConfig as _MC
    from dsv4.engine.engine_config import EngineConfig
    from dsv4.engine.forward_batch import ForwardBatch
    from dsv4.engine.model_runner import ModelRunner

    seq = len(windows[0]) - 1
    ecfg = EngineConfig(model=str(model_dir), device=device, dtype="float32", ops="ref", quant_sim=quant_sim,
                        max_running_requests=len(windows), max_model_len=seq, max_total_tokens=len(windows) * seq)
    runner = ModelRunner(_MC.from_json(model_dir), ecfg, Path(model_dir), progress=False)
    mgr = runner.cache_manager
    slots = [mgr.alloc() for _ in windows]
    for s in slots:
        mgr.reserve(s, seq)
    batch = ForwardBatch.build(slots, [0] * len(windows), [w[:seq] for w in windows], all_logits=True,
                               device=runner.device)
    logits, _ = runner.forward(batch)
    target = torch.tensor([w[1:] for w in windows], device=logits.device).reshape(-1)
    return float(torch.nn.functional.cross_entropy(logits.double(), target))


def greedy_sample(model_dir: Path, device: str = "cpu") -> tuple[list[int], str]:
    """SAMPLE_TOKENS greedy tokens after SAMPLE_PROMPT through :class:`dsv4.LLM` (reference ops)."""
    from dsv4 import LLM, EngineConfig, SamplingParams

    llm = LLM(EngineConfig(model=str(model_dir), device=device, ops="ref", max_running_requests=1))
    out = llm.generate([SAMPLE_PROMPT], SamplingParams(max_new_tokens=SAMPLE_TOKENS, temperature=0,
                                                       ignore_eos=True))[0]
    return list(out.token_ids), out.text


def evaluate_dir(model_dir: Path, heldout_bin: Path, device: str = "cpu") -> dict[str, Any]:
    """Add the engine-computed quality numbers to ``model_dir/train_report.json`` and return the report."""
    path = model_dir / "train_report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    windows = heldout_slice(heldout_bin)
    loss = engine_heldout_loss(model_dir, windows, device=device)
    loss_fp8 = engine_heldout_loss(model_dir, windows, quant_sim=True, device=device)
    ids, text = greedy_sample(model_dir, device)
    report.update({
        "eval_device": device, "eval_windows": EVAL_WINDOWS, "eval_seq": EVAL_SEQ,
        "heldout_windows": windows, "heldout_loss": round(loss, 6), "heldout_ppl": round(math.exp(loss), 4),
        "heldout_loss_fp8kv": round(loss_fp8, 6), "heldout_ppl_fp8kv": round(math.exp(loss_fp8), 4),
        "greedy_prompt": SAMPLE_PROMPT, "greedy_token_ids": ids, "greedy_text": text,
    })
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report
