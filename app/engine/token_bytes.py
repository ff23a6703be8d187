"""The raw UTF-8 bytes of one token, which decoding the token alone cannot give.

A byte-level BPE token (GPT-2, Llama 3, the embedded default model) or a SentencePiece byte-fallback token
(`<0xE2>`) may hold part of a multi-byte character: `tokenizer.decode([id])` then returns U+FFFD and its bytes are
wrong. OpenAI's `logprobs.content[].bytes` exists so that clients can join such tokens back into text; this gives
those bytes from the tokenizer's own vocabulary.

    token_bytes = TokenBytes(tokenizer)
    token_bytes(226)  # b'\xe2' for a byte-level token holding the first byte of "→"
"""
from __future__ import annotations

import json
import re
from transformers.convert_slow_tokenizer import bytes_to_unicode

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _decoder_types(tokenizer) -> set[str]:
    """The types of the fast tokenizer's decoder (a Sequence lists its parts); empty for a slow tokenizer."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return set()
    try:  # the decoder's own JSON (its pickle state), not the whole tokenizer's with its vocabulary
        decoder = json.loads(decoder.__getstate__()) or {}
    except (ValueError, TypeError, AttributeError):
        return set()
    parts = decoder.get("decoders") or [decoder]
    return {str(p.get("type")) for p in parts if isinstance(p, dict)}


class TokenBytes:
    """`token_bytes(id) -> bytes`: a token's bytes in the text the tokenizer decodes to."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        types = _decoder_types(tokenizer)
        self._byte_level = {ch: b for b, ch in bytes_to_unicode().items()} if "ByteLevel" in types else None
        self._byte_fallback = "ByteFallback" in types
        self._metaspace = "Metaspace" in types or ("Replace" in types and self._byte_fallback)
        self._special = set(getattr(tokenizer, "all_special_ids", ()))
        self._known: dict[int, bytes] = {}  # token id -> bytes, filled as tokens are seen (bounded by the vocab)

    def __call__(self, token_id: int) -> bytes:
        found = self._known.get(token_id)
        if found is None:
            found = self._known[token_id] = self._bytes(token_id)
        return found

    def _decoded(self, token_id: int) -> bytes:
        return self.tokenizer.decode([token_id], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False).encode("utf-8")

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._special:
            return self._decoded(token_id)
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if not isinstance(piece, str):
            return self._decoded(token_id)
        if self._byte_level is not None and all(ch in self._byte_level for ch in piece):
            return bytes(self._byte_level[ch] for ch in piece)
        if self._byte_fallback:
            match = _BYTE_FALLBACK.match(piece)
            if match:
                return bytes([int(match.group(1), 16)])
            if self._metaspace:
                return piece.replace("\u2581", " ").encode("utf-8")
        return self._decoded(token_id)
