"""Engine fault isolation: nothing one request carries stops the loop for the others.

Hostile sampling parameters decode (greedy below the temperature floor) or are refused; rows whose logits turn
non-finite end alone; an exception in a step fails that step's rows and the loop goes on; only a fault that
persists over several steps kills the loop, and then `stats().alive` (what /health and /ready report) says so.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from app.engine import Engine, EngineConfig
from app.engine.faults import LOGIT_BOUND
from app.engine.adapter_files import DirectoryAdapterSource
from app.engine.errors import (AdapterRejected, EngineNotRunning, InvalidRequest, NonFiniteLogits, StepFailed)
from app.engine.sampling import RowSampler, SamplingParams, choose_tokens
from helpers import overflow_at_run_time, save_random_lora, save_tiny_checkpoint

PROMPT = "Return the number of"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return Path(save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny", seed=0))


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory) -> Path:
    """`good`: a normal random LoRA; `huge`: the same with weights so large the activations overflow (the parser's
    magnitude check refuses it); `hot`: a valid adapter that helpers.overflow_at_run_time makes overflow after the check."""
    root = tmp_path_factory.mktemp("adapters")
    save_random_lora(base_dir, root / "good", r=4, seed=1, task_type="CAUSAL_LM")
    save_random_lora(base_dir, root / "hot", r=4, seed=3, task_type="CAUSAL_LM")
    huge = Path(save_random_lora(base_dir, root / "huge", r=4, seed=2, task_type="CAUSAL_LM"))
    weights = huge / "adapter_model.safetensors"
    save_file({k: v * 1e25 for k, v in load_file(str(weights)).items()}, str(weights))  # finite in fp32
    return root


@pytest.fixture()
def engine(base_dir, adapters):
    engine = Engine(EngineConfig(model=str(base_dir), max_batch_size=4, max_input_tokens=64, max_total_tokens=128,
                                 max_loras=2, max_rank=16), DirectoryAdapterSource(adapters))
    engine.start()
    yield engine
    engine.shutdown()


def _greedy(engine, adapter_id=None, n=8) -> list[int]:
    ids = engine.tokenizer(PROMPT)["input_ids"]
    return engine.submit(ids, adapter_id, SamplingParams(max_new_tokens=n, ignore_eos=True)).result(60).token_ids


HOSTILE = [
    dict(do_sample=True, temperature=1e-45),
    dict(do_sample=True, temperature=1e-38),
    dict(do_sample=True, temperature=5e-324),
    dict(do_sample=True, top_p=1e-300),
    dict(do_sample=True, top_p=5e-324, top_k=1),
    dict(do_sample=True, repetition_penalty=1e-45),
    dict(do_sample=True, repetition_penalty=1e300),
    dict(do_sample=True, temperature=1e300),
    dict(do_sample=True, temperature=float("inf")),
    dict(do_sample=True, temperature=float("nan")),
]


@pytest.mark.parametrize("params", HOSTILE, ids=[str(p) for p in HOSTILE])
def test_hostile_sampling_parameters_decode_or_are_refused_and_the_engine_lives(engine, params):
    reference = _greedy(engine)
    ids = engine.tokenizer(PROMPT)["input_ids"]
    try:
        sampling = SamplingParams(max_new_tokens=6, ignore_eos=True, seed=3, **params)
    except InvalidRequest as exc:
        assert "invalid sampling parameter" in str(exc)
    else:
        # submitted next to a normal request: both finish, the hostile one with real tokens and finite logprobs
        hostile = engine.submit(ids, None, sampling)
        normal = engine.submit(ids, None, SamplingParams(max_new_tokens=8, ignore_eos=True))
        out = hostile.result(60)
        assert len(out.token_ids) == 6 and all(math.isfinite(lp) for lp in out.logprobs)
        if params.get("temperature", 1.0) < 1e-5 or params.get("top_p", 1.0) < 1e-8:
            assert out.token_ids == reference[:6]  # below the floors: greedy
        assert normal.result(60).token_ids == reference
    assert engine.stats().alive and _greedy(engine) == reference


def test_non_finite_logits_end_that_request_only(engine, monkeypatch):
    overflow_at_run_time(monkeypatch, "hot")
    reference = _greedy(engine, "good")
    ids = engine.tokenizer(PROMPT)["input_ids"]
    others = [engine.submit(ids, "good", SamplingParams(max_new_tokens=8, ignore_eos=True)) for _ in range(2)]
    for sampled in (False, True):
        hot = engine.submit(ids, "hot", SamplingParams(max_new_tokens=8, do_sample=sampled, seed=1))
        with pytest.raises(NonFiniteLogits, match="not finite.*'hot'"):
            hot.result(60)
    assert [h.result(60).token_ids for h in others] == [reference, reference]
    assert engine.stats().alive and _greedy(engine, "good") == reference


def test_an_adapter_that_overflows_on_any_input_is_refused_at_load(engine):
    ids = engine.tokenizer(PROMPT)["input_ids"]
    with pytest.raises(AdapterRejected, match="huge"):
        engine.submit(ids, "huge", SamplingParams(max_new_tokens=4)).result(60)
    assert engine.stats().alive


def test_injected_nan_row_fails_alone(engine, monkeypatch):
    """The mechanism without depending on how an adapter overflows: NaN in one row of a batched decode."""
    reference = _greedy(engine)
    real_decode = engine.runner.decode
    poisoned = {"row": None}

    def decode(tokens, positions, slots):
        logits = real_decode(tokens, positions, slots)  # (B, V)
        if poisoned["row"] is not None and logits.shape[0] > poisoned["row"]:
            logits[poisoned["row"]] = float("nan")
            poisoned["row"] = None
        return logits

    monkeypatch.setattr(engine.runner, "decode", decode)
    ids = engine.tokenizer(PROMPT)["input_ids"]
    poisoned["row"] = 1  # the first decode of two rows or more: exactly one row of the three is poisoned
    handles = [engine.submit(ids, None, SamplingParams(max_new_tokens=8, ignore_eos=True)) for _ in range(3)]
    outcomes = []
    for handle in handles:
        try:
            outcomes.append(handle.result(60).token_ids)
        except NonFiniteLogits:
            outcomes.append("nan")
    assert poisoned["row"] is None, "no decode of two rows ran: the poison was never applied"
    assert outcomes.count("nan") == 1 and outcomes.count(reference) == 2, outcomes
    assert engine.stats().alive


def test_a_step_exception_fails_its_rows_and_the_loop_goes_on(engine, monkeypatch):
    reference = _greedy(engine)
    real_prefill = engine.runner.prefill
    calls = {"n": 0}

    def flaky_prefill(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return real_prefill(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "prefill", flaky_prefill)
    ids = engine.tokenizer(PROMPT)["input_ids"]
    with pytest.raises(StepFailed, match="the server goes on"):
        engine.submit(ids, None, SamplingParams(max_new_tokens=4)).result(60)
    assert engine.stats().alive
    assert _greedy(engine) == reference


def test_a_persistent_fault_kills_the_loop_and_says_so(base_dir, adapters, monkeypatch, capfd):
    engine = Engine(EngineConfig(model=str(base_dir), max_batch_size=1, max_input_tokens=64, max_total_tokens=128,
                                 max_loras=2, max_rank=16), DirectoryAdapterSource(adapters))

    def broken_prefill(*args, **kwargs):
        raise RuntimeError("simulated device loss")

    monkeypatch.setattr(engine.runner, "prefill", broken_prefill)
    engine.start()
    try:
        ids = engine.tokenizer(PROMPT)["input_ids"]
        handles = [engine.submit(ids, None, SamplingParams(max_new_tokens=4)) for _ in range(4)]
        errors = []
        for handle in handles:  # none hangs
            with pytest.raises((StepFailed, EngineNotRunning)) as info:
                handle.result(timeout=60)
            errors.append(type(info.value))
        assert errors[:2] == [StepFailed, StepFailed] and errors[-1] is EngineNotRunning
        assert not engine.stats().alive
        with pytest.raises(EngineNotRunning):
            engine.submit(ids, None, SamplingParams(max_new_tokens=4))
    finally:
        engine.shutdown()
    assert "the engine loop died" in capfd.readouterr().err


finite_or_not = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10, 10)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(temperature=finite_or_not, top_p=finite_or_not, top_k=st.integers(-2, 300),
       repetition_penalty=finite_or_not, seed=st.integers(-1, 2**64), do_sample=st.booleans(),
       typical_p=finite_or_not, frequency_penalty=finite_or_not, top_n=st.integers(-1, 25),
       scale=st.sampled_from([1.0, 1e-30, 30.0, 1e4, LOGIT_BOUND]))
def test_sampling_parameters_property(temperature, top_p, top_k, repetition_penalty, seed, do_sample, typical_p,
                                      frequency_penalty, top_n, scale):
    """Any parameters either are refused with InvalidRequest, or give a valid token for any finite logits."""
    try:
        params = SamplingParams(max_new_tokens=1, do_sample=do_sample, temperature=temperature, top_p=top_p,
                                top_k=top_k, repetition_penalty=repetition_penalty, seed=seed, typical_p=typical_p,
                                frequency_penalty=frequency_penalty, top_n_tokens=top_n)
    except InvalidRequest:
        return
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((2, 50), generator=gen)  # (B, V)
    logits = logits / logits.abs().amax() * scale  # the largest logit the engine lets through is LOGIT_BOUND
    history = torch.tensor([[1, 2, 3, 4]])  # (1, n)
    samplers = [RowSampler(params, torch.device("cpu")), RowSampler(SamplingParams(), torch.device("cpu"))]
    choices = choose_tokens(logits, samplers, [history, None])
    tokens, logprobs = choices.tokens, choices.logprobs
    assert choices.faults == [None, None]
    assert all(0 <= t < 50 for t in tokens) and all(math.isfinite(lp) for lp in logprobs)
    assert tokens[1] == int(torch.argmax(logits[1]))
