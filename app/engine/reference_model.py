"""The self-check's reference: the model's own transformers forward, with probe LoRAs applied by PEFT, on the
engine's weights without a second copy of them.

Semantics: `reference_model` copies the module tree with a `deepcopy` whose memo maps every parameter and buffer
to itself (the copy's weights *are* the engine's tensors) and every module the engine wrapped (for LoRA, and the
oneDNN output head of cpu_linear.py) to a copy of the plain base layer it wraps (`.base_layer`); forward hooks on the copied modules are dropped (they belong to the
engine's path, not the model), what the engine overrode on its tree is undone on the copy
(architecture.undo_overrides: GPT-Neo's local bias, Bloom's ALiBi builder; a function an instance still carries in
place of its class's method refuses the build), attention is transformers' eager implementation, and PEFT's
`get_peft_model` injects the probe adapters into the copy, on the modules the probe names (`_targets_as_named`).
The engine's modules and tensors are never modified. A plain `deepcopy` of the model would double its memory;
reloading it from disk would too, and take longer than the check itself.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from .architecture import undo_overrides
from .cpu_linear import OutputHead

LoRAWeights = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, in), B (out, r))


def reference_model(model: nn.Module, wrapped: Iterable[str],
                    adapters: Mapping[str, tuple[dict, LoRAWeights]]) -> nn.Module:
    """A PeftModel over a weight-sharing copy of `model`. `wrapped`: names of the engine's LoRA-wrapped modules;
    `adapters`: adapter id -> (PEFT config dict with r, lora_alpha, target_modules; LoRAWeights)."""
    from peft import LoraConfig, get_peft_model

    memo: dict[int, object] = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    heads = [name for name, module in model.named_modules() if isinstance(module, OutputHead)]
    for name in [*wrapped, *heads]:  # the plain layer the engine wraps, as a module of its own over the same tensors
        wrapper = model.get_submodule(name)
        memo[id(wrapper)] = copy.deepcopy(getattr(wrapper, "base_layer", wrapper), memo)
    ref = copy.deepcopy(model, memo)
    for module in ref.modules():  # hooks the engine's path may have put on its tree are not the model's
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    undo_overrides(ref)
    overridden = instance_overrides(ref)
    if overridden:
        raise ValueError(f"the engine's model carries instance overrides the reference would inherit: "
                         f"{', '.join(overridden)} (architecture.undo_overrides must undo them)")
    ref.config._attn_implementation = "eager"
    peft_model = None
    with _targets_as_named():
        for adapter_id, (spec, weights) in adapters.items():
            config = LoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"], target_modules=spec["target_modules"],
                                lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
            name = _peft_name(adapter_id)
            if peft_model is None:
                peft_model = get_peft_model(ref, config, adapter_name=name)
            else:
                peft_model.add_adapter(name, config)
            # copied into PEFT's own lora_A/lora_B layers: no `state_dict()` call, which on bitsandbytes 4-bit
            # layers would unpack the engine's CPU-packed weights in place (set_peft_model_state_dict makes one)
            with torch.no_grad():
                for module, (a, b) in weights.items():
                    layer = peft_model.base_model.model.get_submodule(module)
                    layer.lora_A[name].weight.copy_(a)  # (r, in)
                    layer.lora_B[name].weight.copy_(b)  # (out, r)
    peft_model.eval()
    return peft_model


def instance_overrides(model: nn.Module) -> list[str]:
    """'module.attribute' for every function a module instance of `model` carries in place of a method of its
    class (e.g. an engine's `build_alibi_tensor` replacement): what a copy of the module tree would inherit."""
    found = []
    for name, module in model.named_modules():
        for attribute, value in vars(module).items():
            if callable(value) and not isinstance(value, nn.Module) and \
                    inspect.isfunction(inspect.getattr_static(type(module), attribute, None)):
                found.append(f"{name or '<model>'}.{attribute}")
    return found


@contextlib.contextmanager
def _targets_as_named() -> Iterator[None]:
    """PEFT 0.21 on transformers 5 rewrites a LoRA config's target_modules for the MoE models whose layout changed
    since transformers 4 (`convert_peft_config_for_transformers`, called by every adapter injection): on
    DeepSeek-V2/V3 and Qwen3-MoE each target ending in gate_proj / up_proj / down_proj becomes the fused expert
    parameters, the dense layers' and shared experts' MLP Linear modules included, which then get no LoRA layer.
    The probe's targets are the names of Linear modules of this very model, never a transformers 4 name: nothing
    to convert, so the conversion is off while the probe adapters are injected. The self-check runs before the
    server takes requests: nothing else in the process injects a PEFT adapter meanwhile."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:  # a PEFT without the conversion
        yield
        return
    original = getattr(conversion, "convert_peft_config_for_transformers", None)
    if original is None:
        yield
        return
    conversion.convert_peft_config_for_transformers = lambda peft_config, model, conversions: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


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

