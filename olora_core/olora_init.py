"""OLoRA initialisation (Büyükakyüz 2024): QR of the base weight, A0 = R[:r], B0 = Q[:, :r], base -= s·B0·A0.

Same numbers as PEFT's `LoraLayer.olora_init` (float32 reduced QR, `(s·B0) @ A0`), with these differences:
- r > min(out, in) raises `RankError` (PEFT silently builds an adapter whose A has fewer rows than r);
- GPT-2 `Conv1D` (weight stored in×out) is handled on the transpose (PEFT factors the stored layout);
- bitsandbytes 4-bit keeps `blocksize` and the dequantized dtype, and a weight that bitsandbytes repacked
  for its CPU kernel (after a forward on an AVX512-BF16 CPU) is unpacked before dequantizing (PEFT reads the
  packed bytes as if they were plain and builds a wrong residual);
- int8: the module's cached CB/SCB state is cleared so no later dequantize reads stale scales;
- with a bf16/fp16 base PEFT stores A0/B0 after rounding them to the base dtype (then upcasts to fp32),
  while the residual used the unrounded values; we keep A0/B0 in float32, so the output at init and the
  later OLoRA->LoRA conversion are exact up to the residual's own rounding.
bitsandbytes and transformers are imported only when such a module is met.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import NonFiniteError, OLoRAError, RankError, UnsupportedLayerError

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class OLoRAInit:
    A0: Tensor  # (r, in) float32: R[:r]
    B0: Tensor  # (out, r) float32: Q[:, :r]
    residual: Tensor  # (out, in) float32: W - scaling * B0 @ A0 (before any cast / re-quantization)
    scaling: float  # alpha / r, or alpha / sqrt(r) with rsLoRA


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's per-layer scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def olora_init(weight: Tensor, r: int, alpha: float, use_rslora: bool = False) -> OLoRAInit:
    """OLoRA factors of `weight` (nn.Linear layout, out × in). Does not modify `weight`."""
    if weight.ndim != 2:
        raise UnsupportedLayerError(f"OLoRA needs a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise UnsupportedLayerError(f"OLoRA needs a float32/float16/bfloat16 weight, got {weight.dtype}")
    out_features, in_features = weight.shape
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise RankError(f"r must be a positive integer, got {r!r}")
    if r > min(out_features, in_features):
        raise RankError(
            f"r={r} is larger than min(out, in)={min(out_features, in_features)} for a weight of shape "
            f"(out={out_features}, in={in_features}); the QR factors only have that many rows"
        )
    W = weight.detach().to(torch.float32)  # (out, in)
    if not torch.isfinite(W).all():
        raise NonFiniteError(f"base weight of shape {tuple(weight.shape)} holds NaN/Inf; cannot factor it")
    scaling = lora_scaling(r, alpha, use_rslora)
    Q, R = torch.linalg.qr(W)  # (out, k), (k, in), k = min(out, in)
    A0 = R[:r].contiguous()  # (r, in)
    B0 = Q[:, :r].contiguous()  # (out, r)
    residual = W - scaling * B0 @ A0  # same association as PEFT: (s * B0) @ A0
    return OLoRAInit(A0=A0, B0=B0, residual=residual, scaling=scaling)


def _is_conv1d(module: nn.Module) -> bool:
    if type(module).__name__ != "Conv1D":
        return False
    from transformers.pytorch_utils import Conv1D  # lazy: only when a module is named Conv1D

    return isinstance(module, Conv1D)


def weight_format(module: nn.Module) -> str:
    """'4bit' | '8bit' | 'conv1d' | 'linear'; UnsupportedLayerError for anything else."""
    weight = getattr(module, "weight", None)
    cls_name = type(weight).__name__
    if cls_name == "Params4bit":
        return "4bit"
    if cls_name == "Int8Params":
        return "8bit"
    if not isinstance(weight, nn.Parameter) or type(weight) is not nn.Parameter:
        raise UnsupportedLayerError(
            f"{type(module).__name__}: weight of type {cls_name} is not a plain parameter or a bitsandbytes "
            "4-/8-bit parameter; OLoRA init supports nn.Linear, bitsandbytes Linear4bit/Linear8bitLt and Conv1D"
        )
    if _is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    raise UnsupportedLayerError(
        f"{type(module).__name__} is not supported by OLoRA init (nn.Linear, bitsandbytes Linear4bit/"
        "Linear8bitLt and transformers Conv1D are)"
    )


def _unpack_cpu_4bit(weight) -> None:
    """Undo bitsandbytes' CPU repacking (done in Linear4bit.forward on AVX512-BF16 CPUs), as its own
    `_save_to_state_dict` does, so that `dequantize_4bit` reads the standard layout."""
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


def dense_weight(module: nn.Module, fmt: str) -> Tensor:
    """The module's weight as a float (out, in) tensor (dequantized for bitsandbytes; a view otherwise)."""
    weight = module.weight
    if fmt == "4bit":
        import bitsandbytes as bnb

        _unpack_cpu_4bit(weight)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)  # in quant_state.dtype
    if fmt == "8bit":
        if weight.dtype != torch.int8:  # has_fp16_weights=True: the parameter still holds float weights
            return weight.data
        import bitsandbytes as bnb

        state = getattr(module, "state", None)
        scb = weight.SCB if weight.SCB is not None else getattr(state, "SCB", None)
        if scb is None:
            raise UnsupportedLayerError(f"{type(module).__name__}: int8 weight without row scales (SCB)")
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device))  # float32
    if fmt == "conv1d":
        return weight.data.T  # stored (in, out)
    return weight.data


def set_residual(module: nn.Module, fmt: str, residual: Tensor, dense_dtype: torch.dtype) -> None:
    """Store the float32 (out, in) residual as the module's weight, in the module's own format."""
    weight = module.weight
    if fmt == "4bit":
        module.weight = type(weight)(
            residual.to(dense_dtype),
            requires_grad=weight.requires_grad,
            blocksize=weight.blocksize,
            compress_statistics=weight.compress_statistics,
            quant_type=weight.quant_type,
            quant_storage=weight.quant_storage,
            module=module,
        ).to(weight.device)  # quantizes here
    elif fmt == "8bit":
        data = residual if weight.dtype == torch.int8 else residual.to(weight.dtype)
        module.weight = type(weight)(
            data, requires_grad=weight.requires_grad, has_fp16_weights=weight.has_fp16_weights
        ).to(weight.device)  # quantizes here (via fp16, as bitsandbytes does) unless has_fp16_weights
        state = getattr(module, "state", None)
        if state is not None:  # forward re-reads CB/SCB from the new weight; never keep stale scales
            state.CB = None
            state.SCB = None
    elif fmt == "conv1d":
        weight.data = residual.T.contiguous().to(weight.dtype)
    else:
        weight.data = residual.to(weight.dtype)


def olora_init_module(module: nn.Module, r: int, alpha: float, use_rslora: bool = False) -> OLoRAInit:
    """OLoRA on one layer: sets the module's base weight to the residual (same dtype / quant format and
    settings) and returns A0/B0 (float32). On an error the weight keeps its values (a 4-bit weight that
    bitsandbytes had repacked for its CPU kernel may be left in the standard layout)."""
    fmt = weight_format(module)
    dense = dense_weight(module, fmt)  # (out, in)
    init = olora_init(dense, r, alpha, use_rslora)
    set_residual(module, fmt, init.residual, dense.dtype)
    return init


# ---- model level ---------------------------------------------------------------------------------------

_UNSUPPORTED_CONFIG_FLAGS = ("use_dora", "lora_bias", "use_qalora", "use_bdlora")


def check_olora_config(config) -> None:
    """Refuse a peft LoraConfig with a feature the OLoRA init does not support."""
    for flag in _UNSUPPORTED_CONFIG_FLAGS:
        if getattr(config, flag, False):
            raise UnsupportedLayerError(f"OLoRA init with LoraConfig.{flag}=True is not supported")
    for field in ("target_parameters", "alora_invocation_tokens", "arrow_config", "velora_config",
                  "monteclora_config", "kasa_config"):
        if getattr(config, field, None):
            raise UnsupportedLayerError(f"OLoRA init with LoraConfig.{field} set is not supported")


def lora_layers_of(peft_model, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """Every LoRA layer holding `adapter_name`; refuses layer kinds OLoRA cannot initialise."""
    from peft.tuners.lora import LoraLayer

    layers = []
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.r:
            continue
        if adapter_name not in layer.lora_A or adapter_name in getattr(layer, "lora_variant", {}):
            raise UnsupportedLayerError(f"{name}: {type(layer).__name__} (embedding or LoRA variant) "
                                        "cannot be OLoRA-initialised")
        base = layer.get_base_layer()
        dense = dense_weight(base, weight_format(base))  # raises UnsupportedLayerError
        r, (out_f, in_f) = layer.r[adapter_name], dense.shape
        if r > min(out_f, in_f):
            raise RankError(f"{name}: r={r} > min(out={out_f}, in={in_f}); OLoRA needs r <= {min(out_f, in_f)}")
        if dense.dtype not in _FLOAT_DTYPES:
            raise UnsupportedLayerError(f"{name}: base weight dtype {dense.dtype} is not float32/16/bf16")
        if not torch.isfinite(dense).all():
            raise NonFiniteError(f"{name}: base weight holds NaN/Inf")
        scaling = lora_scaling(r, layer.lora_alpha[adapter_name], layer.use_rslora[adapter_name])
        if scaling != layer.scaling[adapter_name]:  # same formula as PEFT; guard against drift
            raise OLoRAError(f"{name}: scaling {scaling} != PEFT's {layer.scaling[adapter_name]}")
        layers.append((name, layer))
    if not layers:
        raise UnsupportedLayerError(f"no LoRA layer for adapter {adapter_name!r}: check target_modules")
    return layers


@torch.no_grad()
def apply_olora(model: nn.Module, lora_config, adapter_name: str = "default"):
    """Wrap `model` with PEFT LoRA layers and initialise them with OLoRA (per-layer r / alpha from
    rank_pattern / alpha_pattern, rsLoRA). Mutates the base weights to the residuals. The returned
    PeftModel's config says init_lora_weights='olora' (PEFT's conversion and reload rely on that).
    Every layer is checked (type, rank, finite weight, scaling) before any base weight is touched; on an
    error the model is unwrapped again. Whatever `lora_config.init_lora_weights` says, OLoRA is applied."""
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise OLoRAError("apply_olora expects a plain model, got a PeftModel")
    check_olora_config(lora_config)
    config = copy.deepcopy(lora_config)
    config.init_lora_weights = True  # PEFT builds the layers; we overwrite A/B and the base below
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    try:
        layers = lora_layers_of(peft_model, adapter_name)
    except OLoRAError:
        peft_model.unload()  # puts the original modules back into `model`
        raise
    for _, layer in layers:
        r, alpha = layer.r[adapter_name], layer.lora_alpha[adapter_name]
        init = olora_init_module(layer.get_base_layer(), r, alpha, layer.use_rslora[adapter_name])
        lora_A, lora_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        lora_A.data = init.A0.to(device=lora_A.device, dtype=lora_A.dtype)
        lora_B.data = init.B0.to(device=lora_B.device, dtype=lora_B.dtype)
    peft_model.peft_config[adapter_name].init_lora_weights = "olora"
    return peft_model
