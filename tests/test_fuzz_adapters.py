"""Hypothesis over adapter configs and request bodies: whatever `adapter_config.json` an upload carries,
the answer is 201 or a small JSON 4xx (never a 5xx), and the server then still serves PEFT's greedy output."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.server.main import create_app
from helpers import save_random_lora
from http_helpers import peft_greedy_text, upload
from test_http_api import base_dir, make_settings  # noqa: F401 - base_dir is a fixture

PROMPT = "Return the number of items"
LORA_KEYS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "init_lora_weights",
             "peft_type", "task_type", "bias", "layers_to_transform", "layers_pattern", "use_dora", "fan_in_fan_out",
             "modules_to_save", "auto_mapping", "lora_dropout", "base_model_name_or_path", "exclude_modules"]
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"]

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(0, 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(MODULES + ["LORA", "olora", "pissa", ".*"])
           | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(MODULES) | st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
overrides = st.dictionaries(st.sampled_from(LORA_KEYS) | st.text(min_size=1, max_size=10), json_values, max_size=4)


@pytest.fixture(scope="module")
def lora_dir(base_dir, tmp_path_factory) -> Path:
    return Path(save_random_lora(base_dir, tmp_path_factory.mktemp("lora") / "good", r=4, seed=1,
                                 task_type="CAUSAL_LM"))


@pytest.fixture(scope="module")
def client(tmp_path_factory, base_dir):
    with TestClient(create_app(make_settings(tmp_path_factory.mktemp("srv"), base_dir)),
                    raise_server_exceptions=False) as c:
        yield c


def _archive(lora_dir: Path, config: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in [("adapter_config.json", json.dumps(config).encode()),
                           ("adapter_model.safetensors", (lora_dir / "adapter_model.safetensors").read_bytes())]:
            info = tarfile.TarInfo(f"adapter/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(changes=overrides)
def test_any_adapter_config_is_201_or_a_json_4xx(client, lora_dir, changes):
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    config.update(changes)
    r = upload(client, "fuzzed", _archive(lora_dir, config), overwrite=True)
    assert r.status_code == 201 or 400 <= r.status_code < 500, (r.status_code, r.text, changes)
    assert r.headers["content-type"].startswith("application/json") and len(r.content) < 1024, r.text


@pytest.mark.parametrize("raw", [
    "[" * 100_000 + "]" * 100_000,  # nesting a recursive parser cannot follow
    '{"inputs": "x", "parameters": {"max_new_tokens": ' + "9" * 5000 + "}}",  # past Python's int-digit limit
    '{"inputs": "x", "parameters": {"temperature": Infinity, "do_sample": true}}',
    '{"inputs": "x", "parameters": {"top_p": NaN, "do_sample": true}}',
    '{"inputs": "x", "parameters": {"max_new_tokens": 1e400}}',
])
def test_hostile_json_bodies_are_json_4xx(client, raw):
    r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and r.headers["content-type"].startswith("application/json"), r.text
    assert len(r.content) < 1024


def test_still_serves_peft_output_after_the_fuzzing(client, base_dir, lora_dir):
    assert upload(client, "good", _archive(lora_dir, json.loads((lora_dir / "adapter_config.json").read_text())),
                  overwrite=True).status_code == 201
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "good", "max_new_tokens": 6}})
    assert r.json()["generated_text"] == peft_greedy_text(base_dir, lora_dir, PROMPT, 6)
    assert client.get("/health").status_code == 200
