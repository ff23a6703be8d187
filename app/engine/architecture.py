"""What the engine must know about a model family, in one place (read by the runner, the KV cache, the LoRA layers).

`describe_architecture(model)` reads the transformers config (checked against transformers 5.24's model code) and
returns an `Architecture`, or raises BaseModelError naming the model type and what the engine lacks, so a model the
engine cannot run is refused at start, never accepted and then failed per request.

* attention windows per decoder layer (`layer_windows`, None = full attention): `layer_types` + `sliding_window`
  (Gemma 2/3, Qwen2/3, Qwen2-MoE, gpt-oss), one window for every layer (Mistral, Mixtral, Phi-3, StarCoder2),
  GPT-Neo's global/local `attention_layers` + `window_size`. A key k is visible from query q iff
  q - window < k <= q (transformers' sliding_window_overlay; GPT-Neo's local bias is the same);
* how a forward receives its masks (`mask_form`): MASK_TENSOR (one 4-D additive mask for every layer),
  MASK_BY_LAYER_TYPE (a dict {layer type: 4-D mask}, which transformers' models with `layer_types` accept as is),
  MASK_PER_MODULE (GPT-Neo: one mask for the model, the local layers' own window mask set by a pre-hook on their
  attention module, whose built-in local bias, placed at key_length - query_length, is replaced by the causal
  one so a row shorter than the batch's longest is not cut);
* KV layout (`KVLayout`): heads and per-head widths of what the attention hands to `cache.update` (DeepSeek-V2/V3
  cache the compressed latent and the shared rotary key: 1 head of kv_lora_rank and of qk_rope_head_dim);
* whether a batch without padding may run mask-free (`mask_free_ok`): never with windows;
* ALiBi: Bloom builds its bias from a 2-D padding mask (`BloomModel.build_alibi_tensor`); the engine's rows are
  right-padded from position 0, so key k sits at position k in every row and the bias is slope * k, which the
  model gets from the runner's 4-D mask through an instance override (`_prepare_bloom`). MPT's bias is relative
  to the last key (a per-row constant shift, which softmax ignores) and its mask is the 4-D one turned to bool: it
  runs as is. Falcon with alibi=True builds its bias from the 2-D mask in module code: refused.
Overrides (GPT-Neo's local bias, Bloom's ALiBi builder) change the engine's module tree in place; each comes with
its undo (`undo_overrides`), which the self-check's reference, a weight-sharing copy of that tree, applies so that
it runs transformers' own code (reference_model.py).
LoRA targets: nn.Linear and transformers Conv1D modules of the numbered blocks (fused qkv_proj / gate_up_proj /
query_key_value / c_attn are plain Linear/Conv1D modules: one slot pair each, as PEFT targets them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import BaseModelError

MASK_TENSOR, MASK_BY_LAYER_TYPE, MASK_PER_MODULE = "tensor", "by-layer-type", "per-module"
_ALIBI_REFUSED = {"falcon": "falcon with alibi=True: ALiBi attention is not supported (its bias is built from a "
                            "2-D padding mask the row KV cache does not pass; Falcon with rotary embeddings, "
                            "alibi=False, is served)"}
_ALIBI_MASKED = ("bloom", "mpt")  # their bias reaches the model only with the runner's mask: never mask-free
# model types whose attention caches the compressed latent (keys: kv_lora_rank wide, values: the rotary key)
_LATENT_KV = ("deepseek_v2", "deepseek_v3")


@dataclass(frozen=True)
class KVLayout:
    heads: int  # heads of the K/V handed to cache.update
    key_dim: int
    value_dim: int


@dataclass(frozen=True)
class Architecture:
    model_type: str
    n_layers: int
    layer_windows: tuple[int | None, ...]  # per decoder layer; None = full attention
    layer_types: tuple[str, ...] | None  # config.layer_types (MASK_BY_LAYER_TYPE keys)
    mask_form: str  # MASK_TENSOR | MASK_BY_LAYER_TYPE | MASK_PER_MODULE
    kv: KVLayout
    mask_free_ok: bool  # a batch without padding may run with attention_mask=None

    @property
    def windows(self) -> tuple[int | None, ...]:
        """The distinct windows of the model's layers (None = full attention)."""
        return tuple(dict.fromkeys(self.layer_windows))


def layer_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear (also bitsandbytes) or a transformers Conv1D (weight in x out)."""
    if type(module).__name__ == "Conv1D":
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return int(module.in_features), int(module.out_features)


def _window(value) -> int | None:
    """A config's sliding_window: None or <= 0 mean none (Qwen2-MoE writes 0)."""
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _layer_windows(cfg, n_layers: int) -> tuple[tuple[int | None, ...], tuple[str, ...] | None, str]:
    model_type = cfg.model_type
    if model_type == "gpt_neo":
        window = int(cfg.window_size)
        return tuple(window if kind == "local" else None for kind in cfg.attention_layers), None, MASK_PER_MODULE
    window = _window(getattr(cfg, "sliding_window", None))
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        layer_types = tuple(layer_types)
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise BaseModelError(f"{model_type}: layer types {sorted(unknown)} (linear/chunked attention) are not "
                                 "supported by the row KV cache")
        windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types)
        return windows, layer_types, MASK_BY_LAYER_TYPE
    return (window,) * n_layers, None, MASK_TENSOR


def _kv_layout(cfg) -> KVLayout:
    if cfg.model_type in _LATENT_KV:
        return KVLayout(1, int(cfg.kv_lora_rank), int(cfg.qk_rope_head_dim))
    heads = int(cfg.num_attention_heads)
    if cfg.model_type == "falcon":
        # FalconAttention: new_decoder_architecture caches K/V expanded to every query head; else multi_query
        # caches 1 head, and num_kv_heads otherwise
        kv_heads = heads if cfg.new_decoder_architecture else (1 if cfg.multi_query else int(cfg.num_kv_heads))
    else:
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return KVLayout(kv_heads, head_dim, head_dim)


def describe_architecture(model: nn.Module) -> Architecture:
    """The engine's view of `model` (module docstring); BaseModelError if the engine cannot run it exactly."""
    cfg = model.config
    model_type = str(cfg.model_type)
    if model_type == "falcon" and getattr(cfg, "alibi", False):
        raise BaseModelError(_ALIBI_REFUSED["falcon"])
    if getattr(cfg, "is_encoder_decoder", False):
        raise BaseModelError(f"{model_type}: encoder-decoder models are not supported (decoder-only causal LMs are)")
    n_layers = int(cfg.num_hidden_layers)
    windows, layer_types, mask_form = _layer_windows(cfg, n_layers)
    if len(windows) != n_layers:
        raise BaseModelError(f"{model_type}: {len(windows)} layer attention types for {n_layers} layers")
    if mask_form == MASK_TENSOR and len(set(windows)) > 1:
        raise BaseModelError(f"{model_type}: per-layer attention windows without layer_types are not supported")
    arch = Architecture(model_type=model_type, n_layers=n_layers, layer_windows=windows, layer_types=layer_types,
                        mask_form=mask_form, kv=_kv_layout(cfg),
                        mask_free_ok=all(w is None for w in windows) and model_type not in _ALIBI_MASKED)
    override = _OVERRIDES.get(model_type)
    if override is not None:
        override.apply(model)
    return arch


def undo_overrides(model: nn.Module) -> None:
    """Give `model`, a copy of an engine's model whose tensors are the engine's own (reference_model.py), back the
    transformers state that `describe_architecture` overrode, without modifying any tensor the copy shares."""
    override = _OVERRIDES.get(str(model.config.model_type))
    if override is not None:
        override.undo(model)


def _prepare_bloom(model: nn.Module) -> None:
    """BloomModel builds its ALiBi bias with `self.build_alibi_tensor(attention_mask, heads, dtype)` from a 2-D
    padding mask. The runner passes its 4-D additive mask (B, 1, T, L) instead; in the row cache key k of every
    row is at position k (right padding), which is what transformers' own function gives for a mask of ones."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    def row_alibi(attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
        rows, keys = attention_mask.shape[0], attention_mask.shape[-1]
        ones = torch.ones(rows, keys, dtype=torch.long, device=attention_mask.device)  # (B, L)
        return build_alibi_tensor(ones, num_heads, dtype)  # (B * heads, 1, L)

    model.transformer.build_alibi_tensor = row_alibi


def _undo_bloom(model: nn.Module) -> None:
    del model.transformer.build_alibi_tensor  # the instance attribute: BloomModel's own method shows again


def _prepare_gpt_neo(model: nn.Module) -> None:
    """GPT-Neo's local attention keeps a (P, P) bool bias and reads rows [key_length - query_length, key_length),
    which assumes every row of the batch ends at the last key: replace the local layers' bias by the causal one of
    the global layers; their window then comes from the forward's window mask (`install_window_hooks`)."""
    for block in model.transformer.h:
        attention = block.attn.attention
        if attention.attention_type == "local":
            attention.bias = torch.tril(torch.ones_like(attention.bias))


def _undo_gpt_neo(model: nn.Module) -> None:
    """transformers' local bias (GPTNeoSelfAttention.__init__: the causal bias XOR the keys window_size or more
    behind), as a new buffer of this module: the engine's causal buffer, shared with the copy, stays as it is."""
    window = int(model.config.window_size)
    for block in model.transformer.h:
        attention = block.attn.attention
        if attention.attention_type == "local":
            causal = torch.tril(torch.ones_like(attention.bias))  # (1, 1, P, P) bool
            attention.bias = torch.bitwise_xor(causal, torch.tril(causal, -window))


@dataclass(frozen=True)
class _Override:
    apply: Callable[[nn.Module], None]  # on the engine's model, at start
    undo: Callable[[nn.Module], None]  # on a weight-sharing copy of it: must not write a shared tensor


_OVERRIDES = {"gpt_neo": _Override(_prepare_gpt_neo, _undo_gpt_neo), "bloom": _Override(_prepare_bloom, _undo_bloom)}


def window_modules(model: nn.Module, arch: Architecture) -> list[tuple[nn.Module, int]]:
    """(attention module, window) of the layers whose window mask a pre-hook must set (MASK_PER_MODULE)."""
    if arch.mask_form != MASK_PER_MODULE:
        return []
    return [(block.attn.attention, window) for block, window in zip(model.transformer.h, arch.layer_windows)
            if window is not None]
