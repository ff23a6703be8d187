"""`Settings.engine_config()`: the one path from `OLORA_*` settings / `olora serve` flags to the engine's config."""
from __future__ import annotations

from dataclasses import fields

import pytest

from app.engine.engine import EngineConfig
from app.server.settings import ENGINE_ONLY_FIELDS, Settings


def test_every_engine_field_is_a_setting_or_documented_engine_only():
    engine_fields = {f.name for f in fields(EngineConfig)}
    mapped = engine_fields - set(ENGINE_ONLY_FIELDS)
    assert set(ENGINE_ONLY_FIELDS) <= engine_fields, "ENGINE_ONLY_FIELDS names a field EngineConfig does not have"
    assert mapped <= set(Settings.model_fields), f"no setting for {sorted(mapped - set(Settings.model_fields))}"
    assert all(reason.strip() for reason in ENGINE_ONLY_FIELDS.values())
    # the twelve fields the lifespan copied by hand before, at least
    assert {"model", "dtype", "quantize", "device", "max_loras", "max_cpu_adapters", "max_rank", "max_batch_size",
            "max_batch_tokens", "max_input_tokens", "max_total_tokens", "max_waiting"} <= mapped


def test_defaults_agree():
    """A setting left alone gives the engine the engine's own default."""
    config = Settings().engine_config()
    assert config == EngineConfig()


def test_each_setting_reaches_the_engine(monkeypatch):
    """Non-default values, one per mapped field, arrive unchanged: through the environment and through flags."""
    values = {"model": "/models/x", "dtype": "bf16", "quantize": "nf4", "device": "cuda:1", "max_loras": 3,
              "max_cpu_adapters": 7, "max_rank": 12, "max_batch_size": 5, "max_batch_tokens": 999,
              "max_input_tokens": 333, "max_total_tokens": 444, "max_waiting": 11, "compile": "on",
              "decode_graph": "buckets", "cpu_threads": 3, "cpu_gemm": "aten"}
    mapped = {f.name for f in fields(EngineConfig)} - set(ENGINE_ONLY_FIELDS)
    assert set(values) == mapped, "a new EngineConfig setting: add a non-default value for it here"
    for name, value in values.items():
        monkeypatch.setenv(f"OLORA_{name.upper()}", str(value))
    from_env = Settings().engine_config()
    assert {name: getattr(from_env, name) for name in values} == values
    monkeypatch.setenv("OLORA_MAX_RANK", "1")
    assert Settings(max_rank=40).engine_config().max_rank == 40  # a flag beats the environment
    for name in ENGINE_ONLY_FIELDS:
        assert getattr(from_env, name) == getattr(EngineConfig(), name)


@pytest.mark.parametrize("name", sorted(ENGINE_ONLY_FIELDS))
def test_engine_only_fields_are_not_settings(name):
    assert name not in Settings.model_fields  # a setting of that name would be silently ignored by engine_config
