"""Per-row LoRA buffers sized by rank bucket: 64 rows of rank-16 adapters keep the row-aligned fast path under a
`max_rank` whose full-rank copies would not fit, exactly equal to the reference kernel and to PEFT per row."""
from __future__ import annotations

import pytest
import torch
from helpers import save_adapter_set
from test_engine_rank import ADAPTERS, BATCHES, MAX_RANK, PROMPTS, make_engine, peft_row_logits, run_rows
from transformers import BitsAndBytesConfig

import app.engine.lora_layers as lora_layers
from app.engine.lora_layers import choose_row_rank
from tolerances import ENGINE_VS_PEFT_LOGITS, SAME_MODEL_LOGITS, nf4_logits


QUANT = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
         "int8": dict(load_in_8bit=True)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return save_adapter_set(tmp_path_factory.mktemp("rowbuf"), ADAPTERS)


def test_choose_row_rank_takes_the_largest_bucket_that_fits():
    # churn_bench's model: 8 layers, hidden 512, MLP 1376, every Linear of the blocks served, fp32
    per_rank_row = 4 * 8 * (4 * (512 + 512) + 3 * (512 + 1376))
    budget = lora_layers.ROW_BUFFER_BUDGET
    assert 64 * 64 * per_rank_row > budget, "full-rank copies for 64 rows do not fit (the old BGMV fallback)"
    assert choose_row_rank(64, 64, per_rank_row, budget) == 16
    assert choose_row_rank(16, 64, per_rank_row, budget) == 64
    assert choose_row_rank(32, 64, per_rank_row, budget) == 32
    assert choose_row_rank(64, 64, per_rank_row, 64 * 8 * per_rank_row - 1) == 0  # not even rank 8: no buffers
    assert choose_row_rank(4, 12, 100, 4 * 12 * 100) == 12 and choose_row_rank(4, 12, 100, 4 * 11 * 100) == 8
    assert choose_row_rank(0, 64, per_rank_row, budget) == 0


def engine_with_row_rank(monkeypatch, base, adapters, row_rank: int, **kw):
    """An `auto` engine whose row buffers hold exactly `row_rank` columns (budget set to what that takes)."""
    probe = make_engine(base, adapters, "rows", **kw)
    per_rank_row = sum(layer.lora_A.element_size() * (layer.in_features + layer.out_features)
                       for layer in probe.bank.layers.values())
    monkeypatch.setattr(lora_layers, "ROW_BUFFER_BUDGET", probe.config.max_batch_size * row_rank * per_rank_row)
    engine = make_engine(base, adapters, "auto", **kw)
    assert engine.bank.row_buffer_rank == row_rank
    assert all(layer.row_A.shape[1] == row_rank == layer.row_B.shape[2] for layer in engine.bank.layers.values())
    return engine


def run(engine, adapters, row_adapters, steps=3):
    """test_engine_rank.run_rows (prefill + greedy decode, one adapter per row), also recording the kernel mode of
    every forward. Returns (per-row logits (1 + steps, V), sequences, modes)."""
    modes, prepare = [], engine.bank.prepare

    def spy(row_start, row_slots):
        plan = prepare(row_start, row_slots)
        modes.append(plan.kernel.name)
        return plan

    engine.bank.prepare = spy
    logits, seqs, _ = run_rows(engine, adapters, row_adapters, steps)
    return logits, seqs, modes


@pytest.mark.parametrize("quantize", ["none", "nf4", "int8"])
@pytest.mark.parametrize("batch,mode", [("mixed 2..12", "rows"), ("all four", "bgmv")])
def test_rank16_row_buffers_equal_reference(monkeypatch, files, quantize, batch, mode):
    """Row buffers of rank 16 under max_rank 64: a batch of bucket 16 uses them, one of bucket 32 falls back to
    BGMV for that forward; both give the reference kernel's logits (fp32, nf4, int8 bases)."""
    base, adapters = files
    rows, bucket = BATCHES[batch]
    fast = engine_with_row_rank(monkeypatch, base, adapters, 16, quantize=quantize)
    ours, seqs, modes = run(fast, adapters, rows)
    ref, ref_seqs, _ = run(make_engine(base, adapters, "reference", quantize=quantize), adapters, rows)
    assert set(modes) == {mode}, f"bucket {bucket} with rank-16 row buffers ran {modes}"
    assert seqs == ref_seqs
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, atol=SAME_MODEL_LOGITS, rtol=0)


@pytest.mark.numeric  # .ci/run repeats it under ATEN_CPU_CAPABILITY=default
@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_rank16_row_buffers_match_peft_per_row(monkeypatch, files, quantize):
    base, adapters = files
    rows, _ = BATCHES["mixed 2..12"]
    ours, seqs, modes = run(engine_with_row_rank(monkeypatch, base, adapters, 16, quantize=quantize), adapters, rows)
    assert set(modes) == {"rows"}
    qc = BitsAndBytesConfig(**QUANT[quantize]) if quantize != "none" else None
    for b, (name, seq) in enumerate(zip(rows, seqs)):
        theirs = peft_row_logits(base, adapters, name, seq, len(PROMPTS[b]), 3, qc)
        assert (ours[b] - theirs).abs().max().item() <= (nf4_logits() if quantize == "nf4" else ENGINE_VS_PEFT_LOGITS), f"row {b} ({name}, {quantize})"


def test_rows_rebound_across_the_fallback_stay_exact(monkeypatch, files):
    """Rows bound at bucket 16, then a forward at bucket 32 (BGMV, no binding), then back at 16 with rows that
    changed slots in between: the row buffers must follow (no stale weights from before the fallback)."""
    base, adapters = files
    fast = engine_with_row_rank(monkeypatch, base, adapters, 16)
    ref = make_engine(base, adapters, "reference")
    names = sorted(ADAPTERS)  # r12, r2, r24, r8-pattern
    for engine in (fast, ref):
        for i, name in enumerate(names):
            engine.bank.load(i + 1, engine.parser.parse(adapters / name))
    for slots, mode in (([1, 2, 4], "rows"), ([3, 1, 2], "bgmv"), ([2, 4, 1], "rows"), ([4, 4, 2], "rows")):
        ours = fast.runner.prefill(0, PROMPTS[:3], slots)
        assert fast.runner.context.batch is None  # cleared after the forward
        theirs = ref.runner.prefill(0, PROMPTS[:3], slots)
        torch.testing.assert_close(ours, theirs, atol=SAME_MODEL_LOGITS, rtol=0)
        assert fast.bank.prepare(0, slots).kernel.name == mode
    assert MAX_RANK == 64 and fast.bank.max_rank == 64
