"""Unit tests of server pieces that need no model: metrics label bounds, settings, auth helpers."""
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.server.cli_serve import settings_from_args
from app.server.metrics import OTHER_ADAPTERS, ServerMetrics
from app.server.settings import Settings


class _Stats:
    def __init__(self, adapter_id, reason="length"):
        self.adapter_id, self.finish_reason = adapter_id, reason
        self.prompt_tokens, self.generated_tokens = 3, 4
        self.queue_seconds, self.time_to_first_token, self.total_seconds = 0.01, 0.02, 0.05


def test_per_adapter_labels_are_bounded():
    m = ServerMetrics(max_adapter_labels=2)
    for adapter in ["a", "b", "c", "d", "a", None]:
        m.on_request_done(_Stats(adapter))
    samples = {s.labels.get("adapter"): s.value for f in text_string_to_metric_families(m.render().decode())
               for s in f.samples if s.name == "olora_adapter_requests_total"}
    assert samples == {"a": 2, "b": 1, OTHER_ADAPTERS: 2, "__base__": 1}


def test_lora_info_has_one_current_series():
    m = ServerMetrics(max_loras=4)
    m.set_lora_info(["b", "a"], ["c"])
    m.set_lora_info(["a"], [])
    series = [s for f in text_string_to_metric_families(m.render().decode()) for s in f.samples
              if s.name == "vllm:lora_requests_info"]
    assert len(series) == 1
    assert series[0].labels == {"max_lora": "4", "running_lora_adapters": "a", "waiting_lora_adapters": ""}


def test_flags_override_env_and_keys_split(monkeypatch):
    monkeypatch.setenv("OLORA_MAX_LORAS", "3")
    monkeypatch.setenv("OLORA_ADMIN_KEYS", "x, y")
    settings, _ = settings_from_args(["--max-batch-size", "5"])
    assert settings.max_loras == 3 and settings.max_batch_size == 5 and settings.admin_keys == ["x", "y"]
    settings, _ = settings_from_args(["--max-loras", "7"])
    assert settings.max_loras == 7


def test_public_bind_needs_keys_or_explicit_consent():
    with pytest.raises(ValueError, match="no API keys"):
        Settings(host="0.0.0.0").check_bind()
    assert "WARNING" in Settings(host="0.0.0.0", allow_public_without_keys=True).check_bind()
    assert Settings(host="0.0.0.0", api_keys="k").check_bind() is None
    assert "WARNING" in Settings().check_bind()  # loopback without keys: allowed, but said
