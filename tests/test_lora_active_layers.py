"""Modules that no adapter of a forward targets skip their LoRA delta (slots on every Linear, adapters on q,v):
exactly the same logits as computing the zero deltas, for every kernel."""
from __future__ import annotations

import pytest
import torch
from helpers import save_random_lora, save_tiny_checkpoint

from app.engine import DirectoryAdapterSource, Engine, EngineConfig


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("active")
    base = save_tiny_checkpoint(root / "base")
    save_random_lora(base, root / "adapters" / "qv", r=4, targets=("q_proj", "v_proj"), seed=1)
    save_random_lora(base, root / "adapters" / "mlp", r=4, targets=("up_proj",), seed=2)
    return base, root / "adapters"


PROMPTS = [[5, 9, 200, 31, 7, 8], [100, 3, 44, 12, 13, 14]]


@pytest.mark.parametrize("kernel", ["rows", "bgmv", "grouped", "reference"])
def test_untargeted_modules_skip_their_delta_exactly(files, kernel):
    base, adapters = files
    engine = Engine(EngineConfig(model=base, dtype="fp32", device="cpu", max_loras=2, max_rank=8, max_batch_size=2,
                                 max_input_tokens=16, max_total_tokens=32, max_batch_tokens=64, kernel=kernel),
                    DirectoryAdapterSource(adapters))  # target_modules None: slots on every Linear of the blocks
    engine.bank.load(1, engine.parser.parse(adapters / "qv"))
    engine.bank.load(2, engine.parser.parse(adapters / "mlp"))
    def active_kinds(slots):
        plan = engine.bank.prepare(0, slots)
        return {name.rsplit(".", 1)[-1] for name, layer in engine.bank.layers.items() if layer.index not in plan.skip}

    assert active_kinds([1, 0]) == {"q_proj", "v_proj"}
    assert active_kinds([1, 2]) == {"q_proj", "v_proj", "up_proj"}

    skipped = engine.runner.prefill(0, PROMPTS, [1, 0])  # (2, V)
    # force every module to compute its (zero) delta
    engine.bank._inactive_layers = lambda distinct: frozenset()  # noqa: SLF001
    assert active_kinds([1, 0]) == {name.rsplit(".", 1)[-1] for name in engine.bank.layers}
    computed = engine.runner.prefill(0, PROMPTS, [1, 0])
    assert torch.equal(skipped, computed), "adding exact zero deltas changes nothing, so skipping them must not"
    base_only = engine.runner.prefill(0, PROMPTS, [0, 0])
    assert not torch.equal(skipped[0], base_only[0]) and torch.equal(skipped[1], base_only[1])
