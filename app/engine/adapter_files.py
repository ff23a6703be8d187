"""Reading PEFT LoRA adapter directories safely, checking them against the served base, and where they come from.

An adapter directory holds `adapter_config.json` + `adapter_model.safetensors` (safetensors only: a pickle
`adapter_model.bin` is refused without being opened). Parsing yields, per target module, `A: (r, in)` and
`B*scaling: (out, r)` on CPU in the slot dtype, so loading into a device slot is a plain `copy_`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, runtime_checkable

import torch
from safetensors import safe_open

from .errors import (
    AdapterBaseMismatch,
    AdapterRankTooLarge,
    AdapterRejected,
    AdapterShapeMismatch,
    InvalidAdapterFiles,
    UnsupportedAdapterFeature,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "metadata.json"  # optional; a "base_fingerprint" key binds the adapter to one base
MAX_CONFIG_BYTES = 1 << 20
ADAPTER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# init_lora_weights values whose adapters are only correct on a base that PEFT mutated at init time: they must be
# converted (PEFT `save_pretrained(path_initial_model_for_weight_conversion=...)`) before they can share a base.
_MUTATING_INITS = ("olora", "pissa", "corda", "loftq", "lora_ga")
# Config keys whose non-empty/true value means something a plain LoRA slot cannot express.
_UNSUPPORTED_KEYS = {
    "use_dora": "DoRA (use_dora)", "modules_to_save": "modules_to_save (full copies of base modules)",
    "trainable_token_indices": "trainable_token_indices (embedding rows)", "layer_replication": "layer_replication",
    "lora_bias": "lora_bias (a bias on lora_B)", "target_parameters": "target_parameters (nn.Parameter targets)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)", "use_qalora": "QALoRA (use_qalora)",
    "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "arrow_config": "Arrow routing",
    "kasa_config": "KaSA", "use_bdlora": "BD-LoRA", "megatron_config": "Megatron parallel layers",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D weights)",
}


@runtime_checkable
class AdapterSource(Protocol):
    """Where the engine finds adapter directories. The HTTP layer's store implements it."""

    def path_for(self, adapter_id: str) -> Path | None:
        """The directory of the current version of `adapter_id`, or None if there is no such adapter."""
        ...


class DirectoryAdapterSource:
    """Each adapter is `root/<id>/`; ids are checked against a strict pattern (no path traversal)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def path_for(self, adapter_id: str) -> Path | None:
        if not isinstance(adapter_id, str) or not ADAPTER_ID_RE.fullmatch(adapter_id):
            return None
        path = self.root / adapter_id
        return path if (path / CONFIG_FILE).is_file() else None


@dataclass(frozen=True)
class AdapterInfo:
    """What `validate_adapter` reports about an adapter directory (nothing is loaded onto the device)."""

    path: Path
    rank: int  # largest per-module rank
    targets: tuple[str, ...]  # full module names, e.g. "model.layers.0.self_attn.q_proj"
    target_kinds: tuple[str, ...]  # distinct last name parts, e.g. ("q_proj", "v_proj")
    use_rslora: bool
    n_parameters: int
    nbytes: int  # host bytes once parsed (slot dtype, unpadded)
    base_model_name_or_path: str | None


@dataclass
class ParsedAdapter:
    """Host-memory form: per module `(A (r, in), B*scaling (out, r))`, already in the slot dtype."""

    info: AdapterInfo
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's `get_pattern_key`: the first pattern p with re.match(rf"(.*\\.)?({p})$", module)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def read_adapter_config(path: Path) -> dict:
    """Load and check adapter_config.json; raises a typed error naming the unsupported feature."""
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise InvalidAdapterFiles(f"{config_path}: missing ({CONFIG_FILE} is required)")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidAdapterFiles(f"{config_path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapterFiles(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidAdapterFiles(f"{config_path}: expected a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UnsupportedAdapterFeature(f"{config_path}: peft_type {peft_type!r} is not supported (only LORA)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_MUTATING_INITS):
        raise UnsupportedAdapterFeature(
            f"{config_path}: init_lora_weights={init!r}: this adapter was trained on a base that PEFT modified at "
            "init time and would give wrong output on the shared base; convert it to plain LoRA first "
            "(PEFT save_pretrained(path_initial_model_for_weight_conversion=...) or `olora convert`)")
    for key, feature in _UNSUPPORTED_KEYS.items():
        if config.get(key):
            raise UnsupportedAdapterFeature(f"{config_path}: {feature} is not supported ({key}={config[key]!r})")
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapterFeature(f"{config_path}: bias={config['bias']!r} changes base biases; only 'none'")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InvalidAdapterFiles(f"{config_path}: {key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in value.values()):
            raise InvalidAdapterFiles(f"{config_path}: {key} must map patterns to positive numbers")
        config[key] = value
    return config


def _check_binding(path: Path, base_fingerprint: str | None) -> None:
    meta_path = path / METADATA_FILE
    if base_fingerprint is None or not meta_path.is_file() or meta_path.stat().st_size > MAX_CONFIG_BYTES:
        return
    try:
        bound = json.loads(meta_path.read_text(encoding="utf-8")).get("base_fingerprint")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return
    if bound and bound != base_fingerprint:
        raise AdapterBaseMismatch(f"{meta_path}: adapter is bound to base {bound}, this engine serves {base_fingerprint}")


def parse_adapter(path: Path, targets: Mapping[str, tuple[int, int]], max_rank: int, dtype: torch.dtype,
                  base_fingerprint: str | None = None, load_tensors: bool = True) -> ParsedAdapter:
    """Check an adapter directory against the served modules `targets` (name -> (in, out)) and, if
    `load_tensors`, read it into host tensors (A, B*scaling). Only the safetensors header is read otherwise."""
    path = Path(path)
    config = read_adapter_config(path)
    _check_binding(path, base_fingerprint)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {pickles}: pickle files are never opened)" if pickles else ""
        raise InvalidAdapterFiles(f"{weights}: missing; only safetensors weights are accepted{hint}")
    use_rslora = bool(config.get("use_rslora", False))
    pairs: dict[str, dict[str, object]] = {}
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            for key in f.keys():
                match = _KEY_RE.match(key)
                if match is None:
                    raise UnsupportedAdapterFeature(
                        f"{weights}: tensor {key!r} is not a plain LoRA weight (DoRA magnitudes, biases, embedding "
                        "LoRA and modules_to_save copies are not supported)")
                module, which = match["module"], match["which"]
                if module not in targets:
                    kind = "lm_head/embedding" if re.search(r"(lm_head|embed|wte|wpe)", module) else "module"
                    raise UnsupportedAdapterFeature(
                        f"{weights}: {key!r} targets {kind} {module!r}, which this engine does not serve "
                        f"(served: {_summary(targets)})")
                sl = f.get_slice(key)
                if sl.get_dtype() not in _FLOAT_DTYPES:
                    raise InvalidAdapterFiles(f"{weights}: {key!r} has dtype {sl.get_dtype()}, expected a float type")
                pairs.setdefault(module, {})[which] = (tuple(sl.get_shape()), key)
            modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            n_params, max_r = 0, 0
            for module in sorted(pairs):
                entry = pairs[module]
                if set(entry) != {"A", "B"}:
                    raise InvalidAdapterFiles(f"{weights}: module {module!r} has lora_{''.join(entry)} only")
                (shape_a, key_a), (shape_b, key_b) = entry["A"], entry["B"]
                in_f, out_f = targets[module]
                r = int(_pattern_value(config["rank_pattern"], module, config["r"]))
                if len(shape_a) != 2 or len(shape_b) != 2 or shape_a != (r, in_f) or shape_b != (out_f, r):
                    raise AdapterShapeMismatch(
                        f"{weights}: module {module!r}: lora_A {list(shape_a)} / lora_B {list(shape_b)} do not fit "
                        f"base in={in_f} out={out_f} with r={r} (expected lora_A [{r}, {in_f}], lora_B [{out_f}, {r}])")
                if r > max_rank:
                    raise AdapterRankTooLarge(f"{weights}: module {module!r} has rank {r} > max_rank {max_rank}")
                max_r = max(max_r, r)
                n_params += r * (in_f + out_f)
                if load_tensors:
                    alpha = float(_pattern_value(config["alpha_pattern"], module, config["lora_alpha"]))
                    scaling = alpha / (math.sqrt(r) if use_rslora else r)
                    a, b = f.get_tensor(key_a), f.get_tensor(key_b)
                    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                        raise InvalidAdapterFiles(f"{weights}: module {module!r} has non-finite values")
                    modules[module] = (a.to(dtype).contiguous(), (b.float() * scaling).to(dtype).contiguous())
    except AdapterRejected:
        raise
    except Exception as exc:  # safetensors raises its own errors for torn/corrupt files
        raise InvalidAdapterFiles(f"{weights}: cannot read safetensors file ({type(exc).__name__}: {exc})") from None
    if not pairs:
        raise InvalidAdapterFiles(f"{weights}: holds no lora_A/lora_B tensors")
    itemsize = torch.empty((), dtype=dtype).element_size()
    info = AdapterInfo(
        path=path, rank=max_r, targets=tuple(sorted(pairs)),
        target_kinds=tuple(sorted({m.rsplit(".", 1)[-1] for m in pairs})), use_rslora=use_rslora,
        n_parameters=n_params, nbytes=n_params * itemsize,
        base_model_name_or_path=config.get("base_model_name_or_path"))
    return ParsedAdapter(info=info, modules=modules)


def _summary(targets: Mapping[str, tuple[int, int]]) -> str:
    kinds = sorted({name.rsplit(".", 1)[-1] for name in targets})
    return ", ".join(kinds) + f" in {len({n.rsplit('.', 1)[0] for n in targets})} blocks"
