"""Merge a LoRA adapter into its base model and stream the standalone result (an uncompressed tar, or a dir).

The output holds the base's config.json, generation_config.json and tokenizer files (copied byte for byte) and
its safetensors weights (`model.safetensors`, or the same shards + `model.safetensors.index.json`), where each
adapted weight W becomes W + s·B·A (computed in float32, cast back to W's dtype; embeddings and GPT-2 Conv1D
weights, stored transposed, get (s·B·A)ᵀ) and modules_to_save / saved embedding weights replace the base's.
Adapter key `base_model.model.X.lora_A.weight` maps to base key `X.weight`.

Memory: the base is never loaded as a whole. Shapes and dtypes do not change, so every output shard has the
input shard's header and size: its header is copied, untouched tensors are copied byte range by byte range
(`chunk_size` at a time) and adapted tensors are read one at a time with `safetensors.safe_open`, merged and
written. Peak memory ≈ the adapter (float32) + one base tensor + its merged copy; nothing is written to disk for
the tar stream, and the tar (sizes known in advance) is produced lazily, chunk by chunk.
Everything that can be checked (files, keys, shapes, dtypes) is checked before the first byte is produced,
so an HTTP response can still turn a MergeError into an error status.
Pickle weights (`pytorch_model.bin`, ...) are refused by name, never opened.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .adapter_io import PICKLE_SUFFIXES, load_adapter_dir
from .errors import MergeError, NonFiniteError, OutputExistsError
from .merge import PREFIX, LoraModule, parse_adapter

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
COPIED_NAMES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json")
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


@dataclass
class _Update:
    """What happens to one base tensor: replaced by a whole adapter weight, then s·B·A added (either or both)."""
    replacement: Tensor | None = None
    lora: LoraModule | None = None

    def apply(self, weight: Tensor) -> Tensor:
        merged = (self.replacement if self.replacement is not None else weight).float()
        if self.lora is not None:
            merged = merged + self.lora.delta_weight()  # (s·B·A) in the base weight's layout, float32
        return merged.to(weight.dtype)


@dataclass
class _Shard:
    path: Path
    data_start: int  # 8 + header length
    tensors: list[tuple[str, str, list[int], int, int]]  # (key, dtype, shape, begin, end), in file order
    updates: dict[str, _Update] = field(default_factory=dict)


@dataclass
class _OutputFile:
    name: str  # file name in the model directory
    size: int
    mtime: int
    chunks: Callable[[], Iterator[bytes]]


def _read_header(path: Path) -> _Shard:
    """Validate a safetensors file (safe_open) and read its tensor table without loading any tensor."""
    try:
        with safe_open(path, framework="pt"):
            pass
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MergeError(f"{path}: not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    tensors = sorted(((key, info["dtype"], info["shape"], *info["data_offsets"]) for key, info in header.items()),
                     key=lambda t: t[3])
    return _Shard(path=path, data_start=8 + header_len, tensors=tensors)


def _base_shards(base_dir: Path) -> list[_Shard]:
    if not base_dir.is_dir():
        raise MergeError(f"{base_dir}: not a directory (expected a base model directory)")
    if (base_dir / SINGLE_NAME).is_file():
        return [_read_header(base_dir / SINGLE_NAME)]
    if not (base_dir / INDEX_NAME).is_file():
        pickles = sorted(p.name for p in base_dir.iterdir() if p.name.endswith(PICKLE_SUFFIXES + (".bin.index.json",)))
        if pickles:
            raise MergeError(f"{base_dir}: the base weights are pickle files ({', '.join(pickles)}), which are never "
                             f"opened here because loading them can run code; convert the base to safetensors")
        raise MergeError(f"{base_dir}: no {SINGLE_NAME} or {INDEX_NAME}")
    try:
        weight_map = json.loads((base_dir / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise MergeError(f"{base_dir / INDEX_NAME}: invalid index ({exc!r})") from None
    shards = []
    for name in sorted(set(weight_map.values())):
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith(".") \
                or not name.endswith(".safetensors") or not (base_dir / name).is_file():
            raise MergeError(f"{base_dir / INDEX_NAME}: shard {name!r} is not a safetensors file in {base_dir}")
        shard = _read_header(base_dir / name)
        listed = {key for key, shard_name in weight_map.items() if shard_name == name}
        held = {t[0] for t in shard.tensors}
        if listed != held:
            raise MergeError(f"{shard.path}: holds {sorted(held ^ listed)[:3]}... contrary to {INDEX_NAME}")
        shards.append(shard)
    return shards


def _plan_updates(shards: list[_Shard], adapter_dir: Path) -> None:
    """Attach each adapter weight to the base tensor it changes; refuse unmatched keys and shape/dtype problems."""
    adapter = parse_adapter(load_adapter_dir(adapter_dir))
    where = {t[0]: (shard, t) for shard in shards for t in shard.tensors}  # base key -> (shard, entry)
    targets: dict[str, tuple[str, _Update, tuple[int, ...]]] = {}  # base key -> (adapter key, update, shape)
    for name, module in adapter.modules.items():
        delta_shape = (module.lora_B.shape[0], module.lora_A.shape[1])  # (out, in) of B·A
        update = _Update(lora=module)
        targets[f"{name}.weight"] = (f"{PREFIX}{name}", update, delta_shape[::-1] if module.transposed else delta_shape)
    for key, tensor in adapter.full_weights.items():  # modules_to_save, saved embedding base layers
        base_key = key[len(PREFIX):].replace(".base_layer.", ".")
        update = targets[base_key][1] if base_key in targets else _Update()
        update.replacement = tensor
        targets.setdefault(base_key, (key, update, tuple(tensor.shape)))
    unmatched = sorted(f"{adapter_key} -> {base_key}" for base_key, (adapter_key, _, _) in targets.items()
                       if base_key not in where)
    if unmatched:
        raise MergeError(f"{adapter.label}: {len(unmatched)} adapter weight(s) match no base weight, e.g. "
                         f"{unmatched[:3]}; base keys look like {sorted(where)[:2]}")
    for base_key, (adapter_key, update, shape) in targets.items():
        shard, (_, dtype, base_shape, _, _) = where[base_key]
        replaced = update.replacement
        if tuple(base_shape) != tuple(shape) or (replaced is not None and tuple(replaced.shape) != tuple(base_shape)):
            raise MergeError(f"{adapter_key}: gives shape {tuple(shape)} but base weight {base_key!r} in "
                             f"{shard.path.name} is {tuple(base_shape)}")
        if dtype not in FLOAT_DTYPES:
            raise MergeError(f"{shard.path.name}: base weight {base_key!r} has dtype {dtype} (quantized or not "
                             f"a float); merging is only exact on F16/BF16/F32/F64 weights")
        shard.updates[base_key] = update


def _copy_range(fh, start: int, length: int, chunk_size: int) -> Iterator[bytes]:
    fh.seek(start)
    while length > 0:
        chunk = fh.read(min(chunk_size, length))
        if not chunk:
            raise MergeError(f"{fh.name}: file ended early (truncated while merging?)")
        length -= len(chunk)
        yield chunk


def _shard_chunks(shard: _Shard, chunk_size: int) -> Iterator[bytes]:
    with open(shard.path, "rb") as fh, safe_open(shard.path, framework="pt") as reader:
        yield from _copy_range(fh, 0, shard.data_start, chunk_size)  # the header is unchanged
        for key, _, _, begin, end in shard.tensors:
            update = shard.updates.get(key)
            if update is None:
                yield from _copy_range(fh, shard.data_start + begin, end - begin, chunk_size)
                continue
            merged = update.apply(reader.get_tensor(key)).contiguous()
            if not torch.isfinite(merged).all():
                raise NonFiniteError(f"{shard.path.name}: merged weight {key!r} overflows {merged.dtype}")
            data = memoryview(merged.reshape(-1).view(torch.uint8).numpy())
            assert len(data) == end - begin, key  # same dtype and shape as the base tensor
            for offset in range(0, len(data), chunk_size):
                yield bytes(data[offset:offset + chunk_size])


def _file_chunks(path: Path, size: int, chunk_size: int) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        yield from _copy_range(fh, 0, size, chunk_size)


def _plain_file(path: Path, name: str, chunk_size: int) -> _OutputFile:
    stat = path.stat()
    return _OutputFile(name, stat.st_size, int(stat.st_mtime), lambda: _file_chunks(path, stat.st_size, chunk_size))


def plan_merged_model(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, *,
                      chunk_size: int = 1 << 20) -> list[_OutputFile]:
    """Check everything and return the output files (name, size, lazy chunks). Raises MergeError."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise MergeError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    shards = _base_shards(base_dir)
    _plan_updates(shards, adapter_dir)
    names = [name for name in COPIED_NAMES if (base_dir / name).is_file()]
    if len(shards) > 1:
        names.append(INDEX_NAME)  # unchanged: same keys, shards and sizes
    files = [_plain_file(base_dir / name, name, chunk_size) for name in names]
    for shard in shards:
        stat = shard.path.stat()
        files.append(_OutputFile(shard.path.name, stat.st_size, int(stat.st_mtime),
                                 lambda shard=shard: _shard_chunks(shard, chunk_size)))
    return files


def _tar_chunks(files: list[_OutputFile], chunk_size: int) -> Iterator[bytes]:
    written = 0
    for file in files:
        info = tarfile.TarInfo(file.name)
        info.size, info.mtime, info.mode = file.size, file.mtime, 0o644
        header = info.tobuf(format=tarfile.PAX_FORMAT)
        yield header
        produced = 0
        for chunk in file.chunks():
            produced += len(chunk)
            yield chunk
        if produced != file.size:
            raise MergeError(f"{file.name}: produced {produced} bytes instead of {file.size}")
        padding = -file.size % tarfile.BLOCKSIZE
        yield b"\0" * padding
        written += len(header) + file.size + padding
    end = 2 * tarfile.BLOCKSIZE  # end-of-archive marker, then pad to a whole record as tarfile does
    end += -(written + end) % tarfile.RECORDSIZE
    for offset in range(0, end, chunk_size):
        yield b"\0" * min(chunk_size, end - offset)


def iter_merged_model_tar(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, *,
                          chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """An uncompressed tar (files at its root) of base + adapter merged, as lazily produced byte chunks.

    All checks run now (MergeError before any byte); the returned iterator reads the base as it goes."""
    return _tar_chunks(plan_merged_model(base_dir, adapter_dir, chunk_size=chunk_size), chunk_size)


def merge_into_base_dir(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                        *, overwrite: bool = False, chunk_size: int = 1 << 20) -> Path:
    """Write the merged model's files into `out_dir`, atomically (temp dir beside it, then rename)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise OutputExistsError(f"{out_dir}: exists and is not an empty directory (overwrite=True replaces it)")
    if not out_dir.parent.is_dir():
        raise MergeError(f"{out_dir}: parent directory does not exist")
    files = plan_merged_model(base_dir, adapter_dir, chunk_size=chunk_size)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
    try:
        for file in files:
            with open(tmp / file.name, "wb") as fh:
                for chunk in file.chunks():
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
        if out_dir.exists():  # empty, or overwrite: move aside, move in, then drop the old one
            os.replace(out_dir, old)
        os.rename(tmp, out_dir)
    except BaseException:
        if old.exists() and not out_dir.exists():
            os.replace(old, out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
