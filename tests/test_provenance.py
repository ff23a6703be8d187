"""OLoRA provenance: an initial checkpoint must be the init of the served base; a config naming another
model is accepted with a warning; uploads and GET /adapters/{id} return warnings and the adapter's tier; /cache."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.server.main import create_app
from helpers import save_random_lora, save_tiny_checkpoint
from http_helpers import tar_gz, upload
from olora_core.adapter_io import load_adapter_dir
from olora_core.provenance import ProvenanceError, check_initial_provenance
from test_http_api import gen, make_settings


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bases")
    return Path(save_tiny_checkpoint(root / "served", seed=0)), Path(save_tiny_checkpoint(root / "other", seed=1))


def olora_pair(base_dir: Path, out: Path, init: str = "olora", dtype=torch.float32) -> tuple[Path, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=init))
    peft_model.save_pretrained(str(out / "initial"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(0.05)
    peft_model.save_pretrained(str(out / "trained"))
    return out / "initial", out / "trained"


@pytest.fixture(scope="module")
def client(tmp_path_factory, bases):
    # no store polling: a poll that sees a new version evicts it from the cache, which would race the tier checks
    with TestClient(create_app(make_settings(tmp_path_factory.mktemp("srv"), bases[0], store_poll_s=3600))) as c:
        yield c


@pytest.mark.parametrize("init", ["olora", "pissa"])
def test_initial_checkpoint_from_another_base_is_refused(client, bases, tmp_path, init):
    served, other = bases
    initial, trained = olora_pair(other, tmp_path / "other", init)  # same shapes, another base
    r = upload(client, f"foreign-{init}", tar_gz(trained), initial=tar_gz(initial))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert "model.layers.0.self_attn.q_proj" in error and "relative Frobenius distance" in error, error
    assert "another base model" in error and str(tmp_path) not in r.text
    initial, trained = olora_pair(served, tmp_path / "own", init)  # the same adapter made on the served base
    r = upload(client, f"own-{init}", tar_gz(trained), initial=tar_gz(initial))
    assert r.status_code == 201, r.text


def test_tolerance_follows_the_stated_init_dtype(bases, tmp_path):
    """A bfloat16 init is ~1e-3 from the float32 QR: refused as float32, accepted when the user says bfloat16."""
    served, _ = bases
    initial, _ = olora_pair(served, tmp_path, dtype=torch.bfloat16)
    files = load_adapter_dir(initial)
    with pytest.raises(ProvenanceError, match="init_dtype=float32"):
        check_initial_provenance(files, served, init_dtype="float32")
    assert check_initial_provenance(files, served, init_dtype="bfloat16") == []


def test_foreign_base_name_is_a_warning_and_tier_is_shown(client, bases, tmp_path):
    served, _ = bases
    lora = Path(save_random_lora(served, tmp_path / "lora", r=4, task_type="CAUSAL_LM"))
    config = json.loads((lora / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (lora / "adapter_config.json").write_text(json.dumps(config))
    r = upload(client, "foreign-name", tar_gz(lora))
    assert r.status_code == 201, r.text
    warnings = r.json()["warnings"]
    assert len(warnings) == 1 and "meta-llama/Llama-2-7b-hf" in warnings[0], warnings
    shown = client.get("/adapters/foreign-name").json()
    assert shown["warnings"] == warnings and shown["tier"] == "disk"
    assert gen(client, "foreign-name").status_code == 200
    assert client.get("/adapters/foreign-name").json()["tier"] in ("device", "host")
    cache = client.get("/cache").json()
    assert "foreign-name" in cache["device_slots"] + cache["host_cache"]
    assert len(cache["device_slots"]) == cache["max_loras"]


def test_a_config_naming_the_served_base_has_no_warning(client, bases, tmp_path):
    lora = Path(save_random_lora(bases[0], tmp_path / "lora", r=4, task_type="CAUSAL_LM"))
    r = upload(client, "same-name", tar_gz(lora))
    assert r.status_code == 201 and r.json()["warnings"] == [], r.text


def test_a_clients_base_path_is_never_looked_up(bases, tmp_path):
    """check_base_name(local_paths=False), as the server calls it: a config naming a directory that exists on the
    server is compared as text, never opened (with local_paths=True, the CLI's default, the other model is found)."""
    from olora_core.quant_convert import BaseWeights
    from olora_core.recompute_init import BaseNameMismatch, check_base_name

    served, other = bases
    renamed = tmp_path / "other-model"
    renamed.mkdir()
    config = json.loads((other / "config.json").read_text())
    (renamed / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=3)))
    other = renamed
    with pytest.raises(BaseNameMismatch, match="a different local model"):
        check_base_name(str(other), BaseWeights(served))
    note = check_base_name(str(other), BaseWeights(served), local_paths=False)
    assert note is not None and "cannot be checked" in note and str(served) not in note
