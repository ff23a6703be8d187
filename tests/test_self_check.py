"""The start-time self-check (app/engine/self_check.py): the engine's own path against transformers/PEFT.

A correct engine passes on the default model and on a tiny Llama; an engine whose path is deliberately broken
(one decoder layer scaled, a decode-only fault, the LoRA delta dropped on one module, a raising layer) is
refused with a message naming the model type, the probe row, the step and the distance; the server with a
failing check never becomes ready, and `self_check=off` skips it.
"""
from __future__ import annotations

import re

import pytest
import torch
from fastapi.testclient import TestClient

from app.engine import AdapterNotFound, DirectoryAdapterSource, Engine, EngineConfig
from app.engine.self_check import (PROBE_IDS, ProbeHarness, SelfCheckFailed, model_window, run_self_check,
                                   tolerance)
from app.server.cli_serve import settings_from_args
from app.server.main import create_app
from app.server.settings import Settings

from helpers import save_tiny_checkpoint

pytestmark = pytest.mark.numeric  # .ci/run repeats these under ATEN_CPU_CAPABILITY=default

DISTANCE = re.compile(r"distance (\S+) > tolerance (\S+)")


class Recorder:
    """An observer that records the requests it is told about."""

    def __init__(self):
        self.done = []

    def on_cache_event(self, tier, event, adapter_id):
        return None

    def on_adapter_load(self, tier, seconds):
        return None

    def on_step(self, running, waiting, prefill_tokens, decode_tokens):
        return None

    def on_request_done(self, stats):
        self.done.append(stats)


def _engine(tmp_path, **config) -> tuple[Engine, ProbeHarness, Recorder]:
    recorder = Recorder()
    harness = ProbeHarness(DirectoryAdapterSource(tmp_path / "adapters"), recorder)
    engine = Engine(EngineConfig(**config), harness, harness)
    engine.start()
    return engine, harness, recorder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    engine, harness, recorder = _engine(root, model=save_tiny_checkpoint(root / "base", seed=3),
                                        max_total_tokens=128, max_input_tokens=100, max_batch_tokens=256)
    yield engine, harness, recorder
    engine.shutdown()


def _decoder_layers(engine):
    return engine.model.model.layers  # Llama: the tests' models


def _refusal(engine, harness) -> str:
    with pytest.raises(SelfCheckFailed) as info:
        run_self_check(engine, harness)
    return str(info.value)


def test_default_model_passes_within_the_fp32_tolerance(tmp_path):
    engine, harness, recorder = _engine(tmp_path)
    try:
        report = run_self_check(engine, harness)
        assert report.model_type == "llama" and report.dtype == "float32" and report.rows == 6
        # every prompt position of 3 rows, 4 steps x (token + greedy + top-5) of 6 rows
        assert report.compared > 150
        assert report.max_distance <= report.max_tolerance < 1e-3
        # the probe LoRA moves the outputs far more than the tolerance: a missing or wrong LoRA cannot pass
        assert report.lora_effect > 100 * report.max_tolerance
        assert report.notes == []
        assert recorder.done == []  # the probe's requests are not reported as traffic
        for pid in PROBE_IDS:  # the probe adapters are gone afterwards
            with pytest.raises(AdapterNotFound):
                engine.submit([5, 6], pid, engine_params())
        stats = engine.stats()
        assert not set(PROBE_IDS) & set(stats.host_adapter_ids) and stats.slots_used == 0
        print(f"self-check on the default model: {report.seconds:.2f} s, {report.compared} log-probs, "
              f"max distance {report.max_distance:.2g} (tolerance {report.max_tolerance:.2g})")
    finally:
        engine.shutdown()


def engine_params():
    from app.engine import SamplingParams

    return SamplingParams(max_new_tokens=1)


def test_tiny_llama_passes(tiny):
    engine, harness, _ = tiny
    before = _prompt_logprobs(engine)
    report = run_self_check(engine, harness)
    assert _prompt_logprobs(engine) == before  # the check leaves the engine's path as it was, bit for bit
    assert report.model_type == "llama" and report.max_distance <= report.max_tolerance
    assert report.lora_effect > 10 * report.max_tolerance


def _prompt_logprobs(engine) -> list[float]:
    from app.engine import SamplingParams

    params = SamplingParams(max_new_tokens=2, prompt_logprobs=True)
    return list(engine.submit([5, 77, 120, 33, 9, 200], None, params).result(60).prompt_logprobs)


def test_nf4_passes_and_the_check_leaves_the_engine_untouched(tmp_path):
    """The reference shares the engine's tensors: building it must not change them. (PEFT's
    set_peft_model_state_dict calls state_dict(), which unpacks bitsandbytes' CPU-packed 4-bit weights in place:
    it moved this engine's log-probs by 5e-3 before the reference stopped using it.)"""
    engine, harness, _ = _engine(tmp_path, model=save_tiny_checkpoint(tmp_path / "base", seed=3), quantize="nf4",
                                 max_total_tokens=96, max_input_tokens=64, max_batch_tokens=128)
    try:
        before = _prompt_logprobs(engine)
        report = run_self_check(engine, harness)
        assert report.max_distance <= report.max_tolerance
        assert _prompt_logprobs(engine) == before  # bit for bit
    finally:
        engine.shutdown()


def test_the_window_of_the_config_is_found():
    from transformers import GPTNeoConfig, MistralConfig, Qwen2MoeConfig

    assert model_window(MistralConfig(sliding_window=64)) == 64
    assert model_window(GPTNeoConfig(window_size=256)) == 256
    assert model_window(Qwen2MoeConfig(sliding_window=0)) is None  # 0 means none there
    assert model_window(MistralConfig(sliding_window=None)) is None


def test_tolerance_follows_the_dtype():
    fp32, bf16 = tolerance(torch.float32, "none", 4, 20.0), tolerance(torch.bfloat16, "none", 4, 20.0)
    assert 1e-5 < fp32 < 1e-3 and 0.05 < bf16 < 1.0
    assert tolerance(torch.float32, "int8", 4, 20.0) == pytest.approx(bf16, rel=0.02)  # 1/127 ~ 2^-7


def test_a_scaled_attention_output_is_refused_naming_the_row_step_and_distance(tiny):
    """1 % more attention output in one layer (not the residual stream: the final norm would undo that)."""
    engine, harness, _ = tiny
    attention = _decoder_layers(engine)[1].self_attn

    def scale(module, args, output):  # the engine's path only: the reference is a hook-free copy of the tree
        return (output[0] * 1.01, *output[1:])

    handle = attention.register_forward_hook(scale)
    try:
        message = _refusal(engine, harness)
    finally:
        handle.remove()
    assert "model type 'llama'" in message and "probe row 'alone-short' (base, 3 prompt tokens)" in message
    assert "prefill position 1" in message and "against transformers" in message
    distance, tol = map(float, DISTANCE.search(message).groups())
    assert distance > tol > 0
    assert run_self_check(engine, harness).max_distance <= tol  # the hook removed, the engine passes again


def test_a_decode_only_fault_is_refused_at_a_decode_step(tiny):
    """A fault in the cached path only (query length 1), like a broken KV-cache update of one layer."""
    engine, harness, _ = tiny
    attention = _decoder_layers(engine)[0].self_attn

    def corrupt_decode(module, args, kwargs, output):
        hidden = output[0]
        if hidden.shape[1] != 1:
            return output
        return (hidden + 0.05 * hidden.abs().mean(), *output[1:])

    handle = attention.register_forward_hook(corrupt_decode, with_kwargs=True)
    try:
        message = _refusal(engine, harness)
    finally:
        handle.remove()
    assert re.search(r"probe row 'alone-short' \(base, 3 prompt tokens\) at decode step 1\b", message), message
    assert DISTANCE.search(message)


def test_a_dropped_lora_delta_is_refused_naming_the_probe_adapter(tiny):
    engine, harness, _ = tiny
    name = sorted(engine.parser.targets)[0]  # one LoRA-wrapped module of the engine
    wrapped = engine.model.get_submodule(name)
    handle = wrapped.register_forward_hook(lambda module, args, output: module.base_layer(args[0]))
    try:
        message = _refusal(engine, harness)
    finally:
        handle.remove()
    assert re.search(r"probe row '\S+' \(probe LoRA self-check:[ab], \d+ prompt tokens\)", message), message
    assert "against transformers + PEFT" in message and DISTANCE.search(message)


def test_an_exception_in_the_engine_path_is_refused(tiny):
    engine, harness, _ = tiny

    def boom(module, args, output):
        raise RuntimeError("broken layer")

    handle = _decoder_layers(engine)[1].mlp.register_forward_hook(boom)
    try:
        message = _refusal(engine, harness)
    finally:
        handle.remove()
    assert "model type 'llama'" in message and "raised in the engine" in message
    assert "StepFailed" in message or "EngineNotRunning" in message


# ---- the server ------------------------------------------------------------------------------------------------
@pytest.fixture()
def broken_engine_start(monkeypatch):
    """Every Engine started scales one attention output by 1.01 (the engine's path only)."""
    original = Engine.start

    def start(self):
        attention = _decoder_layers(self)[1].self_attn
        attention.register_forward_hook(lambda module, args, output: (output[0] * 1.01, *output[1:]))
        original(self)

    monkeypatch.setattr(Engine, "start", start)


def _settings(tmp_path, **values) -> Settings:
    base = save_tiny_checkpoint(tmp_path / "base", seed=4)
    return Settings(model=base, adapter_dir=tmp_path / "store", demo_adapters=False, max_total_tokens=96,
                    max_input_tokens=64, max_batch_tokens=128, **values)


def test_the_server_with_a_failing_check_never_becomes_ready(tmp_path, broken_engine_start):
    assert Settings().self_check == "on"  # on by default
    app = create_app(_settings(tmp_path))
    with pytest.raises(SelfCheckFailed, match=r"model type 'llama'.*prefill position 1.*distance"):
        with TestClient(app) as client:
            client.get("/ready")  # never reached: the lifespan refuses the start


def test_self_check_off_skips_it(tmp_path, broken_engine_start):
    app = create_app(_settings(tmp_path, self_check="off"))
    with TestClient(app) as client:
        assert client.get("/ready").status_code == 200  # the broken engine was not checked


def test_the_server_with_a_correct_engine_becomes_ready(tmp_path):
    with TestClient(create_app(_settings(tmp_path))) as client:
        assert client.get("/ready").status_code == 200
        assert client.post("/generate", json={"inputs": "ab", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_the_flag_and_the_environment(monkeypatch):
    assert settings_from_args(["--self-check", "off"])[0].self_check == "off"
    monkeypatch.setenv("OLORA_SELF_CHECK", "off")
    assert Settings().self_check == "off"
    assert settings_from_args(["--self-check", "on"])[0].self_check == "on"
