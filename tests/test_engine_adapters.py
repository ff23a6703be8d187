"""Adapter files: what validate_adapter/submit refuse (with which typed error), and that a converted OLoRA adapter
is served exactly while the unconverted one is refused."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from helpers import save_random_lora, save_tiny_checkpoint
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from app.engine import (
    AdapterBaseMismatch,
    AdapterRankTooLarge,
    AdapterShapeMismatch,
    DirectoryAdapterSource,
    Engine,
    EngineConfig,
    InvalidAdapterFiles,
    SamplingParams,
    UnsupportedAdapterFeature,
)
from tolerances import ENGINE_VS_PEFT_LOGITS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = save_tiny_checkpoint(root / "base")
    good = save_random_lora(base, root / "store" / "good", r=4, targets=("q_proj", "v_proj", "down_proj"))
    engine = Engine(EngineConfig(model=base, dtype="fp32", device="cpu", max_loras=2, max_rank=8, max_batch_size=4,
                                 max_input_tokens=16, max_total_tokens=32, max_batch_tokens=32),
                    DirectoryAdapterSource(root / "store"))
    engine.start()
    yield engine, base, root / "store", good
    engine.shutdown()


def variant(src, dst, config_update=None, tensors_update=None):
    """Copy an adapter dir, editing its config and/or tensors."""
    dst.mkdir(parents=True)
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(config_update or {})
    (dst / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(src / "adapter_model.safetensors"))
    if tensors_update:
        tensors_update(tensors)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def test_good_adapter_info(setup):
    engine, _, store, good = setup
    info = engine.validate_adapter(good)
    assert info.rank == 4 and info.target_kinds == ("down_proj", "q_proj", "v_proj")
    assert len(info.targets) == 6 and not info.use_rslora
    assert info.n_parameters == 2 * 4 * ((64 + 64) + (64 + 32) + (128 + 64))
    assert engine.stats().slots_used == 0  # validation does not touch the slots


@pytest.mark.parametrize("update,match", [
    ({"init_lora_weights": "olora"}, "olora"),
    ({"init_lora_weights": "pissa_niter_4"}, "pissa"),
    ({"init_lora_weights": "corda"}, "corda"),
    ({"init_lora_weights": "loftq"}, "LoftQ"),
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "bias"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"layer_replication": [[0, 2]]}, "layer_replication"),
])
def test_unsupported_configs_are_refused(setup, tmp_path, update, match):
    engine, _, store, good = setup
    bad = variant(store / "good", tmp_path / "bad", update)
    with pytest.raises(UnsupportedAdapterFeature, match=match):
        engine.validate_adapter(bad)
    # submit refuses it too, synchronously (config checks need no tensor load)
    variant(store / "good", store / f"bad-{match}", update)
    with pytest.raises(UnsupportedAdapterFeature, match=match):
        engine.submit([1, 2], f"bad-{match}", SamplingParams())


def test_loftq_is_not_sent_to_a_conversion_that_refuses_it(setup, tmp_path):
    engine, _, store, good = setup
    bad = variant(store / "good", tmp_path / "loftq", {"init_lora_weights": "loftq"})
    with pytest.raises(UnsupportedAdapterFeature) as refused:
        engine.validate_adapter(bad)
    message = str(refused.value)
    assert "neither PEFT's weight conversion nor `olora convert`" in message and "convert it to plain" not in message


def test_tensor_level_refusals(setup, tmp_path):
    engine, _, store, good = setup
    key_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def add(key, value):
        return lambda t: t.__setitem__(key, value)

    cases = [
        (add("base_model.model.lm_head.lora_A.weight", torch.zeros(4, 64)), UnsupportedAdapterFeature, "lm_head"),
        (add("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", torch.ones(64)),
         UnsupportedAdapterFeature, "magnitude"),
        (add("base_model.model.model.embed_tokens.lora_embedding_A", torch.zeros(4, 259)),
         UnsupportedAdapterFeature, "embed"),
        (add("base_model.model.lm_head.modules_to_save.default.weight", torch.zeros(259, 64)),
         UnsupportedAdapterFeature, "modules_to_save"),
        (add(key_a, torch.zeros(4, 48)), AdapterShapeMismatch, r"lora_A \[4, 48\]"),
        (add(key_a, torch.full((4, 64), float("nan"))), InvalidAdapterFiles, "non-finite"),
        (add(key_a, torch.zeros(4, 64, dtype=torch.int32)), InvalidAdapterFiles, "dtype"),
        (lambda t: t.pop(key_a), InvalidAdapterFiles, "lora_B only"),
    ]
    for i, (edit, error, match) in enumerate(cases):
        with pytest.raises(error, match=match):
            engine.validate_adapter(variant(store / "good", tmp_path / f"case{i}", tensors_update=edit))


def test_rank_above_max_rank_is_refused(setup, tmp_path):
    engine, base, _, _ = setup
    big = save_random_lora(base, tmp_path / "big", r=16)
    with pytest.raises(AdapterRankTooLarge, match="rank 16 > max_rank 8"):
        engine.validate_adapter(big)


def test_rank_pattern_mismatch_is_a_shape_error(setup, tmp_path):
    engine, _, store, _ = setup
    bad = variant(store / "good", tmp_path / "pattern", {"rank_pattern": {"q_proj": 2}})
    with pytest.raises(AdapterShapeMismatch, match="r=2"):
        engine.validate_adapter(bad)


def test_pickle_weights_are_never_opened(setup, tmp_path, monkeypatch):
    engine, _, store, _ = setup
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "adapter_config.json").write_text((store / "good" / "adapter_config.json").read_text())
    (evil / "adapter_model.bin").write_bytes(pickle.dumps(Exploit()))

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle loader was called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(InvalidAdapterFiles, match="pickle files are never opened"):
        engine.validate_adapter(evil)
    assert not marker.exists()


def test_adapter_bound_to_another_base_is_refused(setup, tmp_path):
    engine, _, store, _ = setup
    bound = variant(store / "good", tmp_path / "bound")
    (bound / "metadata.json").write_text(json.dumps({"base_fingerprint": "sha256:" + "0" * 64}))
    with pytest.raises(AdapterBaseMismatch, match="bound to base"):
        engine.validate_adapter(bound)
    (bound / "metadata.json").write_text(json.dumps({"base_fingerprint": engine.base.fingerprint}))
    assert engine.validate_adapter(bound).rank == 4


def test_converted_olora_is_served_exactly_and_unconverted_is_refused(setup, tmp_path):
    engine, base, store, _ = setup
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights="olora"))
    init_dir = tmp_path / "olora-init"
    peft_model.save_pretrained(str(init_dir))  # the OLoRA init, before "training"
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # pretend training moved the adapter
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    prompt = [5, 9, 200, 31, 7, 8]
    with torch.no_grad():
        trained = peft_model(torch.tensor([prompt])).logits[0, -1]  # on the base OLoRA mutated
    peft_model.save_pretrained(str(store / "olora-raw"))
    peft_model.save_pretrained(str(store / "olora-converted"), path_initial_model_for_weight_conversion=str(init_dir))
    with pytest.raises(UnsupportedAdapterFeature, match="olora"):
        engine.submit(prompt, "olora-raw", SamplingParams())
    assert engine.validate_adapter(store / "olora-converted").rank == 8  # conversion doubles r
    with torch.no_grad():
        expected = peft_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                       pad_token_id=0)[0, len(prompt):].tolist()
    res = engine.submit(prompt, "olora-converted", SamplingParams(max_new_tokens=8, ignore_eos=True)).result(60)
    assert res.token_ids == expected
    # logits: a second (not started) engine on the same files, its runner driven directly
    idle = Engine(engine.config, DirectoryAdapterSource(store))
    idle.bank.load(1, idle.parser.parse(store / "olora-converted"))
    ours = idle.runner.prefill(0, [prompt], [1])[0]
    assert (ours - trained).abs().max().item() < ENGINE_VS_PEFT_LOGITS


def test_base_fingerprint_is_over_the_original_files(setup, tmp_path):
    import hashlib
    import shutil

    from app.engine import BaseModelError
    from app.engine.base_model import fingerprint_model_dir, load_base_model

    engine, base, _, _ = setup
    digest = hashlib.sha256()
    for name in ["config.json"] + sorted(p.name for p in engine.base.path.glob("*.safetensors")):
        digest.update(name.encode() + b"\0" + (engine.base.path / name).read_bytes() + b"\0")
    assert engine.base.fingerprint == "sha256:" + digest.hexdigest()
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    assert fingerprint_model_dir(copy) == engine.base.fingerprint  # location-independent
    assert load_base_model(str(copy), quantize="nf4", device="cpu").fingerprint == engine.base.fingerprint
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(config))
    assert fingerprint_model_dir(copy) != engine.base.fingerprint
    for path in copy.glob("*.safetensors"):
        path.rename(path.with_suffix(".bin"))
    with pytest.raises(BaseModelError, match="never loaded"):
        load_base_model(str(copy), device="cpu")
    with pytest.raises(BaseModelError, match="quantize"):
        load_base_model(base, quantize="int3", device="cpu")
    with pytest.raises(BaseModelError, match="dtype"):
        load_base_model(base, dtype="fp8", device="cpu")
