"""A decode/prefill step makes exactly one device->host transfer: the sampled tokens, logprobs, top-n and the
per-row finite flags come back together (sampling.choose_tokens). Counted, not timed: every Python-level host
read of a tensor (`item`, `tolist`, `cpu`, `numpy`, `bool`/`int`/`float`/`index` conversions) made on the engine
thread is recorded while real requests run through the engine loop."""
from __future__ import annotations

import threading
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import save_random_lora, save_tiny_checkpoint

from app.engine import Engine, EngineConfig
from app.engine.adapter_files import DirectoryAdapterSource
from app.engine.errors import NonFiniteLogits
from app.engine.sampling import SamplingParams

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
PARAMS = [
    SamplingParams(max_new_tokens=6, ignore_eos=True),  # batched greedy
    SamplingParams(max_new_tokens=6, do_sample=True, seed=1, top_k=5, top_p=0.9, temperature=0.8, ignore_eos=True),
    SamplingParams(max_new_tokens=6, top_n_tokens=3, repetition_penalty=1.3, frequency_penalty=0.5,
                   ignore_eos=True),
    SamplingParams(max_new_tokens=6, do_sample=True, seed=2, top_n_tokens=2, typical_p=0.9, ignore_eos=True),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("syncs")
    base = save_tiny_checkpoint(root / "base")
    save_random_lora(base, root / "adapters" / "a", r=4, seed=1)
    return base, root / "adapters"


class HostReadCounter:
    """Patches the host-read methods of torch.Tensor; counts the calls made on the engine thread by caller."""

    def __init__(self, monkeypatch):
        self.calls: Counter = Counter()
        self.lock = threading.Lock()
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            if threading.current_thread().name == "olora-engine":
                caller = traceback.extract_stack(limit=2)[0]
                with self.lock:
                    self.calls[f"{name} at {Path(caller.filename).name}:{caller.lineno}"] += 1
            return original(tensor, *args, **kwargs)
        return counted

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def run(engine: Engine, counter: HostReadCounter, adapters: list[str | None]) -> list:
    before, reads_before = engine.steps, counter.total
    handles = [engine.submit([5, 6, 7, 8 + i], adapter, PARAMS[i % len(PARAMS)]) for i, adapter in enumerate(adapters)]
    outcomes = []
    for handle in handles:
        try:
            outcomes.append(handle.result(timeout=60).token_ids)
        except NonFiniteLogits:
            outcomes.append("non-finite")
    return outcomes, engine.steps - before, counter.total - reads_before


def test_one_host_transfer_per_step(files, monkeypatch):
    base, adapters = files
    engine = Engine(EngineConfig(model=str(base), max_batch_size=8, max_input_tokens=32, max_total_tokens=64,
                                 max_loras=2, max_rank=8), DirectoryAdapterSource(adapters))
    engine.start()
    try:
        engine.submit([1, 2], "a", SamplingParams(max_new_tokens=1)).result(timeout=60)  # adapter in a slot
        counter = HostReadCounter(monkeypatch)
        outcomes, steps, reads = run(engine, counter, [None, "a", None, "a", "a", None, None, "a"])
        assert all(len(o) == 6 for o in outcomes) and steps >= 6
        assert reads == steps, f"{reads} host reads in {steps} steps: {dict(counter.calls)}"
        assert set(counter.calls) == {next(iter(counter.calls))}, "all of them at the one transfer"

        # a row whose logits turn NaN ends alone, and its step still makes one transfer
        real_decode = engine.runner.decode
        poisoned = {"done": False}

        def decode(tokens, positions, slots):
            logits = real_decode(tokens, positions, slots)  # (B, V)
            if not poisoned["done"] and logits.shape[0] == 4:
                logits[2] = float("nan")
                poisoned["done"] = True
            return logits

        monkeypatch.setattr(engine.runner, "decode", decode)
        outcomes, steps, reads = run(engine, counter, [None, "a", None, "a"])
        assert poisoned["done"] and outcomes.count("non-finite") == 1 and outcomes[2] == "non-finite"
        assert reads == steps, f"{reads} host reads in {steps} steps: {dict(counter.calls)}"
    finally:
        engine.shutdown()
