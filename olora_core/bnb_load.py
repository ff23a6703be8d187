"""How a base model is quantized with bitsandbytes when it is loaded: one definition for training and serving.

The server (`app/engine/base_model.py`) and `olora train --quantize` build the same `BitsAndBytesConfig` and
apply the same CPU kernel switch, so a model trained on a quantized base runs on exactly the weights (and the same
kernels) the server later shares between adapters - what share-safe training (`olora_core/share_safe.py`) needs.
"""
from __future__ import annotations

import torch

CPU_4BIT_BLOCK_N = 32  # bitsandbytes' AVX512-BF16 4-bit kernel packs out_features in blocks of 32


def bnb_quantization_config(quantize: str, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for `quantize` (compute dtype = `dtype` for 4-bit), None for "none"."""
    from transformers import BitsAndBytesConfig

    if quantize in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=dtype)
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def avoid_unsupported_cpu_4bit_packing(net: torch.nn.Module) -> int:
    """bitsandbytes 0.50 repacks a Linear4bit's weight for its AVX512-BF16 CPU kernel at the first forward and
    needs out_features % 32 == 0 and in_features a multiple of the quantization block (the embedded model's
    688-wide MLP fails both). Such layers keep the generic 4-bit CPU path: still nf4/fp4, no repacking.
    Returns how many layers were switched."""
    switched = 0
    for module in net.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        blocksize = getattr(getattr(module.weight, "quant_state", None), "blocksize", 64) or 64
        if module.out_features % CPU_4BIT_BLOCK_N or module.in_features % blocksize:
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched
