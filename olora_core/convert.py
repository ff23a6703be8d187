"""OLoRA/PiSSA -> plain LoRA from the two adapter directories alone (no base model).

Training started from W_res = W - s·B0·A0 with adapter (A0, B0) and ended at (A, B), so the trained model is
W_res + s·B·A = W + s·(B·A - B0·A0) = W + s'·B'·A' with
    A' = cat([A, A0], dim=0)   (2r, in)
    B' = cat([B, -B0], dim=1)  (out, 2r)
and s' = s kept by doubling r and alpha (alpha·√2 with rsLoRA, since s = alpha/√r). This is PEFT's
`subtract_mutated_init`; the output tensors are `torch.equal` to what `save_pretrained(...,
path_initial_model_for_weight_conversion=...)` writes. Differences from PEFT:
- OLoRA-ness is read from BOTH configs (PEFT's conversion rewrites the initial dir's config to say `true`);
- `modules_to_save` / trainable-token weights are carried over (PEFT drops them and cannot reload its output);
- rsLoRA with rank/alpha patterns is converted (every alpha, pattern values included, ×√2; every rank ×2 keeps
  alpha_l/√r_l for every layer l; PEFT refuses this case);
- nothing is written unless both directories are consistent; the initial directory is never modified.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .adapter_format import label, layer_rank
from .adapter_io import (MUTATED_INIT_KINDS, AdapterFiles, adapter_kind, load_adapter_dir, save_adapter_dir)
from .errors import (AdapterMismatchError, NothingToConvertError, OutputExistsError, RankError,
                     UnsupportedInitError, UnsupportedLayerError)

LORA_A_SUFFIX, LORA_B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
# config fields that must agree between the initial and the trained adapter (they define ΔW per layer)
MATCHING_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
                   "base_model_name_or_path", "modules_to_save", "layers_to_transform", "layers_pattern",
                   "exclude_modules", "fan_in_fan_out")
# LoRA features under which ΔW is not s·B·A (or the key layout differs): refused, never converted wrongly
UNSUPPORTED_FLAGS = ("use_dora", "lora_bias", "use_qalora", "use_bdlora", "alora_invocation_tokens",
                     "arrow_config", "velora_config", "monteclora_config", "kasa_config", "target_parameters",
                     "layer_replication")
KEY_PREFIX = "base_model.model."  # PEFT's saved keys: base_model.model.<module path>.lora_A.weight


@dataclass
class ConversionReport:
    kind: str  # 'olora' | 'pissa' | 'corda' | 'lora_ga'
    r_in: int  # config r of the OLoRA adapter
    r_out: int  # config r of the written LoRA adapter (2 * r_in)
    n_layers: int  # LoRA layers converted
    modules_to_save: list[str]  # tensor keys carried over unchanged from the trained adapter
    out_dir: Path
    lora_alpha_out: float = 0.0


def _normalised(field: str, value):
    if field in ("rank_pattern", "alpha_pattern"):
        return dict(value or {})
    if isinstance(value, (list, tuple, set)):
        return sorted(value)
    return value


def conversion_kind(initial: dict, trained: dict) -> str:
    """The mutated-init kind both configs agree on. PEFT's conversion rewrites the initial config to
    init_lora_weights=true, so one of the two saying 'olora'/'pissa'/... is enough."""
    kinds = {adapter_kind(initial), adapter_kind(trained)}
    mutated = kinds & set(MUTATED_INIT_KINDS)
    if len(mutated) > 1:
        raise AdapterMismatchError(f"initial and trained adapters disagree on init_lora_weights: {sorted(kinds)}")
    if mutated:
        return mutated.pop()
    odd = sorted(k for k in kinds if k != "lora")
    if odd:
        raise UnsupportedInitError(
            f"init_lora_weights kind(s) {odd}: only {list(MUTATED_INIT_KINDS)} adapters (base = W - s·B0·A0) "
            "can be converted this way (LoftQ and DoRA change the base / ΔW differently)"
        )
    raise NothingToConvertError("already a plain LoRA adapter; nothing to convert "
                                "(neither config says init_lora_weights = olora/pissa/corda/lora_ga)")


def check_supported_config(config: dict, where: Path) -> None:
    """Refuse an adapter config with a flag the conversions cannot express (UNSUPPORTED_FLAGS)."""
    for flag in UNSUPPORTED_FLAGS:
        if config.get(flag) not in (None, False, [], {}, ""):
            raise UnsupportedLayerError(f"{where}: {flag}={config[flag]!r} is not supported by the conversion")


def check_matching_pair(initial: AdapterFiles, trained: AdapterFiles) -> None:
    """Refuse an (initial, trained) pair that are not the same adapter before and after training: config fields
    (MATCHING_FIELDS), tensor keys and shapes must agree."""
    for field in MATCHING_FIELDS:
        a, b = _normalised(field, initial.config.get(field)), _normalised(field, trained.config.get(field))
        if a != b:
            hint = " (is the trained dir already a converted adapter?)" if field == "r" and b == 2 * a else ""
            raise AdapterMismatchError(f"{field} differs: initial {label(initial.path)} has {a!r}, "
                                       f"trained {label(trained.path)} has {b!r}{hint}")
    only_initial = sorted(initial.tensors.keys() - trained.tensors.keys())
    only_trained = sorted(trained.tensors.keys() - initial.tensors.keys())
    if only_initial or only_trained:
        raise AdapterMismatchError(f"tensor keys differ: only in initial {label(initial.path)}: {only_initial[:5]}, "
                                   f"only in trained {label(trained.path)}: {only_trained[:5]}")
    for key, tensor in trained.tensors.items():
        if tensor.shape != initial.tensors[key].shape:
            raise AdapterMismatchError(f"{key}: shape {tuple(initial.tensors[key].shape)} in initial "
                                       f"{label(initial.path)} vs {tuple(tensor.shape)} in trained {label(trained.path)}")


def split_lora_keys(trained: AdapterFiles) -> tuple[list[str], list[str]]:
    """(module names with a lora_A/lora_B pair, keys carried unchanged). Refuses other LoRA tensors."""
    modules, carried = [], []
    for key in sorted(trained.tensors):
        if key.endswith(LORA_A_SUFFIX):
            module = key[: -len(LORA_A_SUFFIX)]
            if module + LORA_B_SUFFIX not in trained.tensors:
                raise AdapterMismatchError(f"{label(trained.path)}: {key} has no matching {module + LORA_B_SUFFIX}")
            modules.append(module)
        elif key.endswith(LORA_B_SUFFIX):
            if key[: -len(LORA_B_SUFFIX)] + LORA_A_SUFFIX not in trained.tensors:
                raise AdapterMismatchError(f"{label(trained.path)}: {key} has no matching lora_A")
        elif ".lora_" in key:  # lora_embedding_A/B, lora_magnitude_vector, lora_B.bias, ...
            raise UnsupportedLayerError(f"{label(trained.path)}: tensor {key!r} is not a Linear lora_A/lora_B weight; "
                                        "embedding, DoRA and LoRA-bias adapters are not converted")
        else:
            carried.append(key)  # modules_to_save / trainable tokens: not touched by the mutated init
    if not modules:
        raise UnsupportedLayerError(f"{label(trained.path)}: no lora_A/lora_B weights to convert")
    return modules, carried


def _convert_pair(trained: AdapterFiles, initial: AdapterFiles, module: str) -> tuple[Tensor, Tensor]:
    A, B = trained.tensors[module + LORA_A_SUFFIX], trained.tensors[module + LORA_B_SUFFIX]  # (r, in), (out, r)
    A0, B0 = initial.tensors[module + LORA_A_SUFFIX], initial.tensors[module + LORA_B_SUFFIX]
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise RankError(f"{module}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not a rank-r pair")
    name = module[len(KEY_PREFIX):] if module.startswith(KEY_PREFIX) else module
    r_layer = layer_rank(trained.config, name)
    if A.shape[0] != r_layer:
        raise RankError(f"{module}: lora_A has {A.shape[0]} rows but the config gives this layer r={r_layer}")
    dtype_A, dtype_B = torch.promote_types(A.dtype, A0.dtype), torch.promote_types(B.dtype, B0.dtype)
    lora_A = torch.cat([A.to(dtype_A), A0.to(dtype_A)], dim=0)  # (2r, in)
    lora_B = torch.cat([B.to(dtype_B), -B0.to(dtype_B)], dim=1)  # (out, 2r)
    return lora_A, lora_B


def check_olora_initial(initial: AdapterFiles, modules: list[str]) -> None:
    """An OLoRA init has A0 = R[:r] (upper triangular: exact zeros below the diagonal) and B0 = Q[:, :r]
    (orthonormal columns). Training makes A dense at once, so this catches swapped initial/trained dirs."""
    for module in modules:
        A0 = initial.tensors[module + LORA_A_SUFFIX].float()  # (r, in)
        B0 = initial.tensors[module + LORA_B_SUFFIX].float()  # (out, r)
        gram_err = (B0.T @ B0 - torch.eye(B0.shape[1])).abs().max().item()
        if torch.tril(A0, diagonal=-1).count_nonzero() or gram_err > 2e-2:
            raise AdapterMismatchError(
                f"{label(initial.path)}: {module} is not an OLoRA init (lora_A not upper-triangular or lora_B columns "
                f"not orthonormal, max |B0ᵀB0 - I| = {gram_err:.2e}); were the initial and trained dirs swapped?"
            )


def converted_config(config: dict) -> dict:
    """The LoRA config of the converted adapter: every rank ×2, every alpha ×2 (×√2 with rsLoRA, so that
    alpha/√r is kept per layer), init_lora_weights = true."""
    out = dict(config)
    alpha_factor = 2**0.5 if config.get("use_rslora") else 2
    out["r"] = config["r"] * 2
    out["lora_alpha"] = config["lora_alpha"] * alpha_factor
    out["rank_pattern"] = {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()}
    out["alpha_pattern"] = {k: v * alpha_factor for k, v in (config.get("alpha_pattern") or {}).items()}
    out["init_lora_weights"] = True
    out["inference_mode"] = True
    return out


def convert(initial_dir: str | os.PathLike, trained_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
            overwrite: bool = False) -> ConversionReport:
    """Write a plain LoRA adapter equivalent (on the ORIGINAL base W) to the trained OLoRA/PiSSA adapter.

    `initial_dir`: the adapter saved right after init (before training); `trained_dir`: after training.
    Every check runs before anything is written; on an error nothing is written."""
    initial, trained = load_adapter_dir(initial_dir), load_adapter_dir(trained_dir)
    if Path(out_dir).resolve() in (initial.path.resolve(), trained.path.resolve()):
        raise OutputExistsError(f"{label(out_dir)}: the output must not replace one of the input adapter directories")
    for files in (initial, trained):
        check_supported_config(files.config, files.path)
    kind = conversion_kind(initial.config, trained.config)
    check_matching_pair(initial, trained)
    modules, carried = split_lora_keys(trained)
    if kind == "olora":
        check_olora_initial(initial, modules)

    tensors: dict[str, Tensor] = {}
    for module in modules:
        tensors[module + LORA_A_SUFFIX], tensors[module + LORA_B_SUFFIX] = _convert_pair(trained, initial, module)
    for key in carried:
        tensors[key] = trained.tensors[key]
    config = converted_config(trained.config)
    out = save_adapter_dir(out_dir, config, tensors, overwrite=overwrite)
    return ConversionReport(kind=kind, r_in=trained.config["r"], r_out=config["r"], n_layers=len(modules),
                            modules_to_save=carried, out_dir=out, lora_alpha_out=config["lora_alpha"])
