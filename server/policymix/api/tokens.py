"""Token strings and bytes for logprobs, the way OpenAI returns them.

A token's text is its exact bytes decoded as UTF-8; a token that holds only part of a character
(byte-level BPE splits them) is shown as ``bytes:\\xe6\\x9d`` as OpenAI does, and chat logprobs
carry the raw ``bytes`` so that clients can join them.
"""

from __future__ import annotations

import re
from typing import Any


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-character map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_DECODER = _byte_decoder()
_HEX_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte-fallback tokens


def display(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class TokenTexts:
    """Token id -> (display string, raw bytes) for one tokenizer, cached (vocabularies are fixed)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = decoder is not None and "ByteLevel" in repr(decoder)
        self.special = set(getattr(tokenizer, "all_special_ids", None) or ())
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            data = self._bytes(token_id)
            hit = self._cache[token_id] = (display(data), data)
        return hit

    def text(self, token_id: int) -> str:
        return self(token_id)[0]

    def _bytes(self, token_id: int) -> bytes:
        tok = self.tokenizer
        piece = tok.convert_ids_to_tokens(token_id) if hasattr(tok, "convert_ids_to_tokens") else None
        if isinstance(piece, str) and piece:
            if token_id in self.special:
                return piece.encode("utf-8")
            if self.byte_level and all(c in _BYTE_DECODER for c in piece):
                return bytes(_BYTE_DECODER[c] for c in piece)
            m = _HEX_TOKEN.match(piece)
            if m:
                return bytes([int(m.group(1), 16)])
            if piece.startswith("▁"):  # SentencePiece marks a leading space that decode() may strip
                return piece.replace("▁", " ").encode("utf-8")
        return tok.decode([token_id], skip_special_tokens=False).encode("utf-8")


class TokenTextCache:
    """One TokenTexts per tokenizer object (several models share a family's tokenizer)."""

    def __init__(self) -> None:
        self._by_id: dict[int, TokenTexts] = {}

    def __call__(self, tokenizer: Any) -> TokenTexts:
        texts = self._by_id.get(id(tokenizer))
        if texts is None or texts.tokenizer is not tokenizer:
            texts = self._by_id[id(tokenizer)] = TokenTexts(tokenizer)
        return texts
