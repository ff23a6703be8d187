"""Merging an adapter into its base: the streamed tar / written dir loads as a plain model with PEFT's logits."""
from __future__ import annotations

import copy
import io
import pickle
import tarfile

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import olora_core.merge_into_base as merge_into_base
from helpers import tiny_gpt2, tiny_llama
from olora_core.adapter_io import load_adapter_dir, save_adapter_dir
from olora_core.errors import MergeError
from olora_core.merge_into_base import iter_merged_model_tar, merge_into_base_dir
from tolerances import SAME_MODEL_LOGITS


INPUT_IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
TOKENIZER_FILES = {"tokenizer.json": b'{"version": "1.0"}', "tokenizer_config.json": b'{"model_max_length": 64}'}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "plain": LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, task_type="CAUSAL_LM"),
    "rslora_patterns": LoraConfig(r=4, lora_alpha=6, use_rslora=True, rank_pattern={"v_proj": 2, "down_proj": 8},
                                  alpha_pattern={"o_proj": 3}, target_modules=ALL_LINEAR + ["embed_tokens"],
                                  modules_to_save=["lm_head"], task_type="CAUSAL_LM"),
}


def _save_adapter(path, base, config, seed=0):
    model = get_peft_model(base, copy.deepcopy(config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # trained-ish: non-zero B
                param.copy_(torch.randn_like(param) * 0.1)
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path)
    return path


def _save_base(path, model, **kwargs):
    model.save_pretrained(path, **kwargs)
    for name, data in TOKENIZER_FILES.items():
        (path / name).write_bytes(data)
    (path / "notes.txt").write_text("not part of the model")
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_into_base")
    out = {"single": _save_base(root / "single", tiny_llama()),
           "sharded": _save_base(root / "sharded", tiny_llama(), max_shard_size="100KB")}
    for name, config in ADAPTERS.items():
        out[name] = _save_adapter(root / name, tiny_llama(), config)
    return out


def _extract_tar(chunks, dest):
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:") as tar:
        names = tar.getnames()
        tar.extractall(dest, filter="data")
    return names


def _logits(model):
    with torch.no_grad():
        return model(INPUT_IDS).logits


class _RecordingSafeOpen:
    """safe_open that records which tensors are loaded (only adapted ones must be)."""
    loaded: list[str] = []

    def __init__(self, *args, **kwargs):
        self._inner = safe_open(*args, **kwargs)

    def __enter__(self):
        self._reader = self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)

    def get_tensor(self, key):
        _RecordingSafeOpen.loaded.append(key)
        return self._reader.get_tensor(key)


@pytest.mark.parametrize("base_name", ["single", "sharded"])
@pytest.mark.parametrize("adapter_name", list(ADAPTERS))
def test_streamed_tar_loads_with_peft_merged_logits(dirs, tmp_path, monkeypatch, base_name, adapter_name):
    base_dir, adapter_dir = dirs[base_name], dirs[adapter_name]
    _RecordingSafeOpen.loaded = []
    monkeypatch.setattr(merge_into_base, "safe_open", _RecordingSafeOpen)
    chunks = iter_merged_model_tar(base_dir, adapter_dir, chunk_size=8192)
    assert _RecordingSafeOpen.loaded == []  # lazy: nothing read before iteration
    chunks = list(chunks)
    assert max(len(c) for c in chunks) <= 8192
    names = _extract_tar(chunks, tmp_path / "out")
    weight_files = sorted(p.name for p in base_dir.glob("model*"))
    assert sorted(names) == sorted(["config.json", "generation_config.json", *TOKENIZER_FILES, *weight_files])
    assert len(weight_files) == (1 if base_name == "single" else 6)
    for name in ["config.json", *TOKENIZER_FILES]:
        assert (tmp_path / "out" / name).read_bytes() == (base_dir / name).read_bytes()
    adapted = {k.removeprefix("base_model.model.").replace(".lora_A", "").replace(".lora_embedding_A", ".weight")
               .replace(".base_layer", "") for k in load_adapter_dir(adapter_dir).tensors if "lora_B" not in k
               and "lora_embedding_B" not in k}
    assert sorted(_RecordingSafeOpen.loaded) == sorted(adapted)  # one tensor at a time, only adapted ones

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    peft_model = PeftModel.from_pretrained(tiny_llama(), adapter_dir).eval()
    unmerged_logits = _logits(peft_model)
    peft_merged_logits = _logits(peft_model.merge_and_unload())
    ours = _logits(merged)
    torch.testing.assert_close(ours, peft_merged_logits, atol=SAME_MODEL_LOGITS, rtol=0)
    torch.testing.assert_close(ours, unmerged_logits, atol=SAME_MODEL_LOGITS, rtol=0)
    assert (ours - _logits(tiny_llama())).abs().max() > 1e-2  # the adapter changes the model


def test_merge_into_base_dir_gpt2_conv1d(tmp_path):
    base_dir = _save_base(tmp_path / "gpt2", tiny_gpt2())
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                        task_type="CAUSAL_LM")
    adapter_dir = _save_adapter(tmp_path / "gpt2_lora", tiny_gpt2(), config)
    out = merge_into_base_dir(base_dir, adapter_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    peft_model = PeftModel.from_pretrained(tiny_gpt2(), adapter_dir).eval()
    torch.testing.assert_close(_logits(merged), _logits(peft_model), atol=SAME_MODEL_LOGITS, rtol=0)
    torch.testing.assert_close(_logits(merged), _logits(peft_model.merge_and_unload()), atol=SAME_MODEL_LOGITS, rtol=0)
    with pytest.raises(Exception, match="not an empty directory"):
        merge_into_base_dir(base_dir, adapter_dir, out)


def test_bf16_base_is_merged_in_float32_then_cast(dirs, tmp_path):
    base_dir = _save_base(tmp_path / "bf16", tiny_llama(dtype=torch.bfloat16))
    out = merge_into_base_dir(base_dir, dirs["plain"], tmp_path / "merged")
    adapter = load_adapter_dir(dirs["plain"]).tensors
    key = "model.layers.1.mlp.down_proj.weight"
    lora_A = adapter[f"base_model.model.{key.removesuffix('.weight')}.lora_A.weight"]
    lora_B = adapter[f"base_model.model.{key.removesuffix('.weight')}.lora_B.weight"]
    with safe_open(base_dir / "model.safetensors", "pt") as base, safe_open(out / "model.safetensors", "pt") as ours:
        expected = (base.get_tensor(key).float() + (lora_B @ lora_A) * (8 / 4)).to(torch.bfloat16)
        assert ours.get_tensor(key).dtype == torch.bfloat16
        assert torch.equal(ours.get_tensor(key), expected)
        untouched = "model.layers.1.input_layernorm.weight"
        assert torch.equal(ours.get_tensor(untouched), base.get_tensor(untouched))


class _RunsCode:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def test_pickle_only_base_is_refused_unopened(dirs, tmp_path, monkeypatch):
    base_dir = tmp_path / "pickled"
    base_dir.mkdir()
    (base_dir / "config.json").write_bytes((dirs["single"] / "config.json").read_bytes())
    sentinel = tmp_path / "unpickled"
    (base_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode(sentinel)))

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle loader called")
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    with pytest.raises(MergeError, match=r"pickle files \(pytorch_model\.bin\), which are never opened"):
        iter_merged_model_tar(base_dir, dirs["plain"])
    assert not sentinel.exists()


def test_mismatched_adapters_are_refused(dirs, tmp_path):
    files = load_adapter_dir(dirs["plain"])
    renamed = {k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.query"): v for k, v in files.tensors.items()}
    save_adapter_dir(tmp_path / "renamed", files.config, renamed)
    with pytest.raises(MergeError, match=r"match no base weight.*layers\.1\.self_attn\.query"):
        iter_merged_model_tar(dirs["single"], tmp_path / "renamed")
    wider = _save_adapter(tmp_path / "wider", tiny_llama(hidden=96), ADAPTERS["plain"])
    with pytest.raises(MergeError, match="shape"):
        iter_merged_model_tar(dirs["sharded"], wider)
    save_adapter_dir(tmp_path / "olora", {**files.config, "init_lora_weights": "olora"}, files.tensors)
    with pytest.raises(MergeError, match="unconverted"):
        merge_into_base_dir(dirs["single"], tmp_path / "olora", tmp_path / "never")
    assert not (tmp_path / "never").exists()
