"""The one reader of PEFT LoRA adapter configs: bounded JSON, the accepted keys, and PEFT's pattern rules in linear time.

Used by the CLI (`olora convert`, merges, merge-into-base), the upload path and the engine alike, so the rules
cannot disagree. What is checked here (everything else about an adapter is in `adapter_io` / the engine):
- the file: at most MAX_CONFIG_BYTES, UTF-8, JSON nested at most MAX_JSON_DEPTH levels, integers of at most
  MAX_INT_DIGITS digits, no NaN/Infinity, a JSON object;
- `peft_type` LORA; `r` a positive integer; `lora_alpha` a finite number;
- `auto_mapping` (PEFT writes it whenever `task_type` is None): accepted when `parent_library` is under
  `transformers.` and `base_model_class` is a plain identifier; it is never imported. Any other code-naming key
  (`auto_map`, `trust_remote_code`, ...) or another `auto_mapping` is refused;
- `rank_pattern` / `alpha_pattern` / a string `target_modules` / `layers_pattern` / a string `exclude_modules`:
  at most MAX_PATTERNS patterns of at most MAX_PATTERN_CHARS characters, compiled with RE2 (google-re2: no
  backtracking, matching is linear in the module name), so no config can stall the server.

Semantics (PEFT 0.21, kept exactly; tests/test_adapter_format.py checks them against PEFT's own functions):
    pattern_key(patterns, name):  first p in order with re.match(rf"(.*\\.)?({p})$", name)   (get_pattern_key)
    targets_module(config, name): str target_modules -> re.fullmatch(target_modules, name); a list -> name in it
                                  or name ends with "." + one of them, then layers_to_transform / layers_pattern
                                  narrow it (check_target_module_exists); exclude_modules / modules_to_save exclude
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import re2

from .errors import AdapterFormatError, UnsupportedConfigError

CONFIG_NAME = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
MAX_INT_DIGITS = 32
MAX_PATTERNS = 1024
MAX_PATTERN_CHARS = 1024
# the adapter id grammar of the store, the engine and the CLI (no path separators, no leading dot)
ADAPTER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ADAPTER_ID_RE = re.compile(ADAPTER_ID_PATTERN)
# keys that name code to import or run; `auto_mapping` has its own rule (see check_auto_mapping)
CODE_KEYS = ("auto_map", "trust_remote_code", "custom_code", "_custom_modules")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_MODULE_PATH = re.compile(r"^transformers(\.[A-Za-z_][A-Za-z0-9_]*){1,8}$")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.max_mem = 8 << 20  # a pattern that needs more automaton memory than this is refused
_RE2_OPTIONS.log_errors = False  # syntax errors become AdapterFormatError, not stderr noise


def short(value: object, limit: int = 60) -> str:
    """repr() cut to `limit` characters: error messages never carry whole configs."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def label(path: str | os.PathLike) -> str:
    """A file's name with its folder (`trained/adapter_config.json`): never an absolute path in a message."""
    return "/".join(Path(path).parts[-2:])


# ---- bounded JSON ------------------------------------------------------------------------------------------
def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise AdapterFormatError(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise AdapterFormatError(f"number {short(text, 30)} is out of range")
    return value


def _no_constant(name: str):
    raise AdapterFormatError(f"{name} is not a JSON number")


def parse_json(data: bytes, where: str, max_bytes: int = MAX_CONFIG_BYTES) -> object:
    """json.loads with bounded size, nesting depth and integer length (a hostile file cannot exhaust memory,
    recursion or CPU). Raises AdapterFormatError naming `where`."""
    if len(data) > max_bytes:
        raise AdapterFormatError(f"{where}: larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AdapterFormatError(f"{where}: not UTF-8 text") from None
    depth = deepest = 0
    for ch in re.findall(r"[\[\]{}]", _STRING.sub("", text)):  # brackets outside strings
        depth += 1 if ch in "[{" else -1
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            raise AdapterFormatError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_no_constant)
    except AdapterFormatError as exc:
        raise AdapterFormatError(f"{where}: {exc}") from None
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        reason = f"line {exc.lineno} column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else \
            type(exc).__name__
        raise AdapterFormatError(f"{where}: invalid JSON ({reason})") from None


# ---- patterns ----------------------------------------------------------------------------------------------
def compile_pattern(pattern: object, what: str) -> re2._Regexp:
    """An RE2 regex for a config pattern; refuses non-strings, over-long patterns and syntax RE2 lacks
    (back-references, look-around: the constructs that make Python's `re` backtrack)."""
    if not isinstance(pattern, str):
        raise AdapterFormatError(f"{what}: pattern {short(pattern)} is not a string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterFormatError(f"{what}: a pattern of {len(pattern)} characters (at most {MAX_PATTERN_CHARS})")
    try:
        return _compile(pattern)
    except re2.error as exc:
        raise AdapterFormatError(f"{what}: pattern {short(pattern)} is not a linear-time regular expression "
                                 f"({short(str(exc), 80)}); back-references and look-around are not accepted") from None


_CACHE: dict[str, re2._Regexp] = {}


def _compile(pattern: str) -> re2._Regexp:
    compiled = _CACHE.get(pattern)
    if compiled is None:
        compiled = re2.compile(pattern, options=_RE2_OPTIONS)
        if len(_CACHE) > 4096:
            _CACHE.clear()
        _CACHE[pattern] = compiled
    return compiled


def pattern_key(patterns, module_name: str) -> str | None:
    """PEFT's `get_pattern_key`: the first pattern p (in order) with re.match(rf"(.*\\.)?({p})$", module_name);
    None when none matches."""
    for key in patterns:
        compile_pattern(key, "rank_pattern/alpha_pattern")
        if _compile(rf"(.*\.)?({key})$").match(module_name):
            return key
    return None


def layer_rank(config: dict, module_name: str) -> int:
    rank_pattern = config.get("rank_pattern") or {}
    key = pattern_key(rank_pattern, module_name)
    return config["r"] if key is None else rank_pattern[key]


def layer_alpha(config: dict, module_name: str) -> float:
    alpha_pattern = config.get("alpha_pattern") or {}
    key = pattern_key(alpha_pattern, module_name)
    return config["lora_alpha"] if key is None else alpha_pattern[key]


def layer_scaling(config: dict, module_name: str) -> float:
    """PEFT's per-layer scaling: alpha/r, or alpha/√r with rsLoRA (patterns applied)."""
    r, alpha = layer_rank(config, module_name), layer_alpha(config, module_name)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _excluded(config: dict, name: str) -> bool:
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and exclude:
        if _compile(exclude).fullmatch(name):
            return True
    elif exclude and (name in exclude or any(name.endswith(f".{key}") for key in exclude)):
        return True
    saved = config.get("modules_to_save") or []
    return any(_compile(rf"(^|.*\.){m}($|\..*)").match(name) for m in saved)


def _layer_index(config: dict, name: str) -> int | None:
    layers_pattern = config.get("layers_pattern")
    if not layers_pattern:
        match = _compile(r".*?\.[^.]*\.(?P<idx>\d+)\.").match(name)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = _compile(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.").match(name)
            if match is not None:
                break
    return None if match is None else int(match.group("idx"))


def targets_module(config: dict, name: str) -> bool:
    """PEFT's `check_target_module_exists` for a module name of the base model (e.g. model.layers.0.self_attn.q_proj)."""
    if _excluded(config, name):
        return False
    target = config.get("target_modules")
    if target is None:
        return False
    if isinstance(target, str):
        return _compile(target).fullmatch(name) is not None
    if name in target:
        return True
    if not any(name.endswith(f".{key}") for key in target):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(config, name)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


# ---- the config --------------------------------------------------------------------------------------------
def check_auto_mapping(value: object, where: str) -> None:
    """PEFT writes {"base_model_class": "LlamaForCausalLM", "parent_library": "transformers.models.llama..."} when
    task_type is None, to pick a transformers class. Accepted only in that form; it is never imported."""
    if value in (None, {}):
        return
    ok = (isinstance(value, dict) and set(value) <= {"base_model_class", "parent_library"}
          and isinstance(value.get("base_model_class"), str) and _IDENTIFIER.match(value["base_model_class"])
          and isinstance(value.get("parent_library"), str) and _MODULE_PATH.match(value["parent_library"]))
    if not ok:
        raise UnsupportedConfigError(
            f"{where}: auto_mapping {short(value)} names code outside transformers; refused (accepted: "
            "parent_library under 'transformers.' and a plain base_model_class identifier, which is never imported)")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_patterns(config: dict, where: str) -> None:
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise AdapterFormatError(f"{where}: {key} must map module patterns to numbers, got {short(patterns)}")
        if len(patterns) > MAX_PATTERNS:
            raise AdapterFormatError(f"{where}: {key} has {len(patterns)} patterns (at most {MAX_PATTERNS})")
        for pattern, value in patterns.items():
            compile_pattern(pattern, f"{where}: {key}")
            compile_pattern(rf"(.*\.)?({pattern})$", f"{where}: {key}")
            integral = isinstance(value, int) if key == "rank_pattern" else True
            if not _number(value) or not value > 0 or not integral:
                raise AdapterFormatError(f"{where}: {key}[{short(pattern, 40)}] must be a positive "
                                         f"{'integer' if key == 'rank_pattern' else 'number'}, got {short(value)}")
    for key in ("target_modules", "exclude_modules", "layers_pattern", "modules_to_save"):
        value = config.get(key)
        if value is None:
            continue
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or len(items) > MAX_PATTERNS:
            raise AdapterFormatError(f"{where}: {key} must be a string or a list of at most {MAX_PATTERNS} "
                                     f"strings, got {short(value)}")
        for item in items:
            compile_pattern(item, f"{where}: {key}")
    layers = config.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool)) and not (
            isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
        raise AdapterFormatError(f"{where}: layers_to_transform must be an integer or a list of integers")


def check_config(config: object, where: str) -> dict:
    """The rules every reader applies; returns the config (patterns normalised to {} when null)."""
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{where}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedConfigError(f"{where}: peft_type is {short(config.get('peft_type'))}, only 'LORA' is supported")
    check_auto_mapping(config.get("auto_mapping"), where)
    for key in CODE_KEYS:
        if config.get(key) not in (None, {}, False):
            raise UnsupportedConfigError(f"{where}: key {key!r} names code to import ({short(config[key])}); refused")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterFormatError(f"{where}: 'r' must be a positive integer, got {short(r)}")
    if not _number(config.get("lora_alpha")):
        raise AdapterFormatError(f"{where}: 'lora_alpha' must be a finite number, got {short(config.get('lora_alpha'))}")
    _check_patterns(config, where)
    config["rank_pattern"] = config.get("rank_pattern") or {}
    config["alpha_pattern"] = config.get("alpha_pattern") or {}
    return config


def read_config(adapter_dir: str | os.PathLike) -> dict:
    """Read and check `<adapter_dir>/adapter_config.json` (size checked before reading). AdapterFormatError."""
    path = Path(adapter_dir) / CONFIG_NAME
    where = label(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise AdapterFormatError(f"{where}: missing ({CONFIG_NAME} is required)") from None
    except OSError as exc:
        raise AdapterFormatError(f"{where}: cannot be read ({exc.strerror})") from None
    return check_config(parse_json(data, where), where)


# ---- the served weights ------------------------------------------------------------------------------------
# The delta an adapter adds to a base weight, ||s·B·A||_F, may be at most this many times ||W||_F: a real
# adapter's delta is a small fraction of W; one 100x larger only makes the model emit garbage (or inf).
MAX_DELTA_RATIO = 100.0


def delta_norm(lora_A, lora_B, scaling: float) -> float:
    """||s·B·A||_F exactly, in float64, from the (r, r) Gram matrices: ||BA||_F² = Σ (BᵀB) ∘ (AAᵀ)."""
    a, b = lora_A.double(), lora_B.double()  # (r, in), (out, r)
    squared = ((b.T @ b) * (a @ a.T)).sum().item()
    return abs(scaling) * math.sqrt(max(squared, 0.0)) if math.isfinite(squared) else math.inf


def check_scaled_delta(module: str, lora_A, lora_B, scaling: float, base_norm: float | None, where: str) -> float:
    """Refuse a module whose served delta is non-finite or over MAX_DELTA_RATIO × ||W||_F; returns the ratio
    (0 without a base norm). The message names the module and the ratio, never tensor values."""
    from .errors import MagnitudeError

    norm = delta_norm(lora_A, lora_B, scaling) if math.isfinite(scaling) else math.inf
    if not math.isfinite(norm):
        raise MagnitudeError(f"{where}: module {module!r}: the scaled delta s·B·A (s={scaling:.3g}) overflows; "
                             "lora_alpha, alpha_pattern, the weights or the merge weights are too large")
    if base_norm is None:
        return 0.0
    ratio = norm / max(base_norm, 1e-3)
    if ratio > MAX_DELTA_RATIO:
        raise MagnitudeError(f"{where}: module {module!r}: ||s·B·A|| is {ratio:.3g} times ||W|| of the base weight "
                             f"(at most {MAX_DELTA_RATIO:g}); lora_alpha, the weights or the merge weights are too large")
    return ratio
