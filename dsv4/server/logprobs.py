"""Logprobs in OpenAI's two formats, from the engine's per-token ``logprobs`` and ``top_logprobs``.

Chat: ``logprobs.content = [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]``.
Completions: ``{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}``.

A token's string is its own bytes decoded as UTF-8. Byte-level tokens often hold part of a character;
such a token is spelled ``bytes:\\xe4\\xbd`` (vLLM's convention) and its exact bytes are in ``bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from dsv4.server.responses import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from dsv4.tokenizer import BYTE_OFFSET, ByteTokenizer, Tokenizer


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-character map used by byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


class TokenSpeller:
    """Strings and bytes of single token ids, cached per id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def _raw_bytes(self, tid: int) -> bytes:
        tok = self.tokenizer
        if isinstance(tok, ByteTokenizer):
            return bytes([tid - BYTE_OFFSET]) if BYTE_OFFSET <= tid < BYTE_OFFSET + 256 else b""
        lookup = getattr(tok, "id_to_token", None)
        piece = lookup(tid) if lookup is not None else None
        if piece is None:
            return tok.decode([tid]).encode("utf-8")
        table = _byte_decoder()
        if all(ch in table for ch in piece):  # a byte-level piece: undo the printable mapping
            return bytes(table[ch] for ch in piece)
        return piece.encode("utf-8")  # an added token (chat markers): its text is its spelling

    def spell(self, tid: int) -> tuple[str, list[int]]:
        """(token string, its bytes)."""
        hit = self._cache.get(tid)
        if hit is None:
            raw = self._raw_bytes(tid)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = self._cache[tid] = (text, list(raw))
        return hit


def chat_logprobs(speller: TokenSpeller, token_ids: Sequence[int], logprobs: Sequence[float],
                  top: Sequence[dict[int, float]] | None) -> ChatLogprobs:
    """Chat-format logprobs of ``token_ids`` (``top`` None when no alternatives were asked for)."""
    content = []
    for i, (tid, lp) in enumerate(zip(token_ids, logprobs, strict=True)):
        text, raw = speller.spell(tid)
        alts = []
        if top is not None:
            for alt, alp in top[i].items():
                atext, araw = speller.spell(alt)
                alts.append(TopLogprob(token=atext, logprob=alp, bytes=araw))
        content.append(TokenLogprob(token=text, logprob=lp, bytes=raw, top_logprobs=alts))
    return ChatLogprobs(content=content)


def completion_logprobs(speller: TokenSpeller, token_ids: Sequence[int], logprobs: Sequence[float],
                        top: Sequence[dict[int, float]] | None, offset: int) -> tuple[CompletionLogprobs, int]:
    """Completions-format logprobs; ``offset`` is where the first token's text starts in the choice text.

    Returns the logprobs and the offset after the last token. Two alternatives that spell the same string
    keep the higher logprob (the format is a string-keyed map).
    """
    out = CompletionLogprobs()
    for i, (tid, lp) in enumerate(zip(token_ids, logprobs, strict=True)):
        text, raw = speller.spell(tid)
        out.tokens.append(text)
        out.token_logprobs.append(lp)
        out.text_offset.append(offset)
        # a token holding part of a character adds no whole character to the text
        offset += len(bytes(raw).decode("utf-8", errors="ignore"))
        if top is not None:
            alts: dict[str, float] = {}
            for alt, alp in top[i].items():
                atext, _ = speller.spell(alt)
                alts[atext] = max(alp, alts.get(atext, float("-inf")))
            out.top_logprobs.append(alts)
        else:
            out.top_logprobs.append(None)
    return out, offset
