"""Share-safe OLoRA / PiSSA training: the base is never mutated, so the trained adapter IS the served adapter.

PEFT's OLoRA init replaces every targeted base weight W' by W' − s·B0·A0, and on a bitsandbytes base it
re-quantizes that residual: the trained model runs on deq(Q(W' − s·B0A0)), which no adapter for the shared
served base W' = deq(Q(W)) can reproduce (docs/beyond-peft.md). Here the base keeps W' and every targeted layer
carries two PEFT LoRA adapters of rank r, both active in PEFT's own forward (it sums the active adapters):

    default          (A, B) starts at (A0, B0)   trainable   (OLoRA: A0 = R[:r], B0 = Q[:, :r], QR of W')
    share_safe_init  (A0, −B0)                   frozen: requires_grad False, so not in the optimizer

    y = W'·x + s·B·A·x − s·B0·A0·x              # at init: exactly the base (up to round-off)

A and B get OLoRA's gradients (the frozen pair contributes none and does not change dL/dy); in fp32 the model is
PEFT's OLoRA model up to round-off. The written adapter stacks the two pairs into one plain LoRA of rank 2r:

    lora_A = [A; A0]   (2r, in)      lora_B = [B, −B0]   (out, 2r)
    r, lora_alpha ×2 (alpha ×√2 with rsLoRA): the scaling s is unchanged; init_lora_weights = true

which is s·(B·A − B0·A0) on W' - the trained function itself, on the same (quantized) base, with no conversion.

Why a second frozen adapter and not one rank-2r adapter whose second half is masked by gradient hooks: a frozen
parameter is left out of the optimizer (no gradient buffer, no AdamW moments; weight decay cannot drift it), the
trainable parameters are exactly PEFT's OLoRA ones (so AdamW and clipping see the same tensors), and the forward
is PEFT's unchanged multi-adapter path. PEFT's `set_adapter([...])` marks every active adapter trainable, so the
frozen one is frozen again afterwards and checked.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import Tensor

from .convert import LORA_A_SUFFIX, LORA_B_SUFFIX, converted_config
from .errors import OLoRAError, UnsupportedInitError
from .olora_init import check_olora_config, dense_weight, lora_layers_of, weight_format
from .recompute_init import init_factors

FROZEN_ADAPTER = "share_safe_init"
SHARE_SAFE_INITS = ("olora", "pissa")


@torch.no_grad()
def share_safe_model(model: torch.nn.Module, lora_config, kind: str = "olora", adapter_name: str = "default"):
    """Wrap `model` (plain, possibly bitsandbytes-quantized) with PEFT LoRA layers for share-safe training.

    `lora_config.init_lora_weights` is ignored: every layer gets the `kind` init ("olora" or "pissa", computed in
    float32 from the layer's dense - dequantized - base weight) in the trainable adapter and its negation in the
    frozen one. The base weights are not modified. Returns the PeftModel (config: init_lora_weights=True)."""
    from peft import PeftModel, get_peft_model

    if kind not in SHARE_SAFE_INITS:
        raise UnsupportedInitError(f"share-safe training supports init {SHARE_SAFE_INITS}, got {kind!r}")
    if isinstance(model, PeftModel):
        raise OLoRAError("share_safe_model expects a plain model, got a PeftModel")
    check_olora_config(lora_config)
    config = copy.deepcopy(lora_config)
    config.init_lora_weights = True  # PEFT builds the layers (B = 0); A and B are set below
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    try:
        layers = lora_layers_of(peft_model, adapter_name)  # checks kinds, ranks, finiteness, scaling
        peft_model.add_adapter(FROZEN_ADAPTER, copy.deepcopy(config))
    except OLoRAError:
        peft_model.unload()
        raise
    for _, layer in layers:
        base = layer.get_base_layer()
        dense = dense_weight(base, weight_format(base)).to(torch.float32)  # (out, in): W', never written back
        A0, B0 = init_factors(dense, layer.r[adapter_name], layer.scaling[adapter_name], kind)  # (r, in), (out, r)
        for name, lora_b in ((adapter_name, B0), (FROZEN_ADAPTER, -B0)):
            A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
            A.data = A0.to(device=A.device, dtype=A.dtype, copy=True)  # own storage: training moves only one
            B.data = lora_b.to(device=B.device, dtype=B.dtype, copy=True)
    peft_model.base_model.set_adapter([adapter_name, FROZEN_ADAPTER])  # both in the forward; marks both trainable
    for name, param in peft_model.named_parameters():
        param.requires_grad_(f".{adapter_name}." in name and ".lora_" in name)
    _check_frozen(peft_model, adapter_name)
    return peft_model


def _check_frozen(peft_model, adapter_name: str) -> None:
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    if not trainable or any(f".{adapter_name}." not in name for name in trainable):
        raise OLoRAError(f"share-safe setup: unexpected trainable parameters {trainable[:4]}")


def stacked_adapter(peft_model, adapter_name: str = "default") -> tuple[dict, dict[str, Tensor]]:
    """The config and tensors of the rank-2r plain LoRA adapter equal to the two active adapters together."""
    from peft import get_peft_model_state_dict

    trained = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    frozen = get_peft_model_state_dict(peft_model, adapter_name=FROZEN_ADAPTER)
    if trained.keys() != frozen.keys():
        raise OLoRAError("share-safe adapters do not cover the same layers")
    tensors: dict[str, Tensor] = {}
    for key in sorted(trained):
        if key.endswith(LORA_A_SUFFIX):
            tensors[key] = torch.cat([trained[key], frozen[key]], dim=0)  # (2r, in): [A; A0]
        elif key.endswith(LORA_B_SUFFIX):
            tensors[key] = torch.cat([trained[key], frozen[key]], dim=1)  # (out, 2r): [B, −B0]
        else:
            raise OLoRAError(f"share-safe training does not handle adapter tensor {key!r}")
    config = peft_model.peft_config[adapter_name].to_dict()
    config = {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}
    return converted_config(config), tensors


def save_stacked(peft_model, out_dir: str | os.PathLike, adapter_name: str = "default") -> None:
    """Write `stacked_adapter` as a PEFT adapter directory (atomically)."""
    from .adapter_io import save_adapter_dir

    config, tensors = stacked_adapter(peft_model, adapter_name)
    save_adapter_dir(out_dir, config, tensors)
