"""Text <-> token ids.

Two tokenizers behind one small protocol:

* :class:`HFTokenizer`: a model directory's ``tokenizer.json`` through the ``tokenizers`` library (no
  transformers import: it is slow and not needed). BOS/EOS come from ``tokenizer_config.json``,
  ``config.json`` and ``generation_config.json`` when present.
* :class:`ByteTokenizer`: for models without a tokenizer (the embedded tiny model, random test
  checkpoints): id 0 BOS, 1 EOS, 2 PAD, byte ``b`` -> ``3 + b``.

:class:`IncrementalDetokenizer` turns a stream of generated ids into a stream of text pieces that never
split a UTF-8 character (byte-level BPE tokens often end mid-character).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

BOS_ID, EOS_ID, PAD_ID, BYTE_OFFSET = 0, 1, 2, 3
REPLACEMENT_CHAR = "\ufffd"


@runtime_checkable
class Tokenizer(Protocol):
    bos_id: int | None
    eos_ids: tuple[int, ...]
    vocab_size: int

    def encode(self, text: str, add_bos: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens. ``vocab_size`` is the model's; ids past it or past the byte range decode to
    nothing. A model with fewer than 259 ids can still run on token-id prompts, but cannot encode text."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.bos_id: int | None = BOS_ID
        self.eos_ids: tuple[int, ...] = (EOS_ID,)

    def encode(self, text: str, add_bos: bool) -> list[int]:
        ids = [BYTE_OFFSET + b for b in text.encode("utf-8")]
        if ids and max(ids) >= self.vocab_size:
            raise ValueError(f"this model's vocabulary ({self.vocab_size} ids) is too small for byte-level text "
                             f"({BYTE_OFFSET + 256} needed) and it has no tokenizer.json: pass token ids instead")
        return [BOS_ID, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # BOS/EOS/PAD have no text in a byte vocabulary: they decode to nothing either way.
        data = bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < BYTE_OFFSET + 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` (byte-level BPE for DeepSeek) with the model's BOS/EOS ids."""

    def __init__(self, path: Path, vocab_size: int, bos_id: int | None = None,
                 eos_ids: Sequence[int] = ()) -> None:
        from tokenizers import Tokenizer as _RustTokenizer

        try:
            self._tok = _RustTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a bare Exception for unreadable or malformed files
            raise ValueError(f"{path}: cannot load tokenizer: {e}") from None
        self._n = self._tok.get_vocab_size(with_added_tokens=True)
        # The model's vocab is often padded past the tokenizer's; sampling works in the model's range.
        self.vocab_size = max(vocab_size, self._n)
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)

    @classmethod
    def from_dir(cls, model_dir: Path, vocab_size: int) -> HFTokenizer:
        tok = cls(model_dir / "tokenizer.json", vocab_size)
        tok.bos_id, tok.eos_ids = _special_ids(model_dir, tok)
        return tok

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of one id (byte-level pieces in their printable mapping), or None."""
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_bos: bool) -> list[int]:
        # NOTE: add_special_tokens=False: a tokenizer.json post-processor may add BOS on its own; we add
        # it explicitly so `add_bos` means exactly one BOS.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (BOS/EOS, and whatever tokenizer.json marks special) are dropped
        unless ``skip_special_tokens`` is False. Chat parsers turn it off so markers such as ``</think>`` and
        the DSML tool-call tags reach them whichever way a tokenizer.json classifies them."""
        return self._tok.decode([i for i in ids if 0 <= i < self._n], skip_special_tokens=skip_special_tokens)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return d if isinstance(d, dict) else {}


def _ids(v: Any) -> list[int]:
    if isinstance(v, bool):
        return []
    if isinstance(v, int):
        return [v]
    if isinstance(v, list):
        return [x for x in v if isinstance(x, int) and not isinstance(x, bool)]
    return []


def _token_id(tok: HFTokenizer, v: Any) -> int | None:
    """tokenizer_config.json spells special tokens as a string or as {"content": ...}."""
    content = v.get("content") if isinstance(v, dict) else v
    return tok.token_to_id(content) if isinstance(content, str) else None


def _special_ids(model_dir: Path, tok: HFTokenizer) -> tuple[int | None, tuple[int, ...]]:
    tc = _read_json(model_dir / "tokenizer_config.json")
    cfg = _read_json(model_dir / "config.json")
    gen = _read_json(model_dir / "generation_config.json")
    bos = _token_id(tok, tc.get("bos_token"))
    if bos is None:
        bos = next(iter(_ids(cfg.get("bos_token_id")) + _ids(gen.get("bos_token_id"))), None)
    # Any of the three may name an end token; stopping on all of them is what HF generation does.
    eos: list[int] = []
    for i in [_token_id(tok, tc.get("eos_token")), *_ids(cfg.get("eos_token_id")), *_ids(gen.get("eos_token_id"))]:
        if i is not None and i not in eos:
            eos.append(i)
    return bos, tuple(eos)


def load_tokenizer(model_dir: Path | None, vocab_size: int) -> Tokenizer:
    """The model directory's tokenizer.json if it has one, else the byte tokenizer."""
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        return HFTokenizer.from_dir(Path(model_dir), vocab_size)
    return ByteTokenizer(vocab_size)


class IncrementalDetokenizer:
    """Streams the text of generated ids, one completed piece per ``push``.

    Decodes a short window (a few ids already emitted as context, plus the new ones) rather than the
    whole output, and holds text back while the window's text ends with U+FFFD: the last token ended
    inside a multi-byte character whose remaining bytes are still to come. Context from the prompt's
    tail matters for tokenizers whose decoding of a token depends on its left neighbour (leading
    spaces in SentencePiece-style decoders).
    """

    CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        ctx = list(prompt_ids[-self.CONTEXT:])
        self._ids: list[int] = ctx
        self._prefix = 0  # window start: ids before it are never decoded again
        self._read = len(ctx)  # ids before it have had their text emitted
        self._n_prompt_ctx = len(ctx)
        self.text = ""  # everything emitted so far

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._n_prompt_ctx:]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, new_ids: Sequence[int]) -> str:
        """Add generated ids; return the newly completed text ('' while a character is incomplete)."""
        self._ids.extend(new_ids)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        if full.endswith(REPLACEMENT_CHAR) or len(full) <= len(prefix_text):
            return ""
        piece = full[len(prefix_text):]
        # Keep one emitted id window as left context for the next decode.
        self._prefix, self._read = self._read, len(self._ids)
        self.text += piece
        return piece

    def flush(self) -> str:
        """Emit whatever is held back (an unfinished character decodes to U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        piece = full[len(prefix_text):] if len(full) > len(prefix_text) else ""
        self._prefix, self._read = self._read, len(self._ids)
        self.text += piece
        return piece
