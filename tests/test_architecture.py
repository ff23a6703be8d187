"""Units of the architecture seam: what describe_architecture reads from a config, the LoRA layer on any leading
shape (every kernel), and which modules are LoRA targets."""
from __future__ import annotations

import pytest
import torch
from model_families import BY_NAME, WINDOW

from app.engine.architecture import (MASK_BY_LAYER_TYPE, MASK_PER_MODULE, MASK_TENSOR, KVLayout,
                                     describe_architecture)
from app.engine.errors import BaseModelError
from app.engine.forward_batch import DECODE, ForwardBatch, ForwardContext
from app.engine.lora_kernels import KERNEL_BY_NAME, LoRAPlan
from app.engine.lora_layers import MultiLoRALinear, find_target_modules


@pytest.mark.parametrize("name,windows,form,mask_free", [
    ("llama", (None, None), MASK_TENSOR, True),
    ("mistral", (WINDOW, WINDOW), MASK_TENSOR, False),
    ("qwen2", (None, WINDOW), MASK_BY_LAYER_TYPE, False),  # max_window_layers=1: the second layer is windowed
    ("qwen2_moe", (None, None), MASK_BY_LAYER_TYPE, True),  # sliding_window = 0 means none
    ("gemma3_text", (WINDOW, None), MASK_BY_LAYER_TYPE, False),
    ("gpt_neo", (None, WINDOW), MASK_PER_MODULE, False),
    ("bloom", (None, None), MASK_TENSOR, False),  # the ALiBi bias comes with the runner's mask
])
def test_windows_and_mask_form(name, windows, form, mask_free):
    arch = describe_architecture(BY_NAME[name].build())
    assert (arch.layer_windows, arch.mask_form, arch.mask_free_ok) == (windows, form, mask_free)


def test_kv_layouts():
    assert describe_architecture(BY_NAME["deepseek_v3"].build()).kv == KVLayout(1, 16, 8)  # latent, rotary key
    assert describe_architecture(BY_NAME["falcon-new"].build()).kv.heads == 4  # expanded to every query head
    assert describe_architecture(BY_NAME["falcon-old"].build()).kv.heads == 1  # multi-query


def test_falcon_alibi_refused_by_name():
    with pytest.raises(BaseModelError, match="falcon with alibi=True"):
        describe_architecture(BY_NAME["falcon-alibi"].build())


@pytest.mark.parametrize("kernel", sorted(KERNEL_BY_NAME))
def test_lora_layer_on_flattened_and_4d_inputs(kernel):
    """(B*T, in) and (B, 1, T, in) inputs get the same delta as (B, T, in): row b's tokens use row b's slot."""
    torch.manual_seed(0)
    context = ForwardContext(torch.device("cpu"))
    layer = MultiLoRALinear(torch.nn.Linear(6, 5), n_slots=2, max_rank=4, dtype=torch.float32,
                            device=torch.device("cpu"), context=context, row_capacity=3, row_rank=4)
    for slot in (1, 2):
        layer.load_slot(slot, (torch.randn(4, 6), torch.randn(5, 4)))
    slots = [2, 0, 1]
    layer.row_A.copy_(layer.lora_A[slots])
    layer.row_B.copy_(layer.lora_B[slots])
    plan = LoRAPlan(kernel=KERNEL_BY_NAME[kernel], slots=slots, rank=4)
    plan.kernel.prepare(plan, torch.device("cpu"))
    x = torch.randn(3, 7, 6)  # (B, T, in)
    expected = torch.stack([layer.base_layer(x[b]) + x[b] @ layer.lora_A[s].T @ layer.lora_B[s].T
                            for b, s in enumerate(slots)])
    with context.use(ForwardBatch(DECODE, 0, 3, 7, lora=plan)):
        three = layer(x)
        flat = layer(x.reshape(21, 6))
        four = layer(x[:, None])
    torch.testing.assert_close(three, expected)
    torch.testing.assert_close(flat, expected.reshape(21, 5))
    torch.testing.assert_close(four, expected[:, None])
    assert torch.equal(layer(x), layer.base_layer(x))  # outside a runner forward: the base layer


def test_targets_include_conv1d_and_skip_per_expert_modules():
    gpt2 = find_target_modules(BY_NAME["gpt2"].build(), None)
    assert "transformer.h.0.attn.c_attn" in gpt2 and "transformer.h.1.mlp.c_proj" in gpt2

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(4, 4)
            self.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([Block()])
    assert find_target_modules(model, None) == ["layers.0.q_proj"]
