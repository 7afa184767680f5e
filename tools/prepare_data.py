"""Build the tiny-model corpus: the King James Bible (public domain) from Debian, a BPE tokenizer, token files.

Debian's ``bible-kjv-text`` stores the text in its own compressed format, so the package's reader
(``bible-kjv``) is fetched too and only run to dump the verses. Steps, all deterministic:

1. ``apt-get download bible-kjv-text bible-kjv`` and ``dpkg -x`` into ``data/tiny/raw`` (skipped when present;
   ``--raw-text FILE`` uses an existing one-verse-per-line dump instead).
2. Normalise: NFC, ASCII quotes, single spaces; the verse reference is dropped; one document per chapter
   (verses joined by newlines).
3. Split by chapter: every ``--heldout-every``-th chapter (default 20) is held out.
4. Train a byte-level BPE tokenizer on the train split (``--vocab-size``, default 4096) with BOS id 0, EOS id 1
   and the DeepSeek-V4 chat markers as added special tokens.
5. Tokenize each split as ``BOS text EOS`` per document into ``train.bin`` / ``heldout.bin`` (uint16).

Outputs in ``--out`` (default ``data/tiny``, gitignored): tokenizer.json, tokenizer_config.json, train.txt,
heldout.txt, train.bin, heldout.bin, meta.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import unicodedata
from pathlib import Path

import numpy as np

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# DeepSeek-V4's chat markers: added so the chat template's prompts tokenize to one id each.
CHAT_MARKERS = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
SPECIALS = [BOS, EOS, *CHAT_MARKERS]
_REF = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")


def fetch_raw(raw_dir: Path) -> Path:
    """Download and unpack the two Debian packages, dump every verse; return the dump's path."""
    dump = raw_dir / "kjv.txt"
    if dump.is_file():
        return dump
    raw_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", "bible-kjv-text", "bible-kjv"], cwd=raw_dir, check=True,
                   stdout=subprocess.DEVNULL)
    for deb in sorted(raw_dir.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(raw_dir / "root")], check=True)
    root = raw_dir / "root"
    # -f turns pretty-printing off: one "Ge1:1 text" line per verse
    with open(dump, "w", encoding="utf-8") as f:
        subprocess.run([str(root / "usr/bin/bible"), "-f", "-p", str(root / "usr/lib"), "gen1:1-rev22:21"],
                       stdout=f, check=True)
    return dump


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    return re.sub(r"\s+", " ", text).strip()


def chapters(dump: Path) -> list[str]:
    """One document per chapter, verses in order, joined by newlines."""
    docs: list[list[str]] = []
    key = None
    for line in dump.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _REF.match(line.strip())
        if not m:
            if line.strip() and docs:  # a wrapped continuation line
                docs[-1][-1] += " " + normalise(line)
            continue
        book, chap, _, body = m.groups()
        if (book, chap) != key:
            key = (book, chap)
            docs.append([])
        docs[-1].append(normalise(body))
    return ["\n".join(v) for v in docs if v]


def train_tokenizer(texts: list[str], vocab_size: int):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    return tok


def tokenizer_config() -> dict:
    return {"bos_token": BOS, "eos_token": EOS, "add_bos_token": False, "add_eos_token": False,
            "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast",
            "additional_special_tokens": CHAT_MARKERS}


def encode_docs(tok, texts: list[str]) -> np.ndarray:
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids += [0, *enc.ids, 1]
    return np.asarray(ids, dtype=np.uint16)


def prepare(out: Path, vocab_size: int = 4096, heldout_every: int = 20, raw_text: Path | None = None,
            docs: list[str] | None = None) -> dict:
    """Write the corpus into ``out``; ``docs`` (tests) skips the download. Returns meta.json's content."""
    out.mkdir(parents=True, exist_ok=True)
    if docs is None:
        docs = chapters(raw_text or fetch_raw(out / "raw"))
    train = [d for i, d in enumerate(docs) if i % heldout_every != heldout_every - 1]
    held = [d for i, d in enumerate(docs) if i % heldout_every == heldout_every - 1]
    tok = train_tokenizer(train, vocab_size)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    meta = {"source": "Debian bible-kjv-text (King James Version, public domain)", "docs": len(docs),
            "vocab_size": tok.get_vocab_size(), "heldout_every": heldout_every}
    for name, texts in (("train", train), ("heldout", held)):
        (out / f"{name}.txt").write_text("\n\n".join(texts) + "\n", encoding="utf-8")
        arr = encode_docs(tok, texts)
        arr.tofile(out / f"{name}.bin")
        meta[f"{name}_docs"], meta[f"{name}_tokens"] = len(texts), int(arr.size)
        meta[f"{name}_sha256"] = hashlib.sha256(arr.tobytes()).hexdigest()
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data/tiny"))
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--heldout-every", type=int, default=20)
    ap.add_argument("--raw-text", type=Path, default=None, help="an existing `bible -f` dump (one verse a line)")
    args = ap.parse_args()
    print(json.dumps(prepare(args.out, args.vocab_size, args.heldout_every, args.raw_text), indent=2))


if __name__ == "__main__":
    main()
