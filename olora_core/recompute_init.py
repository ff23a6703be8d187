"""Convert an OLoRA (or PiSSA) adapter WITHOUT its initial checkpoint, by recomputing the init from the base.

OLoRA's init is a deterministic function of the base weight: A0 = R[:r], B0 = Q[:, :r] with Q, R the float32
reduced QR of W (PEFT casts W to float32 first), so given the same base weights, the same precision at init and
the same r / alpha / patterns / rsLoRA, the initial checkpoint can be rebuilt bit for bit (on the same torch /
LAPACK build; on another build the QR may differ in column signs, which leaves B0·A0, and so the converted delta,
unchanged). What PEFT stores is reproduced too:
- a float16/bfloat16 base: PEFT moves the adapter to the base dtype after the init and then upcasts it to
  float32 (`autocast_adapter_dtype`), so the stored A0/B0 are the float32 factors rounded to that dtype;
- a bitsandbytes base (`quantization`): the init factors the DEQUANTIZED weight deq(Q(W)) (W cast to
  `init_dtype`, quantized with the given settings), and the factors stay float32;
- PiSSA ('pissa': full float32 SVD; A0 = √S_r·U_rᵀ/√s, B0 = V_r·√S_r/√s) likewise. The randomized
  'pissa_niter_K' SVD draws a random matrix from the global RNG at init time: not reproducible, refused.
  CorDA / LoRA-GA (need the training data or gradients), LoftQ and EVA are refused as well.

Valid only when: the base is the one the adapter was trained on, bit for bit; the adapter config (r, lora_alpha,
rank_pattern, alpha_pattern, use_rslora, target_modules) is the one used at init; `init_dtype` / `quantization`
are what the base was loaded as for the init; the PEFT version's init matches PEFT 0.21's (float32 QR / SVD).
Nothing in the trained adapter can prove the first condition: shapes are checked, and a config naming another
model is refused (see `check_base_name`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .adapter_io import AdapterFiles, adapter_kind, load_adapter_dir, save_adapter_dir
from .convert import KEY_PREFIX, LORA_A_SUFFIX, LORA_B_SUFFIX, convert, split_lora_keys
from .dtypes import DTYPE_NAMES, torch_dtype
from .errors import AdapterMismatchError, OLoRAError, RankError, UnsupportedInitError, UnsupportedLayerError
from .olora_init import lora_scaling
from .adapter_format import label, layer_alpha, layer_rank
from .quant_convert import BaseWeights, QuantSpec, Quantizer, as_spec, convert_quant_aware

RECOMPUTABLE = ("olora", "pissa")
# model families whose name is (a prefix of) their transformers model_type: a name naming one of them on a base of
# another model_type is refused. Families that ship in other architectures (SmolLM, TinyLlama, DeepSeek-LLM and
# Vicuna are `llama`; Pythia is `gpt_neox`) are not listed, so their names are never refused by family.
FAMILIES = ("llama", "mistral", "mixtral", "qwen", "gemma", "phi", "gpt2", "gpt-neox", "gptj", "opt", "bloom",
            "falcon", "t5", "mpt", "olmo")
_SIZE_RE = re.compile(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)([mb])(?![a-z0-9])", re.IGNORECASE)


class BaseNameMismatch(AdapterMismatchError):
    """The adapter config names a base model that is obviously not the given base."""


@dataclass
class RecomputeReport:
    kind: str  # 'olora' | 'pissa'
    init_dtype: str
    quantization: str
    n_layers: int
    out_dir: Path
    conversion: object  # the ConversionReport / QuantConversionReport of the conversion that followed
    warnings: list[str] = field(default_factory=list)


# ---- is this the adapter's base? -----------------------------------------------------------------------

def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _size_tokens(name: str) -> list[float]:
    return [float(num) * (1e9 if unit.lower() == "b" else 1e6) for num, unit in _SIZE_RE.findall(name)]


def check_base_name(name: str | None, base: BaseWeights, local_paths: bool = True) -> str | None:
    """None when `name` (the adapter's base_model_name_or_path) is the base; a warning when it cannot be told
    or differs only by path; raises BaseNameMismatch when it obviously names another model: another local
    model directory, another model family than the base's model_type, or a size (7b, 135m) far from the
    base's parameter count. `local_paths=False` (a server checking a client's config): the name is never looked
    up on this machine's filesystem."""
    base_dir = base.dir.resolve()
    base_label = base_dir.name  # messages name the base by its folder, never by an absolute path
    if not name:
        return "the adapter config names no base model (base_model_name_or_path); its base cannot be checked"
    local = Path(name).expanduser()
    if local_paths and local.is_dir():
        if local.resolve() == base_dir:
            return None
        other_config = local / "config.json"
        same = other_config.is_file() and json.loads(other_config.read_text(encoding="utf-8")) == base.config
        if not same:
            raise BaseNameMismatch(f"the adapter was trained on {name}, a different local model than {base_label} "
                                   "(their config.json differ)")
        return f"the adapter names {name}, another directory with the same config.json as {base_label}"
    model_type = _norm(str(base.config.get("model_type", "")))
    named = [fam for fam in FAMILIES if re.search(rf"(?<![a-z]){re.escape(fam)}(?![a-z])", name.lower())]
    if model_type and named and not any(model_type.startswith(_norm(fam)) or _norm(fam).startswith(model_type)
                                        for fam in named):
        raise BaseNameMismatch(f"the adapter names base {name!r} ({'/'.join(named)}) but {base_label} is a "
                               f"{model_type!r} model")
    sizes = _size_tokens(name.split("/")[-1])
    if sizes:
        params = base.parameter_count()
        if not any(0.5 <= size / params <= 2.0 for size in sizes):
            raise BaseNameMismatch(f"the adapter names base {name!r} (about {sizes[0]:.3g} parameters) but {base_label} "
                                   f"has {params:,} parameters")
    if _norm(Path(name).name) == _norm(base_dir.name):
        return f"the adapter names {name!r}; using {base_label} (same name, other path)"
    return (f"the adapter names {name!r}, which cannot be checked against {base_label}; the recomputed init is only "
            "right if that is the same model, bit for bit")


# ---- the init ------------------------------------------------------------------------------------------

def _kind(config: dict) -> str:
    init = config.get("init_lora_weights", True)
    name = str(init).lower() if isinstance(init, str) else ""
    if name.startswith("pissa_niter"):
        raise UnsupportedInitError(
            f"init_lora_weights={init!r}: PiSSA's randomized SVD (torch.svd_lowrank) draws a random matrix at init "
            "time, so the initial factors cannot be recomputed; send the initial checkpoint")
    kind = adapter_kind(config)
    if kind not in RECOMPUTABLE:
        raise UnsupportedInitError(
            f"init_lora_weights={init!r}: only {list(RECOMPUTABLE)} inits are recomputed from the base "
            "(CorDA and LoRA-GA need the training data, LoftQ and EVA are not deterministic functions of W; "
            "a plain LoRA needs no conversion)")
    return kind


def init_factors(weight: Tensor, r: int, scaling: float, kind: str) -> tuple[Tensor, Tensor]:
    """(A0 (r, in), B0 (out, r)) in float32 from the float32 weight, as PEFT's olora_init / pissa_init."""
    if r > min(weight.shape):
        raise RankError(f"r={r} > min(out, in)={min(weight.shape)} for a base weight of shape {tuple(weight.shape)}")
    if kind == "olora":
        Q, R = torch.linalg.qr(weight)  # (out, k), (k, in)
        return R[:r].contiguous(), Q[:, :r].contiguous()
    V, S, Uh = torch.linalg.svd(weight, full_matrices=False)  # PEFT's naming: W = V·diag(S)·Uh
    Sr = S[:r] / scaling
    return (torch.diag(torch.sqrt(Sr)) @ Uh[:r]).contiguous(), (V[:, :r] @ torch.diag(torch.sqrt(Sr))).contiguous()


def recompute_initial(trained_dir: str | os.PathLike, base_dir: str | os.PathLike, *, init_dtype: str = "float32",
                      quantization: str | QuantSpec = "none", check_name: bool = True, local_paths: bool = True
                      ) -> tuple[AdapterFiles, list[str]]:
    """The initial adapter PEFT would have saved (in memory) and the warnings of the base-name check."""
    if init_dtype not in DTYPE_NAMES:
        raise OLoRAError(f"init_dtype must be one of {', '.join(DTYPE_NAMES)}, got {init_dtype!r}")
    trained = load_adapter_dir(trained_dir)
    config = trained.config
    kind = _kind(config)
    spec = as_spec(quantization, torch_dtype(init_dtype))
    if spec.kind != "none" and kind != "olora":
        raise UnsupportedInitError(f"{kind} cannot be initialised on a quantized base by PEFT; recomputing a "
                                   f"{spec.kind} init is only defined for OLoRA")
    if config.get("fan_in_fan_out"):
        raise UnsupportedLayerError(f"{label(trained.path)}: fan_in_fan_out (Conv1D): PEFT's init factors the stored "
                                    "(in, out) layout, which this recomputation does not reproduce")
    base = BaseWeights(base_dir)
    notes = []
    warning = check_base_name(config.get("base_model_name_or_path"), base, local_paths) if check_name else None
    if warning:
        notes.append(warning)
    modules, _ = split_lora_keys(trained)
    quantizer = Quantizer(spec) if spec.kind != "none" else None
    tensors: dict[str, Tensor] = dict(trained.tensors)  # modules_to_save etc.: same keys as the trained dir
    for module in modules:
        name = module[len(KEY_PREFIX):] if module.startswith(KEY_PREFIX) else module
        A, B = trained.tensors[module + LORA_A_SUFFIX], trained.tensors[module + LORA_B_SUFFIX]  # (r, in), (out, r)
        r = layer_rank(config, name)
        W = base.weight(name)  # (out, in), as stored
        if A.shape[0] != r or B.shape[1] != r or tuple(W.shape) != (B.shape[0], A.shape[1]):
            raise AdapterMismatchError(
                f"{module}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} (r={r}) do not fit base weight "
                f"{name}.weight {tuple(W.shape)} in {base.dir.name}: not this adapter's base (or config)")
        dense = quantizer.roundtrip(W) if quantizer else W.to(torch_dtype(init_dtype)).to(torch.float32)
        scaling = lora_scaling(r, layer_alpha(config, name), bool(config.get("use_rslora")))
        A0, B0 = init_factors(dense, r, scaling, kind)
        if quantizer is None and init_dtype != "float32":  # PEFT rounds the factors to the base dtype
            A0, B0 = A0.to(torch_dtype(init_dtype)).float(), B0.to(torch_dtype(init_dtype)).float()
        tensors[module + LORA_A_SUFFIX], tensors[module + LORA_B_SUFFIX] = A0.to(A.dtype), B0.to(B.dtype)
    return AdapterFiles(config=dict(config), tensors=tensors, path=Path("<init recomputed from the base>")), notes


def convert_recomputed(trained_dir: str | os.PathLike, base_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                       init_dtype: str = "float32", quantization: str | QuantSpec = "none", quant_aware: bool = True,
                       rank: int | None = None, max_rel_error: float | None = None, overwrite: bool = False,
                       check_name: bool = True, emit_warnings: bool = True, local_paths: bool = True
                       ) -> RecomputeReport:
    """Recompute the initial checkpoint, then convert: quantization-aware when `quantization` is set and
    `quant_aware`, else PEFT's exact file-level conversion (rank 2r). Nothing is written on an error. The
    base-name check's warnings are in the report, and also issued as UserWarnings unless `emit_warnings=False`
    (a server thread should not touch the global warnings machinery)."""
    initial, notes = recompute_initial(trained_dir, base_dir, init_dtype=init_dtype, quantization=quantization,
                                       check_name=check_name, local_paths=local_paths)
    for note in notes if emit_warnings else ():
        warnings.warn(note, UserWarning, stacklevel=2)
    spec = as_spec(quantization, torch_dtype(init_dtype))
    if spec.kind != "none" and quant_aware:
        conversion = convert_quant_aware(None, trained_dir, out_dir, base_dir, spec, rank=rank,
                                         max_rel_error=max_rel_error, overwrite=overwrite, initial=initial)
    else:
        if rank is not None or max_rel_error is not None:
            raise OLoRAError("rank / max_rel_error apply to the quantization-aware conversion only")
        scratch = Path(tempfile.mkdtemp(prefix=".recomputed-init-"))
        try:
            save_adapter_dir(scratch / "initial", initial.config, initial.tensors)
            conversion = convert(scratch / "initial", trained_dir, out_dir, overwrite=overwrite)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    n_layers = sum(1 for key in initial.tensors if key.endswith(LORA_A_SUFFIX))
    return RecomputeReport(kind=_kind(initial.config), init_dtype=init_dtype, quantization=spec.kind,
                           n_layers=n_layers, out_dir=Path(out_dir), conversion=conversion, warnings=notes)
