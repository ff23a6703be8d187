"""The one table of dtype and quantization names, for training, conversion, provenance checks and serving.

`DTYPE_NAMES` are torch's names (what `olora train --dtype`, `olora convert --init-dtype` and uploads'
`init_dtype` take); the server's `--dtype` also takes the short names of `SHORT_DTYPE_NAMES`. `QUANTIZATIONS` are
the bitsandbytes quantizations a base can be trained on and served with (olora_core/bnb_load.py builds them).
Importing this module does not import torch (the CLI builds its parser from it).
"""
from __future__ import annotations

DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
SHORT_DTYPE_NAMES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
QUANTIZATIONS: tuple[str, ...] = ("none", "nf4", "fp4", "int8")


def torch_dtype(name: str):
    """The torch dtype of a name of `DTYPE_NAMES` or `SHORT_DTYPE_NAMES`; None for any other name."""
    import torch

    canonical = SHORT_DTYPE_NAMES.get(name, name)
    return getattr(torch, canonical) if canonical in DTYPE_NAMES else None


def dtype_names() -> list[str]:
    """Every accepted dtype name, sorted (for error messages)."""
    return sorted([*DTYPE_NAMES, *SHORT_DTYPE_NAMES])
