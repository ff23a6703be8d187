"""Reading PEFT LoRA adapter directories safely, checking them against the served base, and where they come from.

An adapter directory holds `adapter_config.json` + `adapter_model.safetensors` (safetensors only: a pickle
`adapter_model.bin` is refused without being opened). Parsing yields, per target module, `A: (r, in)` and
`B*scaling: (out, r)` on CPU in the slot dtype, so loading into a device slot is a plain `copy_`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, runtime_checkable

import torch
from safetensors import safe_open

from olora_core.adapter_format import (ADAPTER_ID_RE, check_scaled_delta, label, layer_rank, layer_scaling,
                                       read_config, short, targets_module)
from olora_core.adapter_io import CONFIG_NAME, MUTATED_INIT_KINDS, WEIGHTS_NAME
from olora_core.errors import OLoRAError, UnsupportedConfigError

from .errors import (
    AdapterBaseMismatch,
    AdapterRankTooLarge,
    AdapterRejected,
    AdapterShapeMismatch,
    AdapterFilesUnreadable,
    InvalidAdapterFiles,
    UnsupportedAdapterFeature,
)

CONFIG_FILE, WEIGHTS_FILE = CONFIG_NAME, WEIGHTS_NAME  # PEFT's file names, one source: olora_core.adapter_io
METADATA_FILE = "metadata.json"  # optional; a "base_fingerprint" key binds the adapter to one base
MAX_CONFIG_BYTES = 1 << 20
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# init_lora_weights values whose adapters are only correct on a base that PEFT mutated at init time: they must be
# converted (PEFT `save_pretrained(path_initial_model_for_weight_conversion=...)`) before they can share a base.
# Config keys whose non-empty/true value means something a plain LoRA slot cannot express. (fan_in_fan_out is not
# one: it only says how PEFT merges into a Conv1D weight; its forward is x @ A.T @ B.T either way.)
_UNSUPPORTED_KEYS = {
    "use_dora": "DoRA (use_dora)", "modules_to_save": "modules_to_save (full copies of base modules)",
    "trainable_token_indices": "trainable_token_indices (embedding rows)", "layer_replication": "layer_replication",
    "lora_bias": "lora_bias (a bias on lora_B)", "target_parameters": "target_parameters (nn.Parameter targets)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)", "use_qalora": "QALoRA (use_qalora)",
    "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "arrow_config": "Arrow routing",
    "kasa_config": "KaSA", "use_bdlora": "BD-LoRA", "megatron_config": "Megatron parallel layers",
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


def read_adapter_config(path: Path) -> dict:
    """Load and check adapter_config.json with olora_core's one config reader, then the serving rules (what a
    plain LoRA slot cannot express); raises a typed error naming the unsupported feature."""
    if not (Path(path) / CONFIG_FILE).is_file():
        raise AdapterFilesUnreadable(f"{label(Path(path) / CONFIG_FILE)}: missing")
    try:
        config = read_config(path)
    except UnsupportedConfigError as exc:
        raise UnsupportedAdapterFeature(str(exc)) from None
    except OLoRAError as exc:
        raise InvalidAdapterFiles(str(exc)) from None
    where = label(Path(path) / CONFIG_FILE)
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith("loftq"):
        raise UnsupportedAdapterFeature(
            f"{where}: init_lora_weights={short(init)}: LoftQ trains against a base it replaced (the quantized "
            "residual of W - B0·A0), so the adapter is only right on that LoftQ base; neither PEFT's weight "
            "conversion nor `olora convert` turns it into a plain LoRA of the original base. Serve the merged "
            "model (PEFT merge_and_unload) as a base of its own, or train with OLoRA, PiSSA or LoRA")
    if isinstance(init, str) and init.lower().startswith(MUTATED_INIT_KINDS):
        raise UnsupportedAdapterFeature(
            f"{where}: init_lora_weights={short(init)}: this adapter was trained on a base that PEFT modified at "
            "init time and would give wrong output on the shared base; convert it to plain LoRA first "
            "(PEFT save_pretrained(path_initial_model_for_weight_conversion=...) or `olora convert`)")
    for key, feature in _UNSUPPORTED_KEYS.items():
        if config.get(key):
            raise UnsupportedAdapterFeature(f"{where}: {feature} is not supported ({key}={short(config[key])})")
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapterFeature(f"{where}: bias={short(config['bias'])} changes base biases; only 'none'")
    if not config["lora_alpha"] > 0:
        raise InvalidAdapterFiles(f"{where}: lora_alpha must be a positive number, got {short(config['lora_alpha'])}")
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
        raise AdapterBaseMismatch(f"{label(meta_path)}: adapter is bound to base {bound}, this engine serves {base_fingerprint}")


def base_weight_norms(model: torch.nn.Module, names, model_path: Path | None = None) -> dict[str, float]:
    """||W||_F of each served module's base weight (float32); a bitsandbytes weight is read from the checkpoint."""
    norms = {}
    checkpoint = None
    for name in names:
        weight = model.get_submodule(name).base_layer.weight
        if type(weight).__name__ in ("Params4bit", "Int8Params") or not weight.dtype.is_floating_point:
            if checkpoint is None:
                from olora_core.quant_convert import BaseWeights
                checkpoint = BaseWeights(model_path)
            weight = checkpoint.weight(name)
        norms[name] = float(weight.detach().float().norm())
    return norms


@dataclass(frozen=True)
class AdapterParser:
    """What an adapter directory is checked against, and the one way the engine reads one (`parse`)."""

    targets: Mapping[str, tuple[int, int]]  # served module name -> (in_features, out_features)
    max_rank: int
    dtype: torch.dtype  # slot dtype
    base_fingerprint: str | None = None  # refuses adapters bound (metadata.json) to another base
    base_norms: Mapping[str, float] | None = None  # ||W||_F per served module, for the scaled-delta check

    def parse(self, path: Path) -> ParsedAdapter:
        return parse_adapter(path, self.targets, self.max_rank, self.dtype, self.base_fingerprint, self.base_norms)


def parse_adapter(path: Path, targets: Mapping[str, tuple[int, int]], max_rank: int, dtype: torch.dtype,
                  base_fingerprint: str | None = None,
                  base_norms: Mapping[str, float] | None = None) -> ParsedAdapter:
    """Check an adapter directory against the served modules `targets` (name -> (in, out)) and read it into host
    tensors (A, B*scaling), checking the scaled delta of every module against `base_norms` (finite, at most
    MAX_DELTA_RATIO × ||W||)."""
    path = Path(path)
    config = read_adapter_config(path)
    _check_binding(path, base_fingerprint)
    weights = path / WEIGHTS_FILE
    where = label(weights)
    if not weights.is_file():
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {pickles[:4]}: pickle files are never opened)" if pickles else ""
        raise AdapterFilesUnreadable(f"{where}: missing; only safetensors weights are accepted{hint}")
    use_rslora = bool(config.get("use_rslora", False))
    if config.get("target_modules") is not None and not any(targets_module(config, m) for m in targets):
        raise UnsupportedAdapterFeature(  # PEFT: "Target modules {...} not found in the base model"
            f"{label(path / CONFIG_FILE)}: target_modules {short(config['target_modules'])} not found in the base "
            f"model (served: {_summary(targets)})")
    pairs: dict[str, dict[str, object]] = {}
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            for key in f.keys():
                match = _KEY_RE.match(key)
                if match is None:
                    raise UnsupportedAdapterFeature(
                        f"{where}: tensor {short(key, 100)} is not a plain LoRA weight (DoRA magnitudes, biases, "
                        "embedding LoRA and modules_to_save copies are not supported)")
                module, which = match["module"], match["which"]
                if module not in targets:
                    kind = "lm_head/embedding" if re.search(r"(lm_head|embed|wte|wpe)", module) else "module"
                    raise UnsupportedAdapterFeature(
                        f"{where}: {short(key, 100)} targets {kind} {short(module, 80)}, which this engine does not "
                        f"serve (served: {_summary(targets)})")
                if config.get("target_modules") is not None and not targets_module(config, module):
                    raise UnsupportedAdapterFeature(
                        f"{where}: {short(key, 100)} is for module {module!r}, which the config's target_modules / "
                        "layers_to_transform do not select (PEFT would not load it)")
                sl = f.get_slice(key)
                if sl.get_dtype() not in _FLOAT_DTYPES:
                    raise InvalidAdapterFiles(f"{where}: {short(key, 100)} has dtype {sl.get_dtype()}, expected a float type")
                pairs.setdefault(module, {})[which] = (tuple(sl.get_shape()), key)
            modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            n_params, max_r = 0, 0
            for module in sorted(pairs):
                entry = pairs[module]
                if set(entry) != {"A", "B"}:
                    raise InvalidAdapterFiles(f"{where}: module {module!r} has lora_{''.join(entry)} only")
                (shape_a, key_a), (shape_b, key_b) = entry["A"], entry["B"]
                in_f, out_f = targets[module]
                r = int(layer_rank(config, module))
                if len(shape_a) != 2 or len(shape_b) != 2 or shape_a != (r, in_f) or shape_b != (out_f, r):
                    raise AdapterShapeMismatch(
                        f"{where}: module {module!r}: lora_A {list(shape_a)} / lora_B {list(shape_b)} do not fit "
                        f"base in={in_f} out={out_f} with r={r} (expected lora_A [{r}, {in_f}], lora_B [{out_f}, {r}])")
                if r > max_rank:
                    raise AdapterRankTooLarge(f"{where}: module {module!r} has rank {r} > max_rank {max_rank}")
                max_r = max(max_r, r)
                n_params += r * (in_f + out_f)
                scaling = layer_scaling(config, module)
                a, b = f.get_tensor(key_a), f.get_tensor(key_b)  # (r, in), (out, r)
                if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                    raise InvalidAdapterFiles(f"{where}: module {module!r} has non-finite values")
                check_scaled_delta(module, a, b, scaling, (base_norms or {}).get(module), where)
                a_slot, b_slot = a.to(dtype).contiguous(), (b.float() * scaling).to(dtype).contiguous()
                if not (torch.isfinite(a_slot).all() and torch.isfinite(b_slot).all()):
                    raise InvalidAdapterFiles(f"{where}: module {module!r}: the scaled weights overflow {dtype}")
                modules[module] = (a_slot, b_slot)
    except AdapterRejected:
        raise
    except OLoRAError as exc:  # the scaled-delta check
        raise InvalidAdapterFiles(str(exc)) from None
    except Exception as exc:  # safetensors raises its own errors for torn/corrupt files
        raise AdapterFilesUnreadable(f"{where}: cannot read safetensors file ({type(exc).__name__})") from None
    if not pairs:
        raise InvalidAdapterFiles(f"{where}: holds no lora_A/lora_B tensors")
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
