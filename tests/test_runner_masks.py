"""Attention without an additive mask when the batch needs none (SDPA applies the causal rule itself): same logits."""
from __future__ import annotations

import pytest
import torch
from helpers import save_adapter_set

from app.engine.adapter_files import DirectoryAdapterSource
from app.engine.engine import Engine, EngineConfig
from tolerances import SAME_MODEL_LOGITS

# numeric equivalence: .ci/run runs these a second time under ATEN_CPU_CAPABILITY=default
pytestmark = pytest.mark.numeric

EQUAL = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [1, 2, 3, 4, 5]]
UNEQUAL = [[5, 6, 7, 8, 9], [10, 11], [1, 2, 3]]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    base, adapters = save_adapter_set(tmp_path_factory.mktemp("masks"), {"a": dict(r=4, seed=3)})
    eng = Engine(EngineConfig(model=base, dtype="fp32", device="cpu", max_loras=1, max_rank=8, max_batch_size=4,
                              max_input_tokens=16, max_total_tokens=48, max_batch_tokens=64),
                 DirectoryAdapterSource(adapters))
    eng.bank.load(1, eng.parser.parse(adapters / "a"))
    return eng


def run(engine, prompts, mask_free: bool, monkeypatch) -> tuple[torch.Tensor, list]:
    """Prefill + 3 decode steps (rows stay at their own positions); returns logits and SDPA's attn_mask args."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attn_mask"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(engine.runner, "mask_free", mask_free)
    slots = [1, 0, 1]
    out = [engine.runner.prefill(0, prompts, slots)]
    positions = [len(p) for p in prompts]
    for step in range(3):
        out.append(engine.runner.decode([3, 4, 5], [p + step for p in positions], slots))
    monkeypatch.undo()
    return torch.cat(out), seen


def test_equal_lengths_run_without_mask_and_match(engine, monkeypatch):
    assert engine.model.config._attn_implementation == "sdpa" and engine.runner.mask_free
    fast, seen = run(engine, EQUAL, True, monkeypatch)
    masked, seen_masked = run(engine, EQUAL, False, monkeypatch)
    assert seen and all(m is None for m in seen), "no additive mask reaches SDPA"
    assert all(m is not None for m in seen_masked)
    torch.testing.assert_close(fast, masked, atol=SAME_MODEL_LOGITS, rtol=0)


def test_unequal_lengths_keep_the_mask(engine, monkeypatch):
    _, seen = run(engine, UNEQUAL, True, monkeypatch)
    assert seen and all(m is not None for m in seen)
