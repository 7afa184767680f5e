"""Train a small DeepSeek-V4 with the project's own model code, and save it in the official checkpoint format.

The network is :class:`dsv4.model.deepseek_v4.DeepseekV4` itself (reference ops, no quantisation simulation),
driven exactly as the engine drives it: one training step is a fresh :class:`ModelCache` and one extend-mode
:class:`ForwardBatch` of ``--batch`` sequences from position 0, with logits for every row.

The MTP block is trained on the next-next token with ``--mtp-weight`` (default 0.3, DeepSeek-V3's lambda).
Its input streams (the main model's final streams) are *detached*: the draft head learns to read the target,
but its loss never reshapes the target, so the main model's perplexity (what the quality gates check) is the
same as without MTP. The shared embedding and head do receive the MTP gradient, as in DeepSeek-V3.

Output (``--out``): model.safetensors (official names, experts unstacked, official dtypes: bf16, fp32 for
hc_*/attn_sink/ape/gate.bias, int64 tid2eid), config.json, tokenizer.json, tokenizer_config.json and
train_report.json. ``--evaluate DIR`` (re)computes the report's quality numbers from a saved checkpoint through
the engine's own :class:`ModelRunner` (fp32, reference ops), on whatever device it runs, without training.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_common import (  # noqa: E402
    build_train_model,
    evaluate_dir,
    save_checkpoint,
    tiny_config,
)

from dsv4.cache.manager import CacheManager  # noqa: E402
from dsv4.cache.model_cache import ModelCache  # noqa: E402
from dsv4.engine.forward_batch import ForwardBatch  # noqa: E402
from dsv4.model.deepseek_v4 import DeepseekV4  # noqa: E402


def step_loss(model: DeepseekV4, seqs: torch.Tensor, mtp_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Main and MTP cross-entropy of ``seqs`` [B, S+2] (int64): the model sees tokens 0..S-1 of each row.

    Main: row t predicts token t+1. MTP: at position t it reads the main streams of t (detached) and the
    embedding of token t+1, and predicts token t+2 (spec 5; the engine's draft pairs them the same way).
    """
    b, s2 = seqs.shape
    s = s2 - 2
    cfg, dev = model.cfg, seqs.device
    cache = ModelCache(cfg, b, s, b * s, page_size=64, device=dev, with_mtp=mtp_weight > 0)
    mgr = CacheManager(cache)
    slots = [mgr.alloc() for _ in range(b)]
    for slot in slots:
        mgr.reserve(slot, s)
    rows = seqs.tolist()
    batch = ForwardBatch.build(slots, [0] * b, [r[:s] for r in rows], all_logits=True, device=dev)
    streams = model(batch, cache)
    logits = model.logits(streams)
    main = F.cross_entropy(logits.float(), seqs[:, 1:s + 1].reshape(-1))
    if mtp_weight <= 0:
        return main, torch.zeros((), device=dev)
    mbatch = ForwardBatch.build(slots, [0] * b, [r[1:s + 1] for r in rows], all_logits=True, device=dev)
    mstreams = model.forward_mtp(mbatch, cache, streams.detach())
    mtp = F.cross_entropy(model.mtp_logits(mstreams).float(), seqs[:, 2:s + 2].reshape(-1))
    return main, mtp


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))  # cosine down to 10% of peak


def batches(data: np.ndarray, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``seq + 2`` tokens (random offsets from a seeded generator)."""
    starts = torch.randint(0, len(data) - seq - 2, (batch,), generator=gen).tolist()
    return torch.from_numpy(np.stack([data[i:i + seq + 2].astype(np.int64) for i in starts]))


@torch.no_grad()
def quick_heldout(model: DeepseekV4, held: np.ndarray, seq: int, n: int, dev: torch.device,
                  autocast: bool) -> float:
    """Mean main loss on the first ``n`` consecutive held-out windows (fixed slice, current precision)."""
    model.eval()
    x = torch.from_numpy(np.stack([held[i * seq:i * seq + seq + 2].astype(np.int64) for i in range(n)])).to(dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        loss = step_loss(model, x, 0.0)[0].item()
    model.train()
    return loss


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    data_dir = Path(args.data)
    train_ids = np.fromfile(data_dir / "train.bin", dtype=np.uint16)
    held_ids = np.fromfile(data_dir / "heldout.bin", dtype=np.uint16)
    cfg = tiny_config(args.size, vocab_size=json.loads((data_dir / "meta.json").read_text())["vocab_size"])
    model = build_train_model(cfg, dev, seed=args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    autocast = dev.type == "cuda" and not args.fp32
    gen = torch.Generator().manual_seed(args.seed)
    print(f"device {dev}, {n_params / 1e6:.2f}M trainable params, autocast bf16: {autocast}", flush=True)
    t0, step, history = time.time(), 0, []
    budget = args.max_minutes * 60
    est_total = args.steps
    while step < args.steps:
        elapsed = time.time() - t0
        if elapsed > budget:
            break
        if step == 20 and dev.type == "cuda":  # re-plan the cosine to end when the time budget does
            est_total = min(args.steps, int(20 * budget / max(elapsed, 1e-6)))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, est_total, args.warmup, args.lr)
        x = batches(train_ids, args.batch, args.seq, gen).to(dev)
        try:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                main, mtp = step_loss(model, x, args.mtp_weight)
        except RuntimeError as e:
            if not (autocast and step == 0):
                raise
            # the reference ops may not all accept mixed dtypes: train in fp32 instead
            print(f"bf16 autocast failed ({e}); training in fp32", flush=True)
            autocast = False
            main, mtp = step_loss(model, x, args.mtp_weight)
        loss = main + args.mtp_weight * mtp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % args.log_every == 0 or step == 1:
            rec = {"step": step, "min": round((time.time() - t0) / 60, 2), "train": round(main.item(), 4),
                   "mtp": round(mtp.item(), 4)}
            if step % args.eval_every == 0:
                rec["heldout"] = round(quick_heldout(model, held_ids, args.seq, args.eval_windows, dev, autocast), 4)
                rec["heldout_ppl"] = round(math.exp(rec["heldout"]), 2)
            history.append(rec)
            print(json.dumps(rec), flush=True)
    out = Path(args.out)
    save_checkpoint(model, cfg, out, data_dir)
    report = {"steps": step, "minutes": round((time.time() - t0) / 60, 2), "device": str(dev),
              "autocast_bf16": autocast, "params": n_params, "config": vars(args) | {"out": str(out)},
              "history": history, "final_train_loss": history[-1]["train"] if history else None}
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    report["autocast_bf16"] = autocast
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.no_eval:
        return report
    report = evaluate_dir(out, data_dir / "heldout.bin", device=str(dev) if args.eval_on_device else "cpu")
    print(json.dumps({k: report[k] for k in ("heldout_loss", "heldout_ppl", "greedy_text")}), flush=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/tiny")
    ap.add_argument("--out", default="out/tiny_v4")
    ap.add_argument("--size", default="small", choices=["test", "small"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--max-minutes", type=float, default=9.0, help="stop training after this many minutes")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    ap.add_argument("--eval-on-device", action="store_true", help="final report on the training device")
    ap.add_argument("--no-eval", action="store_true", help="skip the engine evaluation after training")
    ap.add_argument("--evaluate", default=None, help="only (re)compute DIR's train_report.json quality numbers")
    args = ap.parse_args()
    if args.evaluate:
        r = evaluate_dir(Path(args.evaluate), Path(args.data) / "heldout.bin")
        print(json.dumps({k: r[k] for k in ("heldout_loss", "heldout_ppl", "greedy_text")}))
        return
    train(args)


if __name__ == "__main__":
    main()
