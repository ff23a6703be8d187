"""Numeric tolerances of the suite, each derived from the arithmetic rather than tuned on one CPU.

Semantics: two computations of the same quantity in floating point differ by rounding only; the bound on that
difference is (unit roundoff of the dtype) x (magnitude of the values summed) x (growth with the number of
rounded steps). Random-sign roundings grow as sqrt(accumulation length) within one dot product and add up along
the chain of matmuls a logit goes through. Quantized bases add the quantization step of their own kernel.

The tiny models of tests/helpers.py (hidden 64, intermediate 128, 2 layers, random init) fix the sizes:
- ACCUMULATION: the longest dot product on the path to a logit (the MLP's down projection, 128 terms; attention
  sums at most max_total_tokens = 64 terms and the others 64).
- DEPTH: matmuls on that path, 2 layers x (q/k/v, attention, o, gate/up, down) + lm_head = 11.
- LOGIT_SCALE: |logit| of those models is below 1 (measured max 0.66 with every test adapter applied).
- ACTIVATION_SCALE: |hidden state| in their residual stream (measured max 3.3 with random adapters; bound taken
  as 8 for trained adapters and quantized bases, which move it further).

All of these hold for any CPU kernel ATen picks (`ATEN_CPU_CAPABILITY=default`, avx2, avx512, AMX): a kernel
changes the order of the sums, never the number of roundings per term.
"""
from __future__ import annotations

import math

import torch

FP32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7: unit roundoff x 2
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 7.8e-3
ACCUMULATION = 128
DEPTH = 11
LOGIT_SCALE = 1.0
ACTIVATION_SCALE = 8.0

# Same model, same weights, two kernels in fp32 (reference vs fast LoRA kernel, compiled vs eager, bucketed vs
# exact shapes, merged vs unmerged deltas): eps x |logit| x sqrt(K) x depth = 1.19e-7 x 1 x 11.3 x 11 = 1.5e-5.
SAME_MODEL_LOGITS = FP32_EPS * LOGIT_SCALE * math.sqrt(ACCUMULATION) * DEPTH

# The engine against PEFT/transformers in fp32: every reduction differs (attention over a padded KV cache vs
# SDPA, the LoRA delta as its own matmul), and the roundings happen at the scale of the residual stream, not of
# the logits: eps x |hidden| x sqrt(K) x depth = 1.19e-7 x 8 x 11.3 x 11 = 1.2e-4.
ENGINE_VS_PEFT_LOGITS = FP32_EPS * ACTIVATION_SCALE * math.sqrt(ACCUMULATION) * DEPTH

# log_softmax(x) = x - logsumexp(x): the logit error enters twice (once directly, once through the logsumexp).
ENGINE_VS_PEFT_LOGPROBS = 2 * ENGINE_VS_PEFT_LOGITS

# A weight tensor computed two ways in fp32 (W + scale * B @ A; a merge or a conversion): one product of rank-r
# factors of magnitude <= 1 and one addition to |W| <= 1: eps x |W| x (sqrt(r) + 1), r <= 16 -> 6.0e-7; 1e-6 rounds
# that up to cover the scale factor (one more rounding).
SAME_WEIGHTS = 1e-6


def nf4_logits() -> float:
    """Engine vs PEFT on an nf4 base: both dequantize the same 4-bit weights exactly, unless bitsandbytes takes its
    fused CPU kernel (CPUs with AVX512-BF16: Sapphire Rapids and later). That kernel rounds the activations and the
    block absmax to bf16 before the product, so its output carries one bf16 rounding of the logit scale
    (eps_bf16 x |logit| = 7.8e-3), on whichever call (one-token decode) it serves and the other side does not."""
    from bitsandbytes.functional import has_avx512bf16
    return BF16_EPS * LOGIT_SCALE if has_avx512bf16() else ENGINE_VS_PEFT_LOGITS


# Engine vs PEFT on an int8 (LLM.int8) base: activations are quantized per row to int8 with step absmax/127 and
# every input column with |x| > 6 in any row of the batch goes through fp16 instead, so the split (and with it the
# rounding) depends on the batch mates and on the fp16 kernel: one quantization step of the logit scale,
# |logit| / 127 = 7.9e-3. The test adapters move the logits by 0.39..0.86, 50x more.
INT8_LOGITS = LOGIT_SCALE / 127


def quantized_logits(quantize: str) -> float:
    """The bound for a quantized base by its scheme: 4-bit (nf4, fp4: same bitsandbytes kernels) or int8."""
    return {"nf4": nf4_logits, "fp4": nf4_logits, "int8": lambda: INT8_LOGITS}[quantize]()
