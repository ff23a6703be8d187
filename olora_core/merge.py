"""Combine LoRA adapters into one, from their files alone, with PEFT's `LoraModel.add_weighted_adapter` math.

`merge_adapters([(adapter, weight), ...], method)` returns (config, tensors) of a new adapter for
`PeftModel.from_pretrained`: per module, the tensors add_weighted_adapter would produce (same
`peft.utils.merge_utils` functions, same order of operations, float32), without a model.
- `linear` (`ties`, `dare_linear`, `dare_ties`, `magnitude_prune`): equal ranks; A and B are combined
  *separately*: A' = Σ sign(w·s)·√|w·s|·A_i, B' = Σ √|w·s|·B_i. B'A' is NOT Σ w·s·B_i·A_i when several adapters
  touch a module (cross terms B_i·A_j); it is exact for a single adapter only.
- `cat`: ranks add up; A' = [w_i·s_i·A_i] stacked, B' = [B_i] side by side: B'A' = Σ w_i·s_i·B_i·A_i exactly.
- `svd` (`ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`): ΔW = combine(w_i, s_i·B_i·A_i),
  truncated SVD to `svd_rank` (default: the largest source rank): B' = U·diag(S), A' = Vh.
With one source PEFT always uses `linear`, so do we. s = each source's per-module scaling (lora_alpha/r, or /√r
with rsLoRA; rank_pattern/alpha_pattern applied). A module missing from a source gets nothing from it.
dare_* are random: torch is seeded with `seed` once (inside `fork_rng`: the caller's RNG is untouched) and modules
are processed in `module_order` (default: natural sort of names). PEFT walks `model.named_modules()`; pass that
order to reproduce its draws bit for bit.

Output config: the first source's, with r = lora_alpha = new rank (scaling 1), target_modules = union, no
patterns, init_lora_weights True, use_rslora False (PEFT keeps the first source's use_rslora, which scales the
result by √r: PEFT #3761). Also unlike PEFT: the modules_to_save weights of the single source that has them are
carried over (PEFT drops them or copies the untrained module, depending on order), and MergeError is raised where
PEFT would give a wrong or unloadable adapter.
"""
from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils.merge_utils import dare_linear, dare_ties, magnitude_prune, task_arithmetic, ties
from torch import Tensor

from .adapter_format import label as path_label
from .adapter_format import layer_alpha, layer_rank, short
from .adapter_io import MUTATED_INIT_KINDS, AdapterFiles, adapter_kind, load_adapter_dir, save_adapter_dir
from .errors import AdapterFormatError, MergeError, RankError, UnsupportedLayerError

PREFIX = "base_model.model."
EQUAL_RANK_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = EQUAL_RANK_METHODS + ("cat",) + SVD_METHODS
DENSITY_METHODS = tuple(m for m in METHODS if m not in ("linear", "cat", "svd"))
_LORA_KEY = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)")
_CONFIG_KEYS_THAT_MUST_AGREE = ("fan_in_fan_out", "layers_to_transform", "layers_pattern", "exclude_modules",
                                "layer_replication")


@dataclass
class LoraModule:
    name: str  # module path in the model, e.g. "model.layers.0.self_attn.q_proj"
    lora_A: Tensor  # (r, in); embedding: (r, num_embeddings); float32
    lora_B: Tensor  # (out, r); embedding: (dim, r); float32
    scaling: float  # lora_alpha/r or lora_alpha/√r (rsLoRA), patterns applied
    is_embedding: bool
    fan_in_fan_out: bool  # GPT-2 Conv1D: the base weight is stored (in, out)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def transposed(self) -> bool:
        """The base weight is stored as (B·A)ᵀ: embeddings (num_embeddings, dim) and Conv1D (in, out)."""
        return self.is_embedding or self.fan_in_fan_out

    def delta_weight(self) -> Tensor:
        """s·B·A in the layout of the base weight (as PEFT's get_delta_weight), float32."""
        delta = self.lora_B @ self.lora_A  # (out, in)
        return (delta.T if self.transposed else delta) * self.scaling


@dataclass
class ParsedAdapter:
    config: dict
    modules: dict[str, LoraModule]  # module name -> its LoRA pair
    full_weights: dict[str, Tensor]  # adapter key -> whole weight (modules_to_save, saved embedding base layer)
    label: str  # for messages: the directory

    @property
    def max_rank(self) -> int:
        """PEFT's rank of the adapter when allocating merged tensors: max(r, rank_pattern values)."""
        return max([self.config["r"], *(self.config.get("rank_pattern") or {}).values()])


def parse_adapter(adapter: AdapterFiles) -> ParsedAdapter:
    """Split an adapter into per-module LoRA pairs with their scaling. Refuses what cannot be merged exactly."""
    config, label = adapter.config, path_label(adapter.path)  # never an absolute path in a message
    kind = adapter_kind(config, adapter.tensors)
    if kind != "lora":
        init = config.get("init_lora_weights")
        hint = ("it is an unconverted adapter whose base was mutated to W - s·B0·A0 at init, so it merges "
                "wrong onto the original base; convert it to a plain LoRA first (olora convert)"
                if kind in MUTATED_INIT_KINDS else "only plain LoRA adapters can be merged")
        raise MergeError(f"{label}: adapter kind {kind!r} (init_lora_weights={init!r}): {hint}")
    for key in ("lora_bias", "target_parameters", "trainable_token_indices"):
        if config.get(key):
            raise UnsupportedLayerError(f"{label}: {key}={short(config[key])} is not supported by merging")
    pairs: dict[str, dict[str, Tensor]] = {}
    full_weights: dict[str, Tensor] = {}
    for key, tensor in adapter.tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{label}: tensor key {key!r} does not start with {PREFIX!r}")
        match = _LORA_KEY.fullmatch(key[len(PREFIX):])
        if match:
            pairs.setdefault(match[1], {})[match[2]] = tensor
        elif ".lora_" in key:
            raise UnsupportedLayerError(f"{label}: tensor {key!r} belongs to a LoRA variant merging does not handle")
        else:
            full_weights[key] = tensor
    modules = {name: _lora_module(name, parts, config, label) for name, parts in pairs.items()}
    return ParsedAdapter(config=config, modules=modules, full_weights=full_weights, label=label)


def _lora_module(name: str, parts: dict[str, Tensor], config: dict, label: str) -> LoraModule:
    is_embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if is_embedding else ("lora_A.weight", "lora_B.weight")
    if set(parts) != {a_key, b_key}:
        raise AdapterFormatError(f"{label}: module {name!r} has {sorted(parts)}, expected {a_key} and {b_key}")
    lora_A, lora_B = parts[a_key].float(), parts[b_key].float()
    if lora_A.dim() != 2 or lora_B.dim() != 2:
        raise UnsupportedLayerError(f"{label}: module {name!r} has {lora_A.dim()}-D LoRA weights "
                                    f"{tuple(lora_A.shape)}/{tuple(lora_B.shape)}; only Linear/Conv1D/Embedding")
    r, alpha = layer_rank(config, name), layer_alpha(config, name)
    if lora_A.shape[0] != r or lora_B.shape[1] != r:
        raise RankError(f"{label}: module {name!r}: config gives r={r} but {a_key} is {tuple(lora_A.shape)} "
                        f"and {b_key} is {tuple(lora_B.shape)}")
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return LoraModule(name=name, lora_A=lora_A, lora_B=lora_B, scaling=scaling, is_embedding=is_embedding,
                      fan_in_fan_out=bool(config.get("fan_in_fan_out")) and not is_embedding)


def _combine(method: str, tensors: list[Tensor], weights: Tensor, density, sign_method: str) -> Tensor:
    kind = method.removesuffix("_svd")
    if kind in ("linear", "svd"):
        return task_arithmetic(tensors, weights)
    if kind == "ties":
        return ties(tensors, weights, density, sign_method)
    if kind == "dare_linear":
        return dare_linear(tensors, weights, density)
    if kind == "dare_ties":
        return dare_ties(tensors, weights, density, sign_method)
    return magnitude_prune(tensors, weights, density)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_arguments(sources, method, density, majority_sign_method, svd_rank, svd_clamp, seed) -> None:
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if not sources:
        raise MergeError("merging needs at least one (adapter, weight) source")
    for i, source in enumerate(sources):
        if not isinstance(source, (tuple, list)) or len(source) != 2 or not _is_real(source[1]):
            weight = source[1] if isinstance(source, (tuple, list)) and len(source) == 2 else source
            raise MergeError(f"source {i}: expected (adapter or path, finite weight), got weight {short(weight)}")
    if method in DENSITY_METHODS:
        if not _is_real(density) or not 0 < density <= 1:
            raise MergeError(f"method {method!r} needs density in (0, 1] (fraction of values kept), got {density!r}")
    elif density is not None:
        raise MergeError(f"density is only used by {', '.join(DENSITY_METHODS)}, not by {method!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise MergeError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    for name, value in (("svd_rank", svd_rank), ("svd_clamp", svd_clamp)):
        if value is not None and method not in SVD_METHODS:
            raise MergeError(f"{name} is only used by {', '.join(SVD_METHODS)}, not by {method!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise MergeError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    if svd_clamp is not None and (not _is_real(svd_clamp) or not 0 < svd_clamp <= 1):
        raise MergeError(f"svd_clamp must be a quantile in (0, 1], got {svd_clamp!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise MergeError(f"seed must be an integer in [0, 2^63), got {short(seed)}")


def _new_rank(method: str, adapters: list[ParsedAdapter], svd_rank: int | None) -> int:
    ranks = [a.max_rank for a in adapters]
    if method in EQUAL_RANK_METHODS:
        if len(set(ranks)) != 1:
            listed = ", ".join(f"{a.label}: r={r}" for a, r in zip(adapters, ranks))
            raise MergeError(f"method {method!r} needs all adapters at the same rank, got {listed}; "
                             "use 'cat' or an svd method to combine different ranks")
        return ranks[0]
    return sum(ranks) if method == "cat" else (svd_rank or max(ranks))


def _merged_config(adapters: list[ParsedAdapter], new_rank: int) -> dict:
    for key in _CONFIG_KEYS_THAT_MUST_AGREE:
        values = [a.config.get(key) for a in adapters]
        if any(v != values[0] for v in values):
            raise MergeError(f"adapters disagree on {key!r}: " + ", ".join(f"{a.label}: {short(v)}" for a, v in
                                                                           zip(adapters, values)))
    targets = [a.config.get("target_modules") for a in adapters]
    if all(isinstance(t, list) for t in targets):
        target_modules = sorted(set().union(*targets))
    elif all(isinstance(t, str) for t in targets):
        target_modules = targets[0] if len(set(targets)) == 1 else "|".join(f"({t})" for t in targets)
    else:
        raise MergeError("adapters mix target_modules given as a list and as a regex string: "
                         + ", ".join(f"{a.label}: {short(t)}" for a, t in zip(adapters, targets)))
    with_mts = [a for a in adapters if a.config.get("modules_to_save")]
    if len(with_mts) > 1:
        raise MergeError("modules_to_save (whole trained modules) cannot be combined; present in "
                         + ", ".join(f"{a.label}: {short(a.config['modules_to_save'])}" for a in with_mts))
    config = copy.deepcopy(adapters[0].config)
    config.update(r=new_rank, lora_alpha=new_rank, target_modules=target_modules, rank_pattern={},
                  alpha_pattern={}, init_lora_weights=True, use_rslora=False,
                  modules_to_save=copy.deepcopy(with_mts[0].config["modules_to_save"]) if with_mts else None)
    return config


def _natural_key(name: str):
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _ordered_names(adapters: list[ParsedAdapter], module_order: Iterable[str] | None) -> list[str]:
    names = set().union(*(a.modules for a in adapters))
    if module_order is None:
        return sorted(names, key=_natural_key)
    position: dict[str, int] = {}
    for name in module_order:
        position.setdefault(name.removeprefix(PREFIX), len(position))
    missing = sorted(names - position.keys(), key=_natural_key)
    if missing:
        raise MergeError(f"module_order does not list {len(missing)} adapted module(s), e.g. {missing[:3]}")
    return sorted(names, key=position.__getitem__)


def _check_module(name, parts, labels, method, new_rank) -> tuple[int, int]:
    """Same layer kind and shape in every source; returns (out, in) of B·A."""
    shapes = {(m.is_embedding, m.lora_B.shape[0], m.lora_A.shape[1]) for m, _ in parts}
    if len(shapes) > 1:
        listed = ", ".join(f"{lab}: A {tuple(m.lora_A.shape)} B {tuple(m.lora_B.shape)}"
                           f"{' (embedding)' if m.is_embedding else ''}" for (m, _), lab in zip(parts, labels))
        raise MergeError(f"module {name!r} has conflicting shapes across sources: {listed}")
    _, out_features, in_features = shapes.pop()
    for (m, _), lab in zip(parts, labels):
        if method in EQUAL_RANK_METHODS and m.rank != new_rank:
            raise MergeError(f"method {method!r}: module {name!r} has rank {m.rank} in {lab} but the merged "
                             f"adapter has rank {new_rank} (every module must have the same rank)")
    if method in SVD_METHODS and new_rank > min(out_features, in_features):
        raise MergeError(f"svd rank {new_rank} exceeds min(out, in) = {min(out_features, in_features)} of "
                         f"module {name!r} ({out_features}×{in_features})")
    return out_features, in_features


def _merge_module(parts, method, new_rank, out_features, in_features, opts) -> tuple[Tensor, Tensor]:
    """One module's merged (A (new_rank, in), B (out, new_rank)), float32, as add_weighted_adapter."""
    if method == "cat":
        lora_A, lora_B = torch.zeros(new_rank, in_features), torch.zeros(out_features, new_rank)
        stacked_A = torch.cat([m.lora_A * w * m.scaling for m, w in parts], dim=0)  # (Σr, in)
        stacked_B = torch.cat([m.lora_B for m, _ in parts], dim=1)  # (out, Σr)
        lora_A[: stacked_A.shape[0]] = stacked_A
        lora_B[:, : stacked_B.shape[1]] = stacked_B
        return lora_A, lora_B
    if method in EQUAL_RANK_METHODS:
        weights_A, weights_B = [], []
        for m, w in parts:  # sign on A only, √|w·s| on both
            scaled = w * m.scaling
            weights_A.append(math.sqrt(abs(scaled)) * (1 if scaled >= 0 else -1))
            weights_B.append(math.sqrt(abs(scaled)))
        lora_A = _combine(method, [m.lora_A for m, _ in parts], torch.tensor(weights_A), *opts["combine"])
        lora_B = _combine(method, [m.lora_B for m, _ in parts], torch.tensor(weights_B), *opts["combine"])
        return lora_A.float(), lora_B.float()
    deltas = [m.delta_weight() for m, _ in parts]  # base-weight layout, scaling applied
    delta = _combine(method, deltas, torch.tensor([float(w) for _, w in parts]), *opts["combine"])
    if parts[0][0].transposed:
        delta = delta.T  # back to (out, in) = B·A layout
    U, S, Vh = torch.linalg.svd(delta, full_matrices=opts["full_matrices"])
    U = U[:, :new_rank] @ torch.diag(S[:new_rank])  # (out, new_rank)
    Vh = Vh[:new_rank, :]  # (new_rank, in)
    if opts["clamp"] is not None:
        high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), opts["clamp"])
        U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
    return Vh, U


def merge_adapters(sources: Sequence[tuple[AdapterFiles | str | os.PathLike, float]], method: str, *,
                   density: float | None = None, majority_sign_method: str = "total",
                   svd_rank: int | None = None, svd_clamp: float | None = None, svd_full_matrices: bool = True,
                   seed: int = 0, module_order: Iterable[str] | None = None) -> tuple[dict, dict[str, Tensor]]:
    """Combine `sources` = [(adapter or adapter dir, weight), ...] into one adapter: (config, tensors).

    See the module docstring for the methods. Raises MergeError (and AdapterFormatError/RankError/
    UnsupportedLayerError for unreadable sources). Merged tensors are float32."""
    _check_arguments(sources, method, density, majority_sign_method, svd_rank, svd_clamp, seed)
    adapters = [parse_adapter(src if isinstance(src, AdapterFiles) else load_adapter_dir(src))
                for src, _ in sources]
    weights = [float(w) for _, w in sources]
    method = "linear" if len(adapters) == 1 else method  # as PEFT
    new_rank = _new_rank(method, adapters, svd_rank)
    config = _merged_config(adapters, new_rank)
    opts = {"combine": (density, majority_sign_method), "clamp": svd_clamp, "full_matrices": svd_full_matrices}
    tensors: dict[str, Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in _ordered_names(adapters, module_order):
            present = [(a, w) for a, w in zip(adapters, weights) if name in a.modules]
            parts = [(a.modules[name], w) for a, w in present]
            out_features, in_features = _check_module(name, parts, [a.label for a, _ in present], method, new_rank)
            lora_A, lora_B = _merge_module(parts, method, new_rank, out_features, in_features, opts)
            a_key, b_key = (("lora_embedding_A", "lora_embedding_B") if parts[0][0].is_embedding
                            else ("lora_A.weight", "lora_B.weight"))
            tensors[f"{PREFIX}{name}.{a_key}"] = lora_A.contiguous()
            tensors[f"{PREFIX}{name}.{b_key}"] = lora_B.contiguous()
    owner: dict[str, str] = {}
    for adapter in adapters:  # whole weights: the modules_to_save source, saved embedding base layers
        for key, tensor in adapter.full_weights.items():
            if key in owner and not torch.equal(tensors[key], tensor):
                raise MergeError(f"whole weight {key!r} differs between {owner[key]} and {adapter.label}")
            owner.setdefault(key, adapter.label)
            tensors.setdefault(key, tensor)
    return config, tensors


def merge_adapter_dirs(sources: Sequence[tuple[str | os.PathLike, float]], out_dir: str | os.PathLike,
                       method: str, *, overwrite: bool = False, **options) -> Path:
    """merge_adapters(sources, method, **options), written atomically to `out_dir` (save_adapter_dir)."""
    config, tensors = merge_adapters(sources, method, **options)
    return save_adapter_dir(out_dir, config, tensors, overwrite=overwrite)
