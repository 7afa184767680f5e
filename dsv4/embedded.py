"""The built-in tiny DeepSeek-V4: the trained one shipped in the package, else random weights in the user cache.

``dsv4/data/tiny_v4`` (when the package ships it) is a small V4 trained on the King James Bible by
``tools/train_tiny.py``, with its own BPE tokenizer; it is the default model. ``DSV4_EMBEDDED=random`` (the
test suite sets it) or a package without it selects the random model below instead.

The random model is written on first use into the user cache.

It exercises sliding, CSA and HCA layers (HCA with ratio 16 so short prompts produce compressed entries),
hash routing, mHC with 4 streams, grouped output projections, the Lightning Indexer and one MTP block.
There is no tokenizer.json: the engine falls back to its byte-level tokenizer (0 BOS, 1 EOS, 2 PAD,
byte b -> 3 + b), which the 512-entry vocabulary covers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from dsv4.checkpoint import write_random_checkpoint
from dsv4.config import CSA, HCA, SLIDING, ModelConfig

# Bump when the writer's output for a fixed config changes, so stale cached copies are not reused.
_FORMAT_VERSION = 1
_SEED = 0


def embedded_model_config() -> ModelConfig:
    """The tiny V4: vocab 512, hidden 64, layers [sliding, csa(4), hca(16), csa(4)], 1 MTP layer, fp32-friendly."""
    return ModelConfig(
        vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, head_dim=64, rope_dim=16,
        q_lora_rank=32, o_groups=2, o_lora_rank=32, sliding_window=16,
        layer_kinds=(SLIDING, CSA, HCA, CSA), compress_ratios=(0, 4, 16, 4), num_mtp_layers=1,
        index_n_heads=8, index_head_dim=32, index_topk=4,
        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        num_hash_layers=2, hc_mult=4,
        bos_token_id=0, eos_token_ids=(1,), quantization=None, expert_dtype="bf16",
    )


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dsv4"


SHIPPED_DIR = Path(__file__).resolve().parent / "data" / "tiny_v4"


def shipped_model_dir() -> Path | None:
    """The trained tiny model shipped with the package, or None when this install has none."""
    ok = (SHIPPED_DIR / "config.json").is_file() and (SHIPPED_DIR / "model.safetensors").is_file()
    return SHIPPED_DIR if ok else None


def embedded_model_dir() -> Path:
    """The default model: the shipped trained one, unless ``DSV4_EMBEDDED=random`` or it is missing."""
    shipped = shipped_model_dir()
    if shipped is not None and os.environ.get("DSV4_EMBEDDED", "").lower() != "random":
        return shipped
    return random_model_dir()


def random_model_dir() -> Path:
    """Directory of the random embedded checkpoint (config.json + model.safetensors), written once per cache.

    ``$XDG_CACHE_HOME/dsv4/embedded-<hash>`` (default ``~/.cache``). The hash covers the config, the seed
    and the writer format version. It is written into a temporary sibling and renamed into place, so
    concurrent first uses are safe: the loser of the rename discards its copy.
    """
    cfg = embedded_model_config()
    key = json.dumps({"cfg": cfg.to_hf_dict(), "seed": _SEED, "v": _FORMAT_VERSION}, sort_keys=True)
    root = _cache_root()
    final = root / f"embedded-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".embedded-tmp-", dir=root))
    try:
        write_random_checkpoint(cfg, tmp, seed=_SEED)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first (the target exists and is not empty): use its copy.
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
