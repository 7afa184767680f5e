"""transformers 5.17.0 ``DeepseekV4ForCausalLM`` as the oracle: tiny configs, full randomisation, name map."""

from __future__ import annotations

import re

import torch

from dsv4.config import CSA, HCA, SLIDING, ModelConfig


def tiny_config(**kw) -> ModelConfig:
    """Sliding, CSA (ratio 4) and HCA (ratio 8) layers, hash and scored MoE, hc_mult 4, window 8."""
    base = dict(
        vocab_size=97, hidden_size=64, num_layers=4, num_heads=4, head_dim=32, rope_dim=8, q_lora_rank=24,
        o_groups=2, o_lora_rank=16, sliding_window=8, layer_kinds=(SLIDING, CSA, HCA, CSA),
        compress_ratios=(0, 4, 8, 4), num_mtp_layers=1, index_n_heads=8, index_head_dim=16, index_topk=3,
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, num_hash_layers=2,
        routed_scaling_factor=1.5, max_position_embeddings=4096,
    )
    base.update(kw)
    return ModelConfig(**base)


def tiny_config_b() -> ModelConfig:
    """A second shape: HCA first, CSA ratio 4, HCA ratio 16, larger top-k, one hash layer, 6 layers."""
    return tiny_config(
        num_layers=6, layer_kinds=(HCA, CSA, HCA, CSA, SLIDING, CSA), compress_ratios=(16, 4, 16, 4, 0, 4),
        num_hash_layers=1, index_topk=6, sliding_window=12, num_heads=8, o_groups=4, hidden_size=48,
    )


def make_hf_model(cfg: ModelConfig, seed: int = 0):
    """A transformers model for ``cfg`` with every parameter and buffer randomised (fp32, eval)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    hf_cfg = DeepseekV4Config(**cfg.to_hf_dict())
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(hf_cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[-1] if p.dim() >= 2 else 1
            if name.endswith(("norm.weight", "layernorm.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                rows = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.num_experts_per_tok]
                                    for _ in range(cfg.vocab_size)])
                b.copy_(rows)
            elif name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


_RENAMES = [
    (r"^model\.embed_tokens\.", "embed."), (r"^lm_head\.", "head."), (r"^model\.norm\.", "norm."),
    (r"^model\.hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"), (r"^model\.", ""),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"), (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.input_layernorm\.", ".attn_norm."), (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."), (r"\.mlp\.", ".ffn."),
    (r"\.q_a_proj\.", ".wq_a."), (r"\.q_a_norm\.", ".q_norm."), (r"\.q_b_proj\.", ".wq_b."),
    (r"\.o_a_proj\.", ".wo_a."), (r"\.o_b_proj\.", ".wo_b."), (r"\.sinks$", ".attn_sink"),
    (r"(compressor\.)kv_proj\.", r"\1wkv."), (r"(compressor\.)gate_proj\.", r"\1wgate."),
    (r"(compressor\.)kv_norm\.", r"\1norm."), (r"\.position_bias$", ".ape"), (r"\.kv_proj\.", ".wkv."),
    (r"\.e_score_correction_bias$", ".bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."), (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
]


def hf_to_dsv4_state(hf_model, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers in-memory names -> dsv4 parameter names (experts split into w1/w3/w2)."""
    out = {}
    sd = dict(hf_model.state_dict())
    for name, t in sd.items():
        if "rotary_emb" in name:
            continue
        if name.endswith("experts.gate_up_proj"):
            pre = _rename(name[: -len("gate_up_proj")])
            i = cfg.moe_intermediate_size
            out[pre + "w1"], out[pre + "w3"] = t[:, :i], t[:, i:]
            continue
        if name.endswith("experts.down_proj"):
            out[_rename(name[: -len("down_proj")]) + "w2"] = t
            continue
        out[_rename(name)] = t
    return out


def _rename(name: str) -> str:
    for pat, rep in _RENAMES:
        name = re.sub(pat, rep, name)
    return name
