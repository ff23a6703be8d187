"""Is this OLoRA/PiSSA initial checkpoint really the init of *this* base? (No peer server checks it.)

OLoRA's init is a function of the base weight: B0·A0 = Q[:, :r]·R[:r] of the QR of W (PiSSA: the rank-r SVD
part of W divided by the scaling). An adapter initialised on another base of the same shapes converts without
complaint (ΔW = s(BA − B0A0) is computed from the files alone) but is wrong on this base, because what the
training saw was W_other − s·B0A0. So every layer's stored product is compared with the one recomputed from the
served checkpoint:

    for each LoRA layer l:  expected = init_factors(W_l at init_dtype, r_l, s_l)      # recompute_init's math
                            distance = ‖B0·A0 − expected_B·expected_A‖_F / ‖expected_B·expected_A‖_F
                            distance > TOLERANCE[init_dtype]  →  ProvenanceError naming l and the distance

Products, not factors, are compared: a QR/SVD on another LAPACK build may flip column signs, which leaves the
product unchanged. A quantized base may have been the init's input (PEFT then factors deq(Q(W))): both are tried.
`pissa_niter_K` (randomized SVD), CorDA and LoRA-GA are not deterministic functions of W: they are not checked,
and the caller gets a warning saying so.
"""
from __future__ import annotations

import os

import torch

from .adapter_format import layer_rank, layer_scaling
from .adapter_io import AdapterFiles, adapter_kind
from .convert import KEY_PREFIX, LORA_A_SUFFIX, LORA_B_SUFFIX, split_lora_keys
from .dtypes import torch_dtype
from .errors import AdapterMismatchError
from .quant_convert import BaseWeights, Quantizer, QuantSpec

# relative Frobenius distance accepted per dtype the init ran in: float32 QR/SVD reproduces to ~1e-6; a
# bfloat16/float16 base rounds W (and PEFT rounds the stored factors) to ~2^-8 / 2^-11 relative
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 4e-3}


class ProvenanceError(AdapterMismatchError):
    """The initial checkpoint is not OLoRA's/PiSSA's init of the served base weights."""


def _distance(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm().clamp_min(1e-30))


def check_initial_provenance(initial: AdapterFiles, base_dir: str | os.PathLike, *, init_dtype: str = "float32",
                             quantization: QuantSpec | None = None) -> list[str]:
    """Raise ProvenanceError if a layer's B0·A0 is not the init of `base_dir`'s weight; return warnings (an init
    kind that cannot be checked). `quantization`: the served base's settings, also tried as the init's input."""
    from .recompute_init import init_factors

    if init_dtype not in TOLERANCE:
        raise ProvenanceError(f"init_dtype must be one of {', '.join(TOLERANCE)}, got {init_dtype!r}")
    config = initial.config
    kind = adapter_kind(config)
    init = str(config.get("init_lora_weights", "")).lower()
    if kind not in ("olora", "pissa") or init.startswith("pissa_niter"):
        return [f"init_lora_weights={config.get('init_lora_weights')!r} is not a deterministic function of the base "
                "weight: the initial checkpoint's provenance was not checked"]
    base = BaseWeights(base_dir)
    quantizer = Quantizer(quantization) if quantization is not None and quantization.kind != "none" else None
    tolerance = TOLERANCE[init_dtype]
    modules, _ = split_lora_keys(initial)
    for module in modules:
        name = module[len(KEY_PREFIX):] if module.startswith(KEY_PREFIX) else module
        A0 = initial.tensors[module + LORA_A_SUFFIX].float()  # (r, in)
        B0 = initial.tensors[module + LORA_B_SUFFIX].float()  # (out, r)
        W = base.weight(name)  # (out, in), as stored
        r = layer_rank(config, name)
        if tuple(W.shape) != (B0.shape[0], A0.shape[1]) or A0.shape[0] != r:
            raise ProvenanceError(f"{name}: initial lora_A {tuple(A0.shape)} / lora_B {tuple(B0.shape)} do not fit "
                                  f"the served base weight {tuple(W.shape)} with r={r}")
        candidates = [W.to(torch_dtype(init_dtype)).to(torch.float32)]
        if quantizer is not None:
            candidates.append(quantizer.roundtrip(W))
        got = B0 @ A0  # (out, in)
        best = float("inf")
        for dense in candidates:
            A0_ref, B0_ref = init_factors(dense, r, layer_scaling(config, name), kind)
            best = min(best, _distance(got, B0_ref @ A0_ref))
        if best > tolerance:
            raise ProvenanceError(
                f"{name}: the initial checkpoint's B0·A0 is {best:.3g} (relative Frobenius distance) from "
                f"{'OLoRA QR' if kind == 'olora' else 'PiSSA SVD'} of this server's base weight (tolerance {tolerance:g} "
                f"for init_dtype={init_dtype}): the adapter was initialised on another base model")
    return []
