"""The MTP block against a plain transcription of DSV4_SPEC section 5.

transformers has no MTP, so the MTP-specific parts (enorm/hnorm, e_proj + h_proj per stream, its own hyper
head and norm, the shared head) are written out below; the block in the middle is transformers' own
DeepseekV4DecoderLayer for a sliding-window, scored-MoE layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import build_model, new_cache, rel_err
from oracle import hf_to_dsv4_state, make_hf_model, tiny_config

from dsv4.config import SLIDING
from dsv4.engine.forward_batch import ForwardBatch


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _setup():
    cfg = tiny_config()
    main = hf_to_dsv4_state(make_hf_model(cfg, seed=4), cfg)
    # a one-layer transformers model whose only layer is shaped like the MTP block (sliding, scored MoE)
    one = cfg.replace(num_layers=1, layer_kinds=(SLIDING,), compress_ratios=(0,), num_hash_layers=0)
    hf1 = make_hf_model(one, seed=5)
    blk = {k.replace("layers.0.", "mtp.0.", 1): v for k, v in hf_to_dsv4_state(hf1, one).items()
           if k.startswith("layers.0.")}
    g = torch.Generator().manual_seed(6)
    d, hc = cfg.hidden_size, cfg.hc_mult
    extra = {
        "mtp.0.e_proj.weight": torch.randn(d, d, generator=g) / d**0.5,
        "mtp.0.h_proj.weight": torch.randn(d, d, generator=g) / d**0.5,
        "mtp.0.enorm.weight": 1 + 0.1 * torch.randn(d, generator=g),
        "mtp.0.hnorm.weight": 1 + 0.1 * torch.randn(d, generator=g),
        "mtp.0.norm.weight": 1 + 0.1 * torch.randn(d, generator=g),
        "mtp.0.hc_head_fn": 0.1 * torch.randn(hc, hc * d, generator=g),
        "mtp.0.hc_head_base": 0.5 * torch.randn(hc, generator=g),
        "mtp.0.hc_head_scale": 0.5 * torch.randn(1, generator=g),
    }
    state = {**main, **blk, **extra}
    model = build_model(cfg, state, with_mtp=True)
    return cfg, model, state, hf1


def _reference(cfg, state, hf1, ids, h_prev):
    """Spec 5.2 written out, for one sequence starting at position 0."""
    s = ids.shape[0]
    e = _rms(F.embedding(ids, state["embed.weight"]), state["mtp.0.enorm.weight"])
    hn = _rms(h_prev, state["mtp.0.hnorm.weight"])
    x = (e @ state["mtp.0.e_proj.weight"].T)[:, None, :] + hn @ state["mtp.0.h_proj.weight"].T
    layer = hf1.model.layers[0]
    pos = torch.arange(s)[None]
    rope = {k: hf1.model.rotary_emb(x, pos, layer_type=k) for k in ("main", "compress")}
    i = torch.arange(s)
    allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - cfg.sliding_window)
    mask = torch.zeros(s, s).masked_fill(~allowed, float("-inf"))[None, None]
    with torch.no_grad():
        x = layer(x[None], input_ids=ids[None], position_embeddings=rope, position_ids=pos, attention_mask=mask)[0]
    flat = x.flatten(1)
    mix = (flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + 1e-6)) @ state["mtp.0.hc_head_fn"].T
    pre = torch.sigmoid(mix * state["mtp.0.hc_head_scale"][0] + state["mtp.0.hc_head_base"]) + cfg.hc_eps
    h = _rms((pre[..., None] * x).sum(1), state["mtp.0.norm.weight"])
    return h @ state["head.weight"].T


def test_mtp_block_matches_spec_transcription():
    cfg, model, state, hf1 = _setup()
    s = 27
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, cfg.vocab_size, (s,), generator=g)
    h_prev = torch.randn(s, cfg.hc_mult, cfg.hidden_size, generator=g)
    ref = _reference(cfg, state, hf1, ids, h_prev)
    cache, mgr = new_cache(cfg, with_mtp=True)
    slot = mgr.alloc()
    mgr.reserve(slot, s)
    # one shot, then in chunks from a fresh slot: the MTP's own window cache must carry over
    b = ForwardBatch.build([slot], [0], [ids.tolist()], all_logits=True)
    ours = model.mtp_logits(model.forward_mtp(b, cache, h_prev))
    assert rel_err(ours, ref).max() <= 1e-4
    slot2 = mgr.alloc()
    mgr.reserve(slot2, s)
    parts, p = [], 0
    for c in (4, 1, 9, 13):
        b = ForwardBatch.build([slot2], [p], [ids[p : p + c].tolist()], all_logits=True)
        parts.append(model.mtp_logits(model.forward_mtp(b, cache, h_prev[p : p + c])))
        p += c
    assert rel_err(torch.cat(parts), ref).max() <= 1e-4


def test_forward_mtp_rows_matches_forward_mtp():
    """The draft catch-up's forward (MoE only for the rows it keeps) gives those rows' streams, and writes the
    same window cache: a next token read from it gives the same logits."""
    cfg, model, _, _ = _setup()
    g = torch.Generator().manual_seed(9)
    cache, mgr = new_cache(cfg, with_mtp=True)
    slots = [mgr.alloc() for _ in range(4)]
    for s in slots:
        mgr.reserve(s, 16)
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=g).tolist()
    h_prev = torch.randn(14, cfg.hc_mult, cfg.hidden_size, generator=g)
    rows = torch.tensor([3, 6, 13])
    full = model.forward_mtp(ForwardBatch.build(slots[:2], [0, 0], ids), cache, h_prev)[rows]
    part = model.forward_mtp(ForwardBatch.build(slots[2:], [0, 0], ids), cache, h_prev, rows=rows)
    assert rel_err(part, full).max() <= 1e-5
    nxt = torch.randn(2, cfg.hc_mult, cfg.hidden_size, generator=g)
    a, b = (model.mtp_logits(model.forward_mtp(ForwardBatch.build(s, [7, 7], [[5], [9]]), cache, nxt))
            for s in (slots[:2], slots[2:]))
    assert rel_err(b, a).max() <= 1e-5
