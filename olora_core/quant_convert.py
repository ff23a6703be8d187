"""Quantization-aware OLoRA -> LoRA conversion: the exact served delta on a quantized base, written at low rank.

PEFT's OLoRA init on a bitsandbytes base dequantizes W' = deq(Q(W)), subtracts s·B0·A0 and RE-QUANTIZES the
residual, so the trained model computes deq(Q(W' − s·B0A0)) + s·B·A. PEFT's conversion (and `convert`) writes
s·(B·A − B0·A0), which on the served base deq(Q(W)) = W' gives W' + s·B·A − s·B0A0: it misses the requantization
error N = deq(Q(W' − s·B0A0)) − (W' − s·B0A0). Per target layer we compute the exact served delta

    ΔW* = deq(Q(W' − s·B0A0)) + s·B·A − W'        (float64; Q with the served base's bitsandbytes settings)

and write its best rank-k approximation (truncated SVD, Eckart–Young): lora_B = U_k·√S_k, lora_A = √S_k·V_kᵀ,
with lora_alpha = r so that the scaling is 1 (per-layer ranks go to rank_pattern / alpha_pattern). k = 2r by
default (PEFT's rank), a fixed `rank`, or per layer the smallest k with ‖ΔW* − ΔW_k‖_F / ‖ΔW*‖_F ≤
`max_rel_error`. The report gives every layer's relative error, and PEFT's for comparison.

`quantization="none"` uses the same formula with Q = a cast to `QuantSpec.dtype` (float32: ΔW* = s·B·A − s·B0A0
plus the residual's fp32 rounding, which is rank ≤ 2r up to that rounding, so the rank-2r result matches PEFT's).

The base weights are read one tensor at a time from the base's safetensors (never the whole model), and the
quantization reuses `olora_init`'s helpers (the same bitsandbytes calls that quantize the served base and that
PEFT uses for the residual). Only OLoRA adapters are handled: PEFT cannot run PiSSA/CorDA init on a quantized
base, so for those the trained base is not deq(Q(W' − s·B0A0)) and this formula would be a guess.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .adapter_format import layer_alpha, layer_rank
from .adapter_io import PICKLE_SUFFIXES, AdapterFiles, load_adapter_dir, save_adapter_dir
from .convert import (KEY_PREFIX, LORA_A_SUFFIX, LORA_B_SUFFIX, check_matching_pair, check_olora_initial,
                      check_supported_config, conversion_kind, split_lora_keys)
from .dtypes import QUANTIZATIONS
from .errors import OLoRAError, OutputExistsError, RankError, UnsupportedInitError, UnsupportedLayerError
from .olora_init import dense_weight, lora_scaling, set_residual, weight_format



class BaseWeightsError(OLoRAError):
    """The base model directory cannot provide a weight the adapter needs (missing file, key, shape, dtype)."""


# ---- the served quantization -----------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantSpec:
    """How the served base quantizes a weight. Defaults = transformers' BitsAndBytesConfig defaults."""

    kind: str = "none"  # none | nf4 | fp4 | int8
    dtype: torch.dtype = torch.float32  # dtype the checkpoint is loaded in before quantizing (the served dtype)
    blocksize: int = 64  # 4-bit
    compress_statistics: bool = False  # 4-bit double quantization (bnb_4bit_use_double_quant)
    quant_storage: torch.dtype = torch.uint8  # 4-bit
    device: str = "cpu"  # where bitsandbytes quantizes (use the served device for bit-exact CUDA kernels)

    def __post_init__(self):
        if self.kind not in QUANTIZATIONS:
            raise OLoRAError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.kind!r}")

    @classmethod
    def from_model(cls, model: nn.Module, device: str | None = None) -> "QuantSpec":
        """The settings of the first bitsandbytes layer of a loaded (served) model; kind 'none' without one."""
        for module in model.modules():
            weight = getattr(module, "weight", None)
            name = type(weight).__name__
            if name == "Params4bit":
                state = weight.quant_state  # after a CPU forward bitsandbytes repacks it (bf16 dtype and scales)
                dtype = state.original_dtype if getattr(state, "packing_format_for_cpu", False) else state.dtype
                return cls(kind=weight.quant_type, dtype=dtype, blocksize=weight.blocksize,
                           compress_statistics=bool(weight.compress_statistics), quant_storage=weight.quant_storage,
                           device=device or weight.device.type)
            if name == "Int8Params":  # the checkpoint was loaded in the model's float dtype, then cast to fp16
                return cls(kind="int8", dtype=_float_dtype(model), device=device or weight.device.type)
        return cls(kind="none", dtype=_float_dtype(model), device=device or "cpu")


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def as_spec(quantization: "str | QuantSpec", dtype: torch.dtype = torch.float32) -> QuantSpec:
    if isinstance(quantization, QuantSpec):
        return quantization
    return QuantSpec(kind=quantization, dtype=dtype)


class Quantizer:
    """deq(Q(w)) with the bitsandbytes parameter classes and olora_init's helpers (the served code path)."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        if spec.kind != "none" and importlib.util.find_spec("bitsandbytes") is None:
            raise OLoRAError(f"quantization {spec.kind!r} needs bitsandbytes, which is not installed")

    def _holder(self) -> tuple[nn.Module, str]:
        import bitsandbytes as bnb

        holder = nn.Module()
        empty = torch.empty(0, dtype=torch.float32, device=self.spec.device)  # bnb quantizes on `.to(this device)`
        if self.spec.kind == "int8":
            holder.weight = bnb.nn.Int8Params(empty, requires_grad=False, has_fp16_weights=False)
            return holder, "8bit"
        holder.weight = bnb.nn.Params4bit(empty, requires_grad=False, blocksize=self.spec.blocksize,
                                          compress_statistics=self.spec.compress_statistics,
                                          quant_type=self.spec.kind, quant_storage=self.spec.quant_storage)
        return holder, "4bit"

    def roundtrip(self, weight: Tensor, source_dtype: torch.dtype | None = None) -> Tensor:
        """float32 (out, in) deq(Q(weight)); `weight` is cast to `source_dtype` (default spec.dtype) first, as the
        loader casts the checkpoint (the served base) or as PEFT passes the fp32 residual (the trained base)."""
        source = weight.to(source_dtype or self.spec.dtype)  # int8 then goes through float16, as bitsandbytes does
        if self.spec.kind == "none":
            return source.to(torch.float32)
        holder, fmt = self._holder()
        set_residual(holder, fmt, source.to(dtype=torch.float32), source.dtype)  # CPU data (int8 quantizes on the move)
        return dense_weight(holder, fmt).to(device="cpu", dtype=torch.float32)  # (out, in)


# ---- the base checkpoint, one tensor at a time -----------------------------------------------------------

class BaseWeights:
    """Reads single weights of a local safetensors checkpoint (model.safetensors or an index + shards)."""

    def __init__(self, base_dir: str | os.PathLike):
        self.dir = Path(base_dir)
        if not self.dir.is_dir():
            raise BaseWeightsError(f"{self.dir}: not a directory (expected a base model directory)")
        single, index = self.dir / "model.safetensors", self.dir / "model.safetensors.index.json"
        if single.is_file():
            self._files = {key: single for key in self._keys(single)}
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise BaseWeightsError(f"{index}: invalid index ({exc!r})") from None
            self._files = {}
            for key, name in weight_map.items():
                if not isinstance(name, str) or "/" in name or "\\" in name or not name.endswith(".safetensors"):
                    raise BaseWeightsError(f"{index}: shard {name!r} is not a safetensors file in {self.dir}")
                self._files[key] = self.dir / name
        else:
            pickles = sorted(p.name for p in self.dir.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
            hint = f" (pickle weights {pickles} are never opened)" if pickles else ""
            raise BaseWeightsError(f"{self.dir}: no model.safetensors or model.safetensors.index.json{hint}")
        self.config = self._model_config()

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(path, framework="pt") as fh:
                return list(fh.keys())
        except (SafetensorError, OSError) as exc:
            raise BaseWeightsError(f"{path}: not a readable safetensors file ({exc})") from None

    def _model_config(self) -> dict:
        path = self.dir / "config.json"
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except ValueError as exc:
            raise BaseWeightsError(f"{path}: invalid JSON ({exc})") from None

    def parameter_count(self) -> int:
        """Elements of every tensor of the checkpoint (from the safetensors headers; nothing is read)."""
        total = 0
        for path in sorted(set(self._files.values())):
            with safe_open(path, framework="pt") as fh:
                total += sum(math.prod(fh.get_slice(key).get_shape()) for key in fh.keys())
        return total

    def weight(self, module: str) -> Tensor:
        """The (out, in) weight of `module` (e.g. 'model.layers.0.self_attn.q_proj'), as stored."""
        key = f"{module}.weight"
        path = self._files.get(key)
        if path is None:
            sample = sorted(k for k in self._files if k.endswith("proj.weight"))[:2] or sorted(self._files)[:2]
            raise BaseWeightsError(f"{self.dir}: no base weight {key!r} for adapter module {module!r} (base keys "
                                   f"look like {sample}); is this the adapter's base model?")
        try:
            with safe_open(path, framework="pt") as fh:
                tensor = fh.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise BaseWeightsError(f"{path}: cannot read {key!r} ({exc})") from None
        if tensor.ndim != 2 or not tensor.is_floating_point():
            raise BaseWeightsError(f"{path}: {key!r} is {tensor.dtype} {tuple(tensor.shape)}, expected a 2-D float "
                                   "weight (a pre-quantized checkpoint cannot be used as the base here)")
        return tensor


# ---- the conversion ---------------------------------------------------------------------------------------

@dataclass
class LayerError:
    module: str
    rank: int  # k written for this layer
    rel_error: float  # ‖ΔW* − ΔW_k‖_F / ‖ΔW*‖_F (what we serve)
    peft_rel_error: float  # ‖ΔW* − s(BA − B0A0)‖_F / ‖ΔW*‖_F (what PEFT's conversion serves)
    delta_norm: float  # ‖ΔW*‖_F


@dataclass
class QuantConversionReport:
    kind: str  # 'olora'
    quantization: str
    r_in: int
    r_out: int  # config r written (largest per-layer k)
    rank_mode: str  # '2r' | 'fixed' | 'max_rel_error'
    n_layers: int
    max_rel_error: float  # worst layer
    max_peft_rel_error: float
    out_dir: Path
    layers: list[LayerError] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)


def exact_served_delta(W: Tensor, A0: Tensor, B0: Tensor, A: Tensor, B: Tensor, scaling: float,
                       quantizer: Quantizer) -> tuple[Tensor, Tensor]:
    """(ΔW*, ΔW_peft) in float64, (out, in). W: the checkpoint weight; see the module docstring."""
    served = quantizer.roundtrip(W)  # W' = deq(Q(W)): the served base, and what PEFT's init dequantized
    residual = served - (scaling * B0.float()) @ A0.float()  # PEFT's float32 residual
    if quantizer.spec.kind == "none":
        trained_base = residual.to(quantizer.spec.dtype)  # PEFT casts the residual back to the base dtype
    else:
        trained_base = quantizer.roundtrip(residual, source_dtype=torch.float32)  # PEFT re-wraps the fp32 residual
    peft_delta = scaling * (B.double() @ A.double() - B0.double() @ A0.double())
    delta = trained_base.double() - served.double() + scaling * (B.double() @ A.double())
    return delta, peft_delta


def pick_rank(singular: Tensor, default_k: int, rank: int | None, max_rel_error: float | None) -> int:
    """k for one layer: `rank`, or the smallest k (≤ rank if given) with tail-energy error ≤ max_rel_error."""
    limit = singular.numel()
    if max_rel_error is None:
        return min(rank if rank is not None else default_k, limit)
    energy = singular.double() ** 2
    total = energy.sum()
    if total == 0:
        return 1
    tail = (total - torch.cumsum(energy, 0)).clamp_min(0).sqrt() / total.sqrt()  # tail[k-1] = error at rank k
    reached = torch.nonzero(tail <= max_rel_error)
    k = int(reached[0]) + 1 if reached.numel() else limit
    cap = min(rank, limit) if rank is not None else limit
    if k > cap:
        raise RankError(f"reaching a relative error of {max_rel_error} needs rank {k} for this layer, more than the "
                        f"allowed {cap}; raise the rank or the error target")
    return k


def low_rank_factors(U: Tensor, S: Tensor, Vh: Tensor, k: int) -> tuple[Tensor, Tensor, float]:
    """(lora_A (k, in), lora_B (out, k), relative error) of the best rank-k approximation of U·diag(S)·Vh
    (a thin SVD: (out, m), (m,), (m, in)), split as B = U_k·√S_k, A = √S_k·V_kᵀ."""
    root = S[:k].sqrt()
    lora_B = U[:, :k] * root  # (out, k)
    lora_A = root[:, None] * Vh[:k]  # (k, in)
    norm = S.square().sum().sqrt()
    rel = float(S[k:].square().sum().sqrt() / norm) if norm > 0 else 0.0
    return lora_A.float().contiguous(), lora_B.float().contiguous(), rel


def _check_inputs(initial: AdapterFiles, trained: AdapterFiles, rank: int | None,
                  max_rel_error: float | None) -> tuple[list[str], list[str]]:
    for files in (initial, trained):
        check_supported_config(files.config, files.path)
        if files.config.get("fan_in_fan_out"):
            raise UnsupportedLayerError(f"{files.path}: fan_in_fan_out (Conv1D) adapters are not converted "
                                        "quantization-aware")
    kind = conversion_kind(initial.config, trained.config)
    if kind != "olora":
        raise UnsupportedInitError(f"quantization-aware conversion is for OLoRA adapters only, got {kind!r} (PEFT "
                                   "cannot initialise it on a quantized base); use the plain conversion")
    check_matching_pair(initial, trained)
    modules, carried = split_lora_keys(trained)
    check_olora_initial(initial, modules)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise RankError(f"rank must be a positive integer, got {rank!r}")
    if max_rel_error is not None and not (0 <= max_rel_error < 1):
        raise OLoRAError(f"max_rel_error must be in [0, 1), got {max_rel_error!r}")
    return modules, carried


def quant_aware_tensors(initial: AdapterFiles, trained: AdapterFiles, base: BaseWeights, spec: QuantSpec, *,
                        rank: int | None = None, max_rel_error: float | None = None
                        ) -> tuple[dict, dict[str, Tensor], list[LayerError], list[str]]:
    """(config, tensors, per-layer errors, carried keys) of the quant-aware LoRA; writes nothing."""
    modules, carried = _check_inputs(initial, trained, rank, max_rel_error)
    config_in, quantizer = trained.config, Quantizer(spec)
    tensors: dict[str, Tensor] = {}
    layers: list[LayerError] = []
    for module in modules:
        name = module[len(KEY_PREFIX):] if module.startswith(KEY_PREFIX) else module
        A, B = trained.tensors[module + LORA_A_SUFFIX], trained.tensors[module + LORA_B_SUFFIX]  # (r, in), (out, r)
        A0, B0 = initial.tensors[module + LORA_A_SUFFIX], initial.tensors[module + LORA_B_SUFFIX]
        r_layer = layer_rank(config_in, name)
        if A.shape[0] != r_layer or B.shape[1] != r_layer:
            raise RankError(f"{module}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not match r={r_layer}")
        W = base.weight(name)
        if tuple(W.shape) != (B.shape[0], A.shape[1]):
            raise BaseWeightsError(f"{module}: the adapter's delta is (out={B.shape[0]}, in={A.shape[1]}) but base "
                                   f"weight {name}.weight is {tuple(W.shape)}; is this the adapter's base model?")
        scaling = lora_scaling(r_layer, layer_alpha(config_in, name), bool(config_in.get("use_rslora")))
        delta, peft_delta = exact_served_delta(W, A0, B0, A, B, scaling, quantizer)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)  # (out, m), (m,), (m, in)
        k = pick_rank(S, 2 * r_layer, rank, max_rel_error)
        lora_A, lora_B, rel = low_rank_factors(U, S, Vh, k)
        norm = float(delta.norm())
        peft_rel = float((delta - peft_delta).norm()) / norm if norm > 0 else 0.0
        tensors[module + LORA_A_SUFFIX], tensors[module + LORA_B_SUFFIX] = lora_A, lora_B
        layers.append(LayerError(module=name, rank=k, rel_error=rel, peft_rel_error=peft_rel, delta_norm=norm))
    for key in carried:
        tensors[key] = trained.tensors[key]
    return _written_config(config_in, layers), tensors, layers, carried


def _written_config(config_in: dict, layers: list[LayerError]) -> dict:
    """Scaling 1 everywhere: r = lora_alpha = the largest k; layers with another k get rank/alpha patterns
    keyed by their full (escaped) module name."""
    r_out = max(layer.rank for layer in layers)
    config = dict(config_in)
    patterns = {_exact_pattern(layer.module): layer.rank for layer in layers if layer.rank != r_out}
    config.update(r=r_out, lora_alpha=r_out, use_rslora=False, rank_pattern=patterns, alpha_pattern=dict(patterns),
                  init_lora_weights=True, inference_mode=True)
    return config


def _exact_pattern(module: str) -> str:
    return module.replace(".", r"\.")


def convert_quant_aware(initial_dir: str | os.PathLike | None, trained_dir: str | os.PathLike,
                        out_dir: str | os.PathLike, base_dir: str | os.PathLike, quantization: str | QuantSpec = "nf4",
                        *, rank: int | None = None, max_rel_error: float | None = None,
                        dtype: torch.dtype = torch.float32, overwrite: bool = False,
                        initial: AdapterFiles | None = None) -> QuantConversionReport:
    """Write a plain LoRA adapter that reproduces the trained quantized OLoRA model on the served base
    Q(W) (see the module docstring). `quantization`: 'nf4' | 'fp4' | 'int8' | 'none', or a QuantSpec (block
    size, double quantization, storage, dtype). `initial` may replace `initial_dir` (e.g. a recomputed init).
    Every check runs before anything is written; on an error nothing is written."""
    spec = as_spec(quantization, dtype)
    if initial is None:
        if initial_dir is None:
            raise OLoRAError("convert_quant_aware needs initial_dir or initial")
        initial = load_adapter_dir(initial_dir)
    trained = load_adapter_dir(trained_dir)
    if Path(out_dir).resolve() in (initial.path.resolve(), trained.path.resolve(), Path(base_dir).resolve()):
        raise OutputExistsError(f"{out_dir}: the output must not replace an input directory")
    base = BaseWeights(base_dir)
    config, tensors, layers, carried = quant_aware_tensors(initial, trained, base, spec, rank=rank,
                                                           max_rel_error=max_rel_error)
    out = save_adapter_dir(out_dir, config, tensors, overwrite=overwrite)
    mode = "max_rel_error" if max_rel_error is not None else ("fixed" if rank is not None else "2r")
    return QuantConversionReport(
        kind="olora", quantization=spec.kind, r_in=trained.config["r"], r_out=config["r"], rank_mode=mode,
        n_layers=len(layers), max_rel_error=max(x.rel_error for x in layers),
        max_peft_rel_error=max(x.peft_rel_error for x in layers), out_dir=out, layers=layers,
        modules_to_save=carried)


def format_layer_table(report: QuantConversionReport) -> str:
    """A plain-text table of the per-layer errors (CLI output)."""
    width = max(len(x.module) for x in report.layers)
    lines = [f"{'module':<{width}}  rank  rel_error  peft_rel_error"]
    lines += [f"{x.module:<{width}}  {x.rank:>4}  {x.rel_error:9.2e}  {x.peft_rel_error:14.2e}" for x in report.layers]
    return "\n".join(lines)


__all__ = ["QUANTIZATIONS", "QuantSpec", "Quantizer", "BaseWeights", "BaseWeightsError", "LayerError",
           "QuantConversionReport", "convert_quant_aware", "quant_aware_tensors", "exact_served_delta",
           "pick_rank", "low_rank_factors", "format_layer_table"]


def dequantize_linears(model: nn.Module) -> nn.Module:
    """Replace, in place, every bitsandbytes Linear4bit/Linear8bitLt (not PEFT's wrappers around one) by a float32
    nn.Linear of its dequantized weight: the model's *weights* exactly, without bitsandbytes' kernels (LLM.int8
    also quantizes activations). Used to separate weight error from kernel error when measuring conversions."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child).__name__ in ("Linear4bit", "Linear8bitLt") and not hasattr(child, "base_layer"):
                weight = dense_weight(child, weight_format(child)).float()  # (out, in)
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=child.bias is not None)
                linear.weight.data = weight.clone()
                if child.bias is not None:
                    linear.bias.data = child.bias.data.float()
                setattr(module, name, linear)
    return model
