"""Loading the shared base model (HF id or local dir; dtype; bitsandbytes quantization; device) and its fingerprint.

Fingerprint = "sha256:" + sha256 over the *original files*: `config.json` bytes, then for every `*.safetensors`
file in name order its name and bytes. It is computed before quantization from what is on disk, so the same
checkpoint gives the same fingerprint whatever `dtype`/`quantize`/`device` the engine uses; adapters validated on
one replica are valid on every replica of the same checkpoint. Hashing reads the weights once (~1 s per GB).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from olora_core.default_model import hash_file_into
from olora_core.bnb_load import avoid_unsupported_cpu_4bit_packing, bnb_quantization_config
from olora_core.dtypes import QUANTIZATIONS, dtype_names
from olora_core.dtypes import torch_dtype as named_dtype

from .errors import BaseModelError

if TYPE_CHECKING:
    from olora_core.quant_convert import QuantSpec


@dataclass
class LoadedBase:
    model: nn.Module  # a transformers *ForCausalLM in eval mode
    tokenizer: object
    name: str  # what the user asked for (HF id or directory), or "default" for the embedded model
    path: Path  # local directory the files came from
    fingerprint: str
    device: torch.device
    dtype: torch.dtype  # compute/activation dtype (= LoRA slot dtype)
    quantize: str

    def describe(self) -> "BaseDescription":
        from olora_core.quant_convert import QuantSpec

        spec = None
        if self.quantize != "none":
            found = QuantSpec.from_model(self.model, device="cpu")
            spec = found if found.kind == self.quantize else QuantSpec(kind=self.quantize)
        return BaseDescription(name=self.name, path=self.path, fingerprint=self.fingerprint, dtype=self.dtype,
                               device=self.device, quantization=spec)


@dataclass(frozen=True)
class BaseDescription:
    """What the layers above the engine may know of the served base, without reaching into the model."""

    name: str  # what the user asked for (HF id or directory), or "default"
    path: Path  # local directory of the checkpoint (merges, provenance checks, conversions read it)
    fingerprint: str  # "sha256:..." of the original files (module docstring)
    dtype: torch.dtype  # compute dtype in use
    device: torch.device
    quantization: QuantSpec | None  # the served layers' bitsandbytes settings; None = not quantized


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise BaseModelError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BaseModelError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    resolved = named_dtype(dtype)
    if resolved is None:
        raise BaseModelError(f"invalid dtype {dtype!r}: expected auto, {', '.join(dtype_names())}")
    return resolved


def resolve_model_dir(model: str | None) -> tuple[str, Path]:
    """(display name, local directory). None = the embedded default model; a local dir; else an HF hub id."""
    if model is None:
        try:
            from olora_core.default_model import default_model_path

            return "default", Path(default_model_path())
        except Exception as exc:  # not installed, or its assets are missing
            raise BaseModelError(f"no model given and the embedded default model is unavailable ({exc})") from None
    path = Path(model).expanduser()
    if path.is_dir():
        return model, path.resolve()
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=model, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"])
    except Exception as exc:  # offline, unknown id, auth...
        raise BaseModelError(f"model {model!r} is not a local directory and could not be fetched from the hub "
                             f"({type(exc).__name__}: {exc})") from None
    return model, Path(local)


def fingerprint_model_dir(path: Path) -> str:
    """sha256 over config.json and every *.safetensors file (name + bytes, name order). See module docstring."""
    config = path / "config.json"
    weights = sorted(path.glob("*.safetensors"))
    if not config.is_file():
        raise BaseModelError(f"{path}: no config.json")
    if not weights:
        found = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        raise BaseModelError(f"{path}: no *.safetensors weights (pickle files {found} are never loaded)")
    digest = hashlib.sha256()
    for file in [config, *weights]:
        digest.update(file.name.encode() + b"\0")
        hash_file_into(digest, file)
        digest.update(b"\0")
    return "sha256:" + digest.hexdigest()


class _DropInt8CastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast_warning() -> None:
    """bitsandbytes logs "inputs will be cast ... to float16" on *every* int8 matmul of a non-fp16 model (one
    line per layer per step): expected for LLM.int8, and it would flood the server's log. Drop just that line."""
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in bnb_logger.filters):
        bnb_logger.addFilter(_DropInt8CastWarning())


def load_base_model(model: str | None = None, dtype: str = "auto", quantize: str = "none",
                    device: str = "auto") -> LoadedBase:
    """Load tokenizer + causal LM from safetensors only (no remote code), in eval mode, on one device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantize not in QUANTIZATIONS:
        raise BaseModelError(f"invalid quantize {quantize!r}: expected one of {', '.join(QUANTIZATIONS)}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    name, path = resolve_model_dir(model)
    fingerprint = fingerprint_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        net = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype, quantization_config=bnb_quantization_config(quantize, torch_dtype),
            device_map={"": dev}, use_safetensors=True, trust_remote_code=False)
    except Exception as exc:
        raise BaseModelError(f"cannot load model from {path} ({type(exc).__name__}: {exc})") from None
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    if quantize in ("nf4", "fp4") and dev.type == "cpu":
        avoid_unsupported_cpu_4bit_packing(net)
    if quantize == "int8":
        _quiet_int8_cast_warning()
    compute_dtype = net.get_input_embeddings().weight.dtype
    return LoadedBase(model=net, tokenizer=tokenizer, name=name, path=path, fingerprint=fingerprint, device=dev,
                      dtype=compute_dtype, quantize=quantize)

