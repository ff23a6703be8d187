"""Tiny random-weight checkpoints of the popular decoder families, built with transformers' own classes.

Each `Family` says how to build the config (hidden 64, 2 layers, the byte tokenizer's 259 ids), which modules a
plain LoRA targets (the family's usual attention projections), and whether the engine serves it or refuses it at
start (then `refusal` is a fragment the start error must contain). Windowed families get a small window
(`WINDOW` tokens) so a test row can be longer than it and another shorter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from helpers import BOS_ID, BYTE_VOCAB, EOS_ID, PAD_ID, byte_tokenizer

VOCAB = BYTE_VOCAB + 3
WINDOW = 8  # attention window of the windowed tiny models (test prompts are longer and shorter than it)
MAX_POSITIONS = 2048
_COMMON = dict(vocab_size=VOCAB, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False)


@dataclass(frozen=True)
class Family:
    name: str  # test id (model_type, plus the variant)
    config_class: str  # transformers class name of the config
    kwargs: dict = field(default_factory=dict)
    plain_targets: tuple[str, ...] = ("q_proj", "v_proj")  # a plain LoRA's target_modules
    refusal: str | None = None  # None: served; else a fragment of the start error
    windowed: bool = False  # some layer attends to a window of WINDOW tokens
    expert_parameters: bool = False  # PEFT's "all-linear" also targets the fused expert weights (target_parameters)

    @property
    def served(self) -> bool:
        return self.refusal is None

    def build(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        config = getattr(transformers, self.config_class)(**{**_COMMON, **self.kwargs})
        model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
        model.generation_config.bos_token_id, model.generation_config.eos_token_id = BOS_ID, EOS_ID
        model.generation_config.pad_token_id = PAD_ID
        return model

    def save(self, path: Path, seed: int = 0) -> str:
        """The tiny checkpoint (safetensors) and the byte tokenizer under `path`."""
        self.build(seed).save_pretrained(str(path))
        byte_tokenizer().save_pretrained(str(path))
        return str(path)


FAMILIES = [
    Family("llama", "LlamaConfig", _LLAMA_LIKE),
    Family("mistral", "MistralConfig", {**_LLAMA_LIKE, "sliding_window": WINDOW}, windowed=True),
    Family("qwen2", "Qwen2Config", {**_LLAMA_LIKE, "use_sliding_window": True, "sliding_window": WINDOW,
                                    "max_window_layers": 1}, windowed=True),
    Family("qwen3", "Qwen3Config", {**_LLAMA_LIKE, "head_dim": 16}),
    Family("gemma2", "Gemma2Config", {**_LLAMA_LIKE, "head_dim": 16, "sliding_window": WINDOW}, windowed=True),
    Family("gemma3_text", "Gemma3TextConfig", {**_LLAMA_LIKE, "head_dim": 16, "sliding_window": WINDOW,
                                               "layer_types": ["sliding_attention", "full_attention"]},
           windowed=True),
    Family("phi3", "Phi3Config", {**_LLAMA_LIKE, "pad_token_id": PAD_ID}, plain_targets=("qkv_proj",)),
    Family("gpt_neox", "GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, max_position_embeddings=MAX_POSITIONS),
           plain_targets=("query_key_value",)),
    Family("starcoder2", "Starcoder2Config", {**_LLAMA_LIKE, "sliding_window": WINDOW}, windowed=True),
    Family("mixtral", "MixtralConfig", {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2},
           expert_parameters=True),
    Family("opt", "OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                    word_embed_proj_dim=64, max_position_embeddings=MAX_POSITIONS)),
    Family("falcon-new", "FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              num_kv_heads=2, new_decoder_architecture=True, alibi=False),
           plain_targets=("query_key_value",)),
    Family("falcon-old", "FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              new_decoder_architecture=False, multi_query=True, alibi=False,
                                              parallel_attn=True), plain_targets=("query_key_value",)),
    Family("gpt_neo", "GPTNeoConfig", dict(hidden_size=64, num_layers=2, num_heads=4, window_size=WINDOW,
                                           attention_types=[[["global", "local"], 1]],
                                           max_position_embeddings=MAX_POSITIONS), windowed=True),
    Family("qwen2_moe", "Qwen2MoeConfig", {**_LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2,
                                           "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64}),
    Family("gpt2", "GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS),
           plain_targets=("c_attn",)),
    Family("bloom", "BloomConfig", dict(hidden_size=64, n_layer=2, n_head=4),
           plain_targets=("query_key_value",)),
    Family("deepseek_v3", "DeepseekV3Config", dict(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=MAX_POSITIONS),
        plain_targets=("q_b_proj", "kv_b_proj"), expert_parameters=True),
    Family("deepseek_v2", "DeepseekV2Config", dict(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=MAX_POSITIONS),
        plain_targets=("q_proj", "kv_b_proj"), expert_parameters=True),
    Family("gpt_oss", "GptOssConfig", {**_LLAMA_LIKE, "head_dim": 16, "num_local_experts": 4,
                                       "num_experts_per_tok": 2, "sliding_window": WINDOW,
                                       "layer_types": ["sliding_attention", "full_attention"]},
           windowed=True),
    Family("gemma", "GemmaConfig", {**_LLAMA_LIKE, "head_dim": 16}),
    Family("olmo2", "Olmo2Config", _LLAMA_LIKE),
    Family("cohere", "CohereConfig", _LLAMA_LIKE),
    Family("gpt_bigcode", "GPTBigCodeConfig", dict(n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS,
                                                   multi_query=True), plain_targets=("c_attn",)),
    Family("gptj", "GPTJConfig", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=MAX_POSITIONS,
                                      tie_word_embeddings=False)),
    Family("mpt", "MptConfig", dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=MAX_POSITIONS),
           plain_targets=("Wqkv",)),
    Family("falcon-alibi", "FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                new_decoder_architecture=False, multi_query=True, alibi=True),
           plain_targets=("query_key_value",), refusal="falcon with alibi=True: ALiBi attention is not supported"),
]
BY_NAME = {f.name: f for f in FAMILIES}
