"""dsv4/tokenizer.py: byte tokenizer, tokenizer.json loading, incremental detokenization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer, Tokenizer, load_tokenizer

TEXT = "héllo ✓ 日本語 🙂!"


def test_byte_round_trip() -> None:
    tok = ByteTokenizer(300)
    ids = tok.encode(TEXT, add_bos=True)
    assert ids[0] == tok.bos_id == 0 and tok.eos_ids == (1,)
    assert all(3 <= i < 259 for i in ids[1:])
    assert tok.decode(ids) == TEXT
    assert tok.encode("A", add_bos=False) == [3 + 65]
    # Specials and ids past the byte range decode to nothing.
    assert tok.decode([0, 1, 2, 3 + 65, 259, 299, 5000]) == "A"
    assert isinstance(tok, Tokenizer)


def test_byte_small_vocab_decodes_but_cannot_encode_text() -> None:
    tok = ByteTokenizer(97)
    assert tok.decode([3 + 65, 300]) == "A"
    with pytest.raises(ValueError, match="too small for byte-level text"):
        tok.encode("hello", add_bos=True)
    assert isinstance(load_tokenizer(None, 259), ByteTokenizer)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_incremental_never_emits_partial_chars(chunk: int) -> None:
    tok = ByteTokenizer(259)
    prompt = tok.encode("ü", add_bos=True)
    ids = tok.encode(TEXT, add_bos=False)
    det = IncrementalDetokenizer(tok, prompt)
    pieces = []
    for s in range(0, len(ids), chunk):
        piece = det.push(ids[s:s + chunk])
        assert "\ufffd" not in piece
        pieces.append(piece)
    pieces.append(det.flush())
    assert "".join(pieces) == TEXT == det.text
    assert det.output_ids == ids


def test_incremental_holds_then_flushes_incomplete() -> None:
    tok = ByteTokenizer(259)
    det = IncrementalDetokenizer(tok, [])
    e_acute = [3 + b for b in "é".encode()]
    assert det.push([3 + 97]) == "a"
    assert det.push(e_acute[:1]) == ""
    assert det.push(e_acute[1:]) == "é"
    assert det.push([3 + 0xE2]) == ""  # first byte of a 3-byte character, never completed
    assert det.flush() == "\ufffd"
    assert det.push([1]) == ""  # EOS decodes to nothing


def _write_tokenizer_json(path: Path) -> None:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT, "hello world", "the quick brown fox"] * 20, trainer)
    tok.save(str(path))


def test_hf_tokenizer_loads(tmp_path: Path) -> None:
    _write_tokenizer_json(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"__type": "AddedToken", "content": "<bos>"}, "eos_token": "<eos>"}))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 2]}))
    tok = load_tokenizer(tmp_path, 1024)
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert tok.bos_id == 0 and tok.eos_ids == (1, 2)
    assert tok.vocab_size == 1024
    ids = tok.encode(TEXT, add_bos=True)
    assert ids[0] == 0 and 0 not in ids[1:]
    assert tok.decode(ids) == TEXT  # BOS is special: not text
    assert tok.decode([*ids, 1, 1000]) == TEXT  # EOS and ids past the tokenizer decode to nothing
    det = IncrementalDetokenizer(tok, ids[:3])
    out = [det.push([i]) for i in ids[3:]]
    assert all("\ufffd" not in p for p in out)
    assert "".join(out) + det.flush() == tok.decode(ids[3:])


def test_hf_special_ids_from_config_only(tmp_path: Path) -> None:
    _write_tokenizer_json(tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    tok = load_tokenizer(tmp_path, 10)
    assert tok.bos_id == 0 and tok.eos_ids == (1, 2)
    assert tok.encode("hello", add_bos=False)[0] != 0


def test_hf_no_config_files(tmp_path: Path) -> None:
    _write_tokenizer_json(tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path, 10)
    assert tok.bos_id is None and tok.eos_ids == ()
    assert tok.encode("hello", add_bos=True) == tok.encode("hello", add_bos=False)


def test_hf_skip_special_tokens_per_request(tmp_path: Path) -> None:
    """Chat parsers need markers kept: skip_special_tokens=False decodes special tokens as their text."""
    _write_tokenizer_json(tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path, 1024)
    ids = tok.encode("hello", add_bos=False)
    eos = tok.token_to_id("<eos>")  # type: ignore[attr-defined]
    assert tok.decode([*ids, eos]) == "hello"
    assert tok.decode([*ids, eos], skip_special_tokens=False) == "hello<eos>"
    kept, dropped = IncrementalDetokenizer(tok, [], skip_special_tokens=False), IncrementalDetokenizer(tok, [])
    assert "".join(kept.push([i]) for i in [*ids, eos, *ids]) + kept.flush() == "hello<eos>hello"
    assert "".join(dropped.push([i]) for i in [*ids, eos, *ids]) + dropped.flush() == "hellohello"
