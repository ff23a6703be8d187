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


# ---- engine tests: a byte-level tokenizer and a saved tiny checkpoint --------------------------------------
BYTE_VOCAB = 256
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer():
    """A tokenizer with one token per byte (ids 0..255) + <s>=256, </s>=257, <pad>=258: every non-ASCII
    character spans several tokens, which exercises incremental detokenization."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab.update({"<s>": BOS_ID, "</s>": EOS_ID, "<pad>": PAD_ID})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_checkpoint(path, seed: int = 0, **kwargs) -> str:
    """Save tiny_llama(vocab=259, ...) + byte_tokenizer() as a local HF checkpoint (safetensors); returns path."""
    kwargs.setdefault("vocab", BYTE_VOCAB + 3)
    model = tiny_llama(seed=seed, **kwargs)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = BOS_ID, EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(str(path))
    byte_tokenizer().save_pretrained(str(path))
    return str(path)


def save_random_lora(base_dir, out_dir, r: int = 4, targets=("q_proj", "v_proj"), seed: int = 1,
                     a_std: float = 0.1, b_std: float = 0.05, **config_kwargs) -> str:
    """Build a PEFT LoRA on the checkpoint at base_dir with random (non-zero) A and B and save it with PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config_kwargs.setdefault("lora_alpha", 2 * r)
    targets = targets if isinstance(targets, str) else list(targets)  # "all-linear" as PEFT takes it
    peft_model = get_peft_model(model, LoraConfig(r=r, target_modules=targets, **config_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                std = a_std if "lora_A" in name else b_std
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    peft_model.save_pretrained(str(out_dir))
    return str(out_dir)


def save_adapter_set(root, specs: dict) -> tuple[str, object]:
    """A tiny checkpoint under root/base and one PEFT LoRA per `specs` entry (name -> save_random_lora kwargs)
    under root/adapters/<name>; returns (base dir, adapters dir)."""
    base = save_tiny_checkpoint(root / "base")
    for name, kwargs in specs.items():
        save_random_lora(base, root / "adapters" / name, **kwargs)
    return base, root / "adapters"


def overflow_at_run_time(monkeypatch, adapter_id: str) -> None:
    """What the load-time magnitude check cannot see (an input that drives a valid adapter out of range), without
    depending on finding such an input: after the check, the parsed A and B of `adapter_id` (any adapter whose
    path has a component named so) are each scaled by 1e30 (finite in fp32), so the delta x A^T B^T (~1e60) is
    +-inf in the residual stream and the next RMSNorm makes the row's logits NaN."""
    from pathlib import Path

    from app.engine.adapter_files import AdapterParser  # a frozen dataclass: patched on the class, for one test

    real_parse = AdapterParser.parse

    def parse(self, path):
        parsed = real_parse(self, path)
        if adapter_id in Path(path).parts:
            parsed.modules = {name: (a * 1e30, b * 1e30) for name, (a, b) in parsed.modules.items()}
        return parsed

    monkeypatch.setattr(AdapterParser, "parse", parse)


def save_trained_olora(base_dir, initial_dir, trained_dir, prompt: str, max_new_tokens: int = 8) -> str:
    """A real PEFT OLoRA adapter saved the way users save one (r=4 on q,v): `initial_dir` = its initial checkpoint,
    `trained_dir` = the 'trained' (randomly perturbed, seed 0) weights. Returns the trained PEFT model's greedy
    continuation of `prompt` on its own mutated base: what the converted adapter must reproduce."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights="olora", task_type="CAUSAL_LM"))
    peft_model.save_pretrained(str(initial_dir))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(str(trained_dir))
    peft_model.eval()
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, eos_token_id=None)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
