"""Safe reading and atomic writing of PEFT LoRA adapter directories (adapter_config.json + safetensors).

Never unpickles: `.bin`/`.pt`/`.pth`/`.pkl` weights are refused by file name without being opened.
Never runs code named by a config: the config is read and checked by `adapter_format` (the one config reader).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from .adapter_format import label, read_config
from .errors import AdapterFormatError, NonFiniteError, OutputExistsError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# init_lora_weights values whose base is mutated to W - s·B0·A0 (PEFT's `subtract_mutated_init` math)
MUTATED_INIT_KINDS = ("olora", "pissa", "corda", "lora_ga")
# values that leave the base untouched: the adapter already is a plain LoRA
PLAIN_INIT_KINDS = ("lora", "gaussian", "eva", "orthogonal", "mica")


@dataclass
class AdapterFiles:
    config: dict  # parsed adapter_config.json
    tensors: dict[str, Tensor]  # key -> float tensor, as stored
    path: Path  # the adapter directory


def check_tensors(tensors: dict[str, Tensor], where: object) -> None:
    """Float dtypes only, no NaN/Inf. `where` names the file in messages."""
    for key, tensor in tensors.items():
        if not isinstance(key, str):
            raise AdapterFormatError(f"{where}: tensor key {key!r} is not a string")
        if not isinstance(tensor, Tensor) or tensor.dtype not in FLOAT_DTYPES:
            dtype = getattr(tensor, "dtype", type(tensor).__name__)
            raise AdapterFormatError(f"{where}: tensor {key!r} has dtype {dtype}; adapters hold float tensors")
        finite = torch.isfinite(tensor)
        if not finite.all():
            n_bad = int((~finite).sum())
            raise NonFiniteError(
                f"{where}: tensor {key!r} {tuple(tensor.shape)} holds {n_bad} NaN/Inf value(s)"
            )


def load_adapter_dir(path: str | os.PathLike) -> AdapterFiles:
    """Read and validate a PEFT LoRA adapter directory. Raises AdapterFormatError / NonFiniteError."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFormatError(f"{label(path)}: not a directory (expected a PEFT adapter directory)")
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not weights_file.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterFormatError(
                f"{path.name}: weights are pickle files ({', '.join(pickles[:4])}), which are never opened here "
                f"because loading them can run code; save the adapter as {WEIGHTS_NAME} (safe_serialization=True)"
            )
        raise AdapterFormatError(f"{path.name}: missing {WEIGHTS_NAME}")
    if not config_file.is_file():
        raise AdapterFormatError(f"{path.name}: missing {CONFIG_NAME}")
    config = read_config(path)
    try:
        tensors = load_file(weights_file, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{label(weights_file)}: not a readable safetensors file "
                                 f"({type(exc).__name__})") from None
    if not tensors:
        raise AdapterFormatError(f"{label(weights_file)}: holds no tensors")
    check_tensors(tensors, label(weights_file))
    return AdapterFiles(config=config, tensors=tensors, path=path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write) -> None:
    with open(path, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def save_adapter_dir(out_dir: str | os.PathLike, config: dict, tensors: dict[str, Tensor], *,
                     overwrite: bool = False) -> Path:
    """Atomically write `config` + `tensors` as a PEFT adapter directory.

    Written into a temp dir beside `out_dir`, fsynced, then renamed into place. An existing non-empty
    `out_dir` is refused unless `overwrite=True` (then it is replaced as a whole). On any error nothing is
    left behind and an existing `out_dir` is untouched."""
    out_dir = Path(out_dir)
    parent = out_dir.parent
    if parent.exists() and not parent.is_dir():
        raise AdapterFormatError(f"{out_dir}: parent {parent} is not a directory")
    parent.mkdir(parents=True, exist_ok=True)  # like `mkdir -p`
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out_dir}: exists and is not empty (pass overwrite=True to replace it)")
    check_tensors(tensors, out_dir / WEIGHTS_NAME)
    try:
        config_bytes = (json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as exc:
        raise AdapterFormatError(f"{out_dir / CONFIG_NAME}: config is not JSON-serialisable ({exc})") from None
    tensors = {key: t.detach().cpu().contiguous() for key, t in tensors.items()}

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    old = None
    try:
        _write_file(tmp / CONFIG_NAME, lambda fh: fh.write(config_bytes))
        weights_bytes = save(tensors, metadata={"format": "pt"})  # same bytes as PEFT's safe_save_file
        _write_file(tmp / WEIGHTS_NAME, lambda fh: fh.write(weights_bytes))
        fsync_dir(tmp)
        if out_dir.is_dir():  # empty, or overwrite: move aside, move in, then drop the old one
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=parent))
            os.replace(out_dir, old / "d")
            os.replace(tmp, out_dir)
        else:
            try:
                os.rename(tmp, out_dir)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):  # another writer got there first
                    raise OutputExistsError(f"{out_dir}: appeared while writing; not replaced") from None
                raise
        fsync_dir(parent)
    except BaseException:
        if old is not None and (old / "d").exists() and not out_dir.exists():
            os.replace(old / "d", out_dir)  # put the previous directory back
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not (old / "d").exists():  # never delete a previous adapter we could not restore
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def adapter_kind(config: dict, tensors: dict[str, Tensor] | None = None) -> str:
    """What `init_lora_weights` says: 'olora', 'pissa', 'corda', 'lora_ga', 'loftq', or 'lora' for a plain
    LoRA (True/False/'gaussian'/'eva'/'orthogonal'/'mica': the base is not modified). An unknown string is
    returned lower-cased. The tensors cannot tell an OLoRA adapter from a LoRA one once trained; they are
    only used to report DoRA ('dora' for a plain DoRA adapter, '<kind>+dora' otherwise)."""
    init = config.get("init_lora_weights", True)
    if isinstance(init, bool) or init is None:
        kind = "lora"
    else:
        name = str(init).lower()
        kind = next((k for k in ("pissa", "corda") if name.startswith(k)), name)  # 'pissa_niter_16' etc.
        kind = "lora" if kind in PLAIN_INIT_KINDS else kind
    is_dora = bool(config.get("use_dora")) or any("lora_magnitude_vector" in key for key in (tensors or {}))
    if is_dora:
        return "dora" if kind == "lora" else f"{kind}+dora"
    return kind
