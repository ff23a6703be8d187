"""The self-check's reference: the model's own transformers forward, with probe LoRAs applied by PEFT, on the
engine's weights without a second copy of them.

Semantics: `reference_model` copies the module tree with a `deepcopy` whose memo maps every parameter and buffer
to itself (the copy's weights *are* the engine's tensors) and every module the engine wrapped for LoRA to a copy of
the plain base layer it wraps (`.base_layer`); forward hooks on the copied modules are dropped (they belong to the
engine's path, not the model), attention is transformers' eager implementation, and PEFT's `get_peft_model`
injects the probe adapters into the copy. The engine's modules and tensors are never modified. A plain `deepcopy`
of the model would double its memory; reloading it from disk would too, and take longer than the check itself.
"""
from __future__ import annotations

import copy
from typing import Iterable, Mapping

import torch
from torch import nn


LoRAWeights = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, in), B (out, r))


def reference_model(model: nn.Module, wrapped: Iterable[str],
                    adapters: Mapping[str, tuple[dict, LoRAWeights]]) -> nn.Module:
    """A PeftModel over a weight-sharing copy of `model`. `wrapped`: names of the engine's LoRA-wrapped modules;
    `adapters`: adapter id -> (PEFT config dict with r, lora_alpha, target_modules; LoRAWeights)."""
    from peft import LoraConfig, get_peft_model

    memo: dict[int, object] = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    for name in wrapped:  # the plain layer the engine wraps, as a module of its own over the same tensors
        wrapper = model.get_submodule(name)
        memo[id(wrapper)] = copy.deepcopy(getattr(wrapper, "base_layer", wrapper), memo)
    ref = copy.deepcopy(model, memo)
    for module in ref.modules():  # hooks the engine's path may have put on its tree are not the model's
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    ref.config._attn_implementation = "eager"
    peft_model = None
    for adapter_id, (spec, weights) in adapters.items():
        config = LoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"], target_modules=spec["target_modules"],
                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        name = _peft_name(adapter_id)
        if peft_model is None:
            peft_model = get_peft_model(ref, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        # copied into PEFT's own lora_A/lora_B layers: no `state_dict()` call, which on bitsandbytes 4-bit layers
        # would unpack the engine's CPU-packed weights in place (set_peft_model_state_dict makes one)
        with torch.no_grad():
            for module, (a, b) in weights.items():
                layer = peft_model.base_model.model.get_submodule(module)
                layer.lora_A[name].weight.copy_(a)  # (r, in)
                layer.lora_B[name].weight.copy_(b)  # (out, r)
    peft_model.eval()
    return peft_model


def reference_logprobs(peft_model: nn.Module, ids: list[int],
                       adapter_id: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs (T, V) fp32, largest |logit| per position (T,)) of one full sequence: no cache, no padding;
    `adapter_id` None = the base (PEFT's `disable_adapter`)."""
    device = next(iter(peft_model.parameters())).device
    x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    if adapter_id is None:
        with peft_model.disable_adapter():
            logits = peft_model(input_ids=x, use_cache=False).logits[0].float()  # (T, V)
    else:
        peft_model.set_adapter(_peft_name(adapter_id))
        logits = peft_model(input_ids=x, use_cache=False).logits[0].float()  # (T, V)
    return torch.log_softmax(logits, dim=-1).cpu(), logits.abs().amax(dim=-1).cpu()


def _peft_name(adapter_id: str) -> str:
    return adapter_id.replace(":", "_").replace(".", "_")  # PEFT adapter names become module attribute names

