"""TokenBytes: a token's raw bytes, joined over a text's tokens, give back the text's UTF-8 even where one token
holds part of a character (then decoding it alone gives U+FFFD, which is what OpenAI's `bytes` field is for)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from app.engine.token_bytes import TokenBytes
from olora_core.default_model import default_model_path


@pytest.fixture(scope="module")
def default_tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def test_byte_level_tokens_of_a_character_split_across_tokens(default_tokenizer):
    text = "héllo → 日本 ok"
    ids = default_tokenizer(text, add_special_tokens=False)["input_ids"]
    alone = [default_tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in a for a in alone)  # the problem exists with this tokenizer
    token_bytes = TokenBytes(default_tokenizer)
    assert b"".join(token_bytes(i) for i in ids) == default_tokenizer.decode(ids).encode("utf-8")
    assert token_bytes(ids[5]) == token_bytes(ids[5])  # cached path gives the same answer


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=24))
def test_joined_bytes_are_the_decoded_text(text):
    tok = AutoTokenizer.from_pretrained(default_model_path())
    ids = tok(text, add_special_tokens=False)["input_ids"]
    token_bytes = TokenBytes(tok)
    assert b"".join(token_bytes(i) for i in ids) == tok.decode(ids, clean_up_tokenization_spaces=False).encode("utf-8")


def _byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style SentencePiece BPE: '▁' for spaces, <0xNN> byte pieces for what the vocabulary lacks."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ("▁", "h", "i", "▁h", "▁hi", "é", "o", "k", "▁o", "▁ok"):
        vocab[piece] = len(vocab)
    merges = [("▁", "h"), ("▁h", "i"), ("▁", "o"), ("▁o", "k")]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_sentencepiece_byte_fallback_pieces():
    tok = _byte_fallback_tokenizer()
    ids = tok("hi é → ok", add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert "<0xE2>" in pieces  # '→' is not in the vocabulary: three byte pieces
    token_bytes = TokenBytes(tok)
    assert token_bytes(tok.convert_tokens_to_ids("<0xE2>")) == b"\xe2"
    joined = b"".join(token_bytes(i) for i in ids)
    assert joined.decode("utf-8").strip() == tok.decode(ids)  # the decoder strips the first piece's space
