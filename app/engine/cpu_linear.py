"""fp32 Linear layers on CPU through oneDNN's matmul (`cpu_gemm="onednn"`, the default) instead of ATen's sgemm.

ATen computes an fp32 `F.linear` on CPU with MKL's sgemm; at the row counts of a decode step (B = 1..64 rows
against weights of thousands of columns) that kernel runs at a fraction of the core's FMA rate. oneDNN's matmul
primitive (the one torch's inductor calls for CPU linears, `torch.ops.mkldnn._linear_pointwise`) on the same
plain, unpacked weight took half the time in docs/benchmarks.md ("The base path at the 0.5B shape"), with no
second copy of the weights (vLLM's CPU build packs a copy of each weight for oneDNN; this does not).

Numerics: the same products summed in another order, so the results differ from sgemm's by fp32 rounding only
(what tests/tolerances.py bounds for "two kernels in fp32"). The transformers/PEFT reference of the self-check keeps
plain `F.linear`: reference_model.py maps every engine wrapper back to its plain layer.

Where: the base layer of every LoRA-wrapped Linear (MultiLoRALinear) and the output head (`OutputHead`), when the
layer is a plain `nn.Linear` with an fp32 weight on the CPU and torch has oneDNN. Anything else (bf16/fp16, whose
matmul ATen already sends to oneDNN; bitsandbytes layers; Conv1D; CUDA) keeps its own forward.

Semantics: onednn_linear(layer, x) == F.linear(x, layer.weight, layer.bias) up to fp32 summation order.
"""
from __future__ import annotations

import torch
from torch import nn

CPU_GEMMS = ("onednn", "aten")


def onednn_applies(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    return (type(layer) is nn.Linear and weight is not None and weight.device.type == "cpu"
            and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available())


def onednn_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x: (..., in) -> (..., out), oneDNN's matmul on the layer's own (plain) weight."""
    flat = x.reshape(-1, layer.in_features).contiguous()  # (N, in)
    out = torch.ops.mkldnn._linear_pointwise(flat, layer.weight, layer.bias, "none", [], "")  # (N, out)
    return out.reshape(*x.shape[:-1], layer.out_features)


def use_onednn(layer: nn.Module, cpu_gemm: str) -> bool:
    """Whether the engine computes `layer(x)` with `onednn_linear` under the `cpu_gemm` setting."""
    return cpu_gemm == "onednn" and onednn_applies(layer)


class OutputHead(nn.Module):
    """The model's output head (lm_head) as the engine runs it: oneDNN on `base_layer`'s own weight, which stays
    the base layer's parameter (tied to the input embeddings where the model ties them)."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer

    @property
    def weight(self) -> torch.Tensor:  # a family that reads lm_head.weight directly still finds it
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(self.base_layer, x)


def wrap_output_head(model: nn.Module, cpu_gemm: str) -> str | None:
    """Put an OutputHead around the model's output embeddings when oneDNN applies to them; returns the head's
    module name, or None when the head is left as it is."""
    head = model.get_output_embeddings()
    if head is None or not use_onednn(head, cpu_gemm):
        return None
    name = next(n for n, m in model.named_modules() if m is head)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, OutputHead(head))
    return name
