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


def tiny_gpt2(seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, vocab: int = 256,
              dtype: torch.dtype = torch.float32):
    """A random GPT-2 (transformers Conv1D layers, weight stored in×out): c_attn 64→192, c_fc 64→256,
    c_proj 64→64 / 256→64."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    model = GPT2LMHeadModel(config).to(dtype)
    model.eval()
    return model


def quantized_tiny_llama(model_dir, bits: int, seed: int = 0):
    """tiny_llama(seed) saved to `model_dir` (once) and loaded back with bitsandbytes on CPU:
    bits=4 -> nf4 (fp32 compute, no double quant), bits=8 -> LLM.int8."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        tiny_llama(seed=seed).save_pretrained(model_dir)
    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.float32)
    elif bits == 8:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map="cpu")
    model.eval()
    return model
