"""Reading/writing PEFT adapter directories: refusals with clear messages, atomic writes."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import olora_core.adapter_io as adapter_io
from olora_core.adapter_io import AdapterFiles, adapter_kind, load_adapter_dir, save_adapter_dir
from olora_core.errors import AdapterFormatError, NonFiniteError, OLoRAError, OutputExistsError

CONFIG = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
          "init_lora_weights": "olora", "auto_mapping": None, "rank_pattern": {}, "alpha_pattern": {}}
KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {KEY_A: torch.randn(4, 16, generator=gen), KEY_B: torch.randn(16, 4, generator=gen).to(torch.bfloat16)}


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def write_dir(path: Path, config=CONFIG, weights=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    save_file(tensors() if weights is None else weights, path / "adapter_model.safetensors")
    return path


def test_roundtrip_is_atomic_and_exact(tmp_path):
    out = save_adapter_dir(tmp_path / "adapter", CONFIG, tensors())
    assert listing(tmp_path) == ["adapter", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    files = load_adapter_dir(out)
    assert isinstance(files, AdapterFiles) and files.path == out and files.config == CONFIG
    expected = tensors()
    assert files.tensors.keys() == expected.keys()
    for key in expected:
        assert files.tensors[key].dtype == expected[key].dtype and torch.equal(files.tensors[key], expected[key])
    with safe_open(out / "adapter_model.safetensors", framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}  # as PEFT writes it


def test_existing_output(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    save_adapter_dir(out, CONFIG, tensors())  # an empty directory may be filled
    changed = dict(CONFIG, r=2)
    with pytest.raises(OutputExistsError, match="not empty"):
        save_adapter_dir(out, changed, tensors())
    assert load_adapter_dir(out).config["r"] == 4
    save_adapter_dir(out, changed, tensors(), overwrite=True)
    assert load_adapter_dir(out).config["r"] == 2
    assert listing(tmp_path) == ["adapter", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a directory"):
        save_adapter_dir(tmp_path / "file", CONFIG, tensors(), overwrite=True)
    with pytest.raises(AdapterFormatError, match="parent .* is not a directory"):
        save_adapter_dir(tmp_path / "file" / "adapter", CONFIG, tensors())
    save_adapter_dir(tmp_path / "new" / "adapter", CONFIG, tensors())  # missing parents are created (mkdir -p)
    assert load_adapter_dir(tmp_path / "new" / "adapter").config["r"] == 4


@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, existing):
    out = tmp_path / "adapter"
    if existing:
        save_adapter_dir(out, CONFIG, tensors())
    before = listing(tmp_path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter_dir(out, dict(CONFIG, r=2), tensors(), overwrite=True)
    assert listing(tmp_path) == before  # no temp dir; the previous adapter (if any) untouched
    if existing:
        assert load_adapter_dir(out).config["r"] == 4


def test_failed_swap_restores_previous_adapter(tmp_path, monkeypatch):
    out = save_adapter_dir(tmp_path / "adapter", CONFIG, tensors())
    before = listing(tmp_path)
    real_replace, calls = adapter_io.os.replace, []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # moving the new dir into place fails after the old one was moved aside
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(adapter_io.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_adapter_dir(out, dict(CONFIG, r=2), tensors(), overwrite=True)
    monkeypatch.undo()
    assert len(calls) == 3 and listing(tmp_path) == before and load_adapter_dir(out).config["r"] == 4


def test_save_refuses_bad_inputs_before_writing(tmp_path):
    bad = tensors()
    bad[KEY_A][1, 2] = float("inf")
    with pytest.raises(NonFiniteError, match="lora_A.weight.*1 NaN/Inf"):
        save_adapter_dir(tmp_path / "a", CONFIG, bad)
    with pytest.raises(AdapterFormatError, match="JSON-serialisable"):
        save_adapter_dir(tmp_path / "a", dict(CONFIG, extra=object()), tensors())
    with pytest.raises(AdapterFormatError, match="dtype torch.int64"):
        save_adapter_dir(tmp_path / "a", CONFIG, {KEY_A: torch.zeros(2, 2, dtype=torch.int64)})
    assert listing(tmp_path) == []


def replace_file(path: Path, data: bytes | None) -> Path:
    """Overwrite (or, with None, delete) one file of an adapter dir; returns the dir."""
    if data is None:
        path.unlink()
    else:
        path.write_bytes(data)
    return path.parent


def with_nan(t: torch.Tensor) -> torch.Tensor:
    t[0, 0] = float("nan")
    return t


LOAD_ERRORS = {
    "not_a_dir": (AdapterFormatError, "not a directory", lambda d: d / "nowhere"),
    "no_weights": (AdapterFormatError, "missing adapter_model.safetensors",
                   lambda d: replace_file(write_dir(d) / "adapter_model.safetensors", None)),
    "no_config": (AdapterFormatError, "missing adapter_config.json",
                  lambda d: replace_file(write_dir(d) / "adapter_config.json", None)),
    "bad_json": (AdapterFormatError, "adapter_config.json: invalid JSON", lambda d: write_dir(d, config="{r: 4")),
    "json_list": (AdapterFormatError, "expected a JSON object", lambda d: write_dir(d, config="[1, 2]")),
    "not_lora": (AdapterFormatError, "peft_type is 'IA3'", lambda d: write_dir(d, dict(CONFIG, peft_type="IA3"))),
    "auto_mapping": (AdapterFormatError, "auto_mapping .* names code outside transformers",
                     lambda d: write_dir(d, dict(CONFIG, auto_mapping={"base_model_class": "LlamaForCausalLM",
                                                                       "parent_library": "evil.module"}))),
    "remote_code": (AdapterFormatError, "'trust_remote_code'",
                    lambda d: write_dir(d, dict(CONFIG, trust_remote_code=True))),
    "bad_r": (AdapterFormatError, "'r' must be a positive integer", lambda d: write_dir(d, dict(CONFIG, r="4"))),
    "bad_alpha": (AdapterFormatError, "'lora_alpha' must be a finite number",
                  lambda d: write_dir(d, dict(CONFIG, lora_alpha=None))),
    "bad_pattern": (AdapterFormatError, r"rank_pattern\['q_proj'\] must be a positive integer",
                    lambda d: write_dir(d, dict(CONFIG, rank_pattern={"q_proj": "big"}))),
    "int_tensor": (AdapterFormatError, r"tensor 'x' has dtype torch.int32",
                   lambda d: write_dir(d, weights={"x": torch.zeros(2, dtype=torch.int32)})),
    "nan": (NonFiniteError, r"q_proj.lora_A.weight' \(4, 16\) holds 1 NaN",
            lambda d: write_dir(d, weights={KEY_A: with_nan(torch.zeros(4, 16))})),
    "corrupt": (AdapterFormatError, "not a readable safetensors file",
                lambda d: replace_file(write_dir(d) / "adapter_model.safetensors", b"\x10\x00garbage")),
}


@pytest.mark.parametrize("case", list(LOAD_ERRORS))
def test_load_refusals(tmp_path, case):
    error, message, make = LOAD_ERRORS[case]
    path = make(tmp_path / "adapter")
    with pytest.raises(error, match=message) as info:
        load_adapter_dir(path)
    assert isinstance(info.value, OLoRAError)


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt", "weights.pth", "adapter.pkl"])
def test_pickle_weights_refused_without_opening(tmp_path, name):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(CONFIG))
    (path / name).write_bytes(pickle.dumps(Payload()))
    with pytest.raises(AdapterFormatError, match=rf"pickle files \({name}\).*never opened"):
        load_adapter_dir(path)
    assert not marker.exists()


def test_adapter_kind():
    cases = {True: "lora", False: "lora", "olora": "olora", "OLoRA": "olora", "pissa": "pissa",
             "pissa_niter_16": "pissa", "corda": "corda", "lora_ga": "lora_ga", "loftq": "loftq",
             "gaussian": "lora", "eva": "lora", "orthogonal": "lora", "mica": "lora", "something_new": "something_new"}
    for init, kind in cases.items():
        assert adapter_kind({"init_lora_weights": init}, {}) == kind, init
    assert adapter_kind({}) == "lora"  # PEFT's default
    assert adapter_kind({"init_lora_weights": True, "use_dora": True}) == "dora"
    assert adapter_kind({"init_lora_weights": "olora"}, {"x.lora_magnitude_vector": torch.ones(2)}) == "olora+dora"
