"""Atomic store writes, observed: at every rename/replace the store makes while an adapter is overwritten, a
reader finds a complete version, the old one or the new one, never none and never a torn one."""
from __future__ import annotations

import json
import os
from pathlib import Path

from app.adapters.store import adapter_store
from app.adapters.store.adapter_store import AdapterStore


def _src(tmp_path: Path, payload: bytes) -> Path:
    d = tmp_path / f"src-{payload.decode()}"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (d / "adapter_model.safetensors").write_bytes(payload)
    return d


def test_a_reader_sees_the_old_or_the_new_version_at_every_step(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path / "store")
    store.put("a", _src(tmp_path, b"old"), {"n": 1})
    seen = []

    def read(step: str) -> None:
        got = store.get("a")
        assert got is not None, f"{step}: a reader finds no version of 'a'"
        weights = (got.path / "adapter_model.safetensors").read_bytes()
        assert weights in (b"old", b"new") and (got.path / "adapter_config.json").is_file(), step
        assert got.metadata["n"] == {b"old": 1, b"new": 2}[weights], f"{step}: metadata of another version"
        seen.append(weights)

    for name in ("rename", "replace"):
        real = getattr(os, name)

        def observed(src, dst, *args, _real=real, _name=name, **kwargs):
            read(f"before os.{_name}({Path(src).name}, {Path(dst).name})")
            _real(src, dst, *args, **kwargs)
            read(f"after os.{_name}({Path(src).name}, {Path(dst).name})")

        monkeypatch.setattr(adapter_store.os, name, observed)
    store.put("a", _src(tmp_path, b"new"), {"n": 2}, overwrite=True)
    monkeypatch.undo()
    assert seen and seen[0] == b"old" and seen[-1] == b"new", seen
    assert seen == sorted(seen, key=[b"old", b"new"].index), f"went back to the old version: {seen}"
