"""Shared pieces of the HTTP tests: archives of adapter dirs, PEFT reference generations, app construction."""
from __future__ import annotations

import contextlib
import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

import torch


def tar_gz(adapter_dir: str | Path, arcname: str = "adapter") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(str(adapter_dir), arcname=arcname)
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def peft_greedy_text(base_dir, adapter_dir, prompt: str, max_new_tokens: int, *, mutate_olora_initial=None) -> str:
    """Reference: greedy text of PEFT's PeftModel with this one adapter (or the base model when None)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id or 0)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def upload(client, adapter_id: str, archive: bytes, initial: bytes | None = None, overwrite: bool = False,
           headers: dict | None = None, form: dict | None = None):
    files = {"archive": ("adapter.tgz", archive, "application/gzip")}
    if initial is not None:
        files["initial_archive"] = ("initial.tgz", initial, "application/gzip")
    return client.post("/adapters" + ("?overwrite=true" if overwrite else ""),
                       data={"adapter_id": adapter_id, **(form or {})}, files=files, headers=headers or {})


@contextlib.contextmanager
def tmpfs_store(path: Path, size: str, skip_reason: str = "cannot mount a tmpfs here (not root)"):
    """A tmpfs of `size` mounted at `path` (created here) while the block runs: a real filesystem that fills up
    or turns read-only. It needs mount rights (root, as on CI); elsewhere the test is skipped with `skip_reason`.
    Unmounted lazily afterwards: the engine may still map a file."""
    path.mkdir()
    if not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)):
        pytest.skip(skip_reason)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount_read_only(path: Path) -> bool:
    return _mount("-o", "remount,ro", str(path))


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0
