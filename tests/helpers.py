"""Tiny models built in code for tests (no download)."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, vocab: int = 256, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A random Llama-architecture model small enough for unit tests (GQA: k/v are narrower than q/o)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    return model
