"""The row KV cache grows with the real lengths (doubling) and gives the same tokens as a full-size one."""
from __future__ import annotations

import pytest
from helpers import save_adapter_set

from app.engine import kv_cache
from app.engine.adapter_files import DirectoryAdapterSource
from app.engine.architecture import KVLayout
from app.engine.engine import Engine, EngineConfig
from app.engine.forward_batch import ForwardContext
from app.engine.sampling import SamplingParams

PROMPTS = [[5, 9, 200, 31, 7, 7, 42], [100, 3], [17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27], [64, 65, 66, 67]]
ROWS = ["a", None, "b", "a"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return save_adapter_set(tmp_path_factory.mktemp("kv"), {"a": dict(r=4, seed=1),
                                                            "b": dict(r=8, targets=("k_proj", "o_proj"), seed=2)})


def generate(files, initial_tokens: int, monkeypatch) -> tuple[list[list[int]], list[int]]:
    base, adapters = files
    monkeypatch.setattr(kv_cache, "INITIAL_TOKENS", initial_tokens)
    engine = Engine(EngineConfig(model=base, dtype="fp32", device="cpu", max_loras=2, max_rank=8, max_batch_size=4,
                                 max_input_tokens=16, max_total_tokens=48, max_batch_tokens=64),
                    DirectoryAdapterSource(adapters))
    capacities = [engine.runner.kv.capacity]
    engine.observer.inner = type("Cap", (), {"on_step": lambda self, *a: capacities.append(engine.runner.kv.capacity)})()
    engine.start()
    try:
        handles = [engine.submit(p, a, SamplingParams(max_new_tokens=30, ignore_eos=True)) for p, a in zip(PROMPTS, ROWS)]
        tokens = [h.result(timeout=120).token_ids for h in handles]
    finally:
        engine.shutdown()
    return tokens, capacities


def test_kv_cache_grows_and_stays_exact(files, monkeypatch):
    full, full_caps = generate(files, 1024, monkeypatch)
    grown, caps = generate(files, 4, monkeypatch)
    assert set(full_caps) == {48}, "a start capacity above max_total_tokens is capped"
    assert caps[0] == 4 and caps == sorted(caps) and caps[-1] == 48 and len(set(caps)) >= 4  # 4 -> 8 -> ... -> 48
    assert grown == full


def test_kv_reserve_limits():
    cpu = kv_cache.torch.device("cpu")
    cache = kv_cache.RowKVCache(2, 3, KVLayout(heads=1, key_dim=4, value_dim=4), 40, dtype=kv_cache.torch.float32,
                                device=cpu, context=ForwardContext(cpu))
    assert cache.capacity == 40 and cache.nbytes == 2 * 2 * 3 * 40 * 4 * 4
    with pytest.raises(ValueError):
        cache.reserve(41)
