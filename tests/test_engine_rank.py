"""LoRA computed at the batch's rank (slices of zero-padded slots) and the default number of device slots."""
from __future__ import annotations

import logging

import pytest
import torch
from helpers import save_adapter_set
from peft import PeftModel
from transformers import AutoModelForCausalLM

from app.engine.adapter_files import DirectoryAdapterSource
from app.engine.engine import Engine, EngineConfig
from app.engine.slot_budget import SLOT_MEMORY_FRACTION, choose_max_loras, slot_bytes
from app.engine.lora_layers import rank_bucket
from tolerances import ENGINE_VS_PEFT_LOGITS, SAME_MODEL_LOGITS

# numeric equivalence: .ci/run runs these a second time under ATEN_CPU_CAPABILITY=default
pytestmark = pytest.mark.numeric

MAX_RANK = 64
ADAPTERS = {  # ranks 2..24 under max_rank 64: buckets 8, 16 and 32
    "r2": dict(r=2, targets=("q_proj", "v_proj"), seed=11),
    "r8-pattern": dict(r=8, targets=("q_proj", "k_proj", "o_proj", "down_proj"), seed=12,
                       rank_pattern={"layers.0.self_attn.o_proj": 3}),
    "r12": dict(r=12, targets=("v_proj", "up_proj", "gate_proj"), seed=13),
    "r24": dict(r=24, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=14),
}
PROMPTS = [[5, 9, 200, 31, 7], [100, 3, 4], [17, 18, 19, 20, 21, 22], [64, 65], [1, 2, 3, 4]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return save_adapter_set(tmp_path_factory.mktemp("rank"), ADAPTERS)


def make_engine(base, adapters, kernel: str, **kw) -> Engine:
    cfg = dict(model=base, dtype="fp32", device="cpu", max_loras=4, max_rank=MAX_RANK, max_batch_size=8,
               max_input_tokens=32, max_total_tokens=64, max_batch_tokens=256, kernel=kernel)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg), DirectoryAdapterSource(adapters))


def test_rank_bucket():
    assert [rank_bucket(r, 64) for r in (1, 8, 9, 16, 17, 33, 64)] == [8, 8, 16, 16, 32, 64, 64]
    assert rank_bucket(12, 12) == 12 and rank_bucket(3, 4) == 4


def run_rows(engine: Engine, adapters, row_adapters: list[str | None], steps: int = 2):
    """Load every adapter, prefill PROMPTS with one adapter per row, decode `steps` greedy tokens; records the
    rank each forward computed at. Returns (per-row logits (1 + steps, V), sequences, ranks seen)."""
    slots = {}
    for i, name in enumerate(sorted(ADAPTERS)):
        engine.bank.load(i + 1, engine.parser.parse(adapters / name))
        slots[name] = i + 1
    ranks = []
    prepare = engine.bank.prepare

    def spy(row_start, row_slots):
        plan = prepare(row_start, row_slots)
        ranks.append(plan.rank)
        return plan

    engine.bank.prepare = spy
    row_slots = [slots[a] if a else 0 for a in row_adapters]
    prompts = PROMPTS[:len(row_adapters)]
    logits = [engine.runner.prefill(0, prompts, row_slots)]
    seqs = [list(p) + [int(t)] for p, t in zip(prompts, logits[-1].argmax(-1))]
    for _ in range(steps):
        logits.append(engine.runner.decode([s[-1] for s in seqs], [len(s) - 1 for s in seqs], row_slots))
        for s, t in zip(seqs, logits[-1].argmax(-1).tolist()):
            s.append(t)
    return [torch.stack([step[b] for step in logits]) for b in range(len(prompts))], seqs, ranks


BATCHES = {  # rows -> the rank every fast forward must compute at (bucket of the largest rank present)
    "low ranks only": (["r2", None, "r8-pattern", "r2"], 8),
    "mixed 2..12": (["r12", "r2", None, "r8-pattern", "r12"], 16),
    "all four": (["r24", "r2", "r12", "r8-pattern", None], 32),
}


@pytest.mark.parametrize("kernel", ["rows", "bgmv", "grouped", "auto"])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_rank_sliced_kernels_equal_full_rank_reference(files, kernel, batch):
    base, adapters = files
    rows, expected_rank = BATCHES[batch]
    ref, ref_seqs, ref_ranks = run_rows(make_engine(base, adapters, "reference"), adapters, rows)
    fast, seqs, ranks = run_rows(make_engine(base, adapters, kernel), adapters, rows)
    assert set(ref_ranks) == {MAX_RANK}, "the reference reads the whole padded slot"
    assert set(ranks) == {expected_rank}, f"{kernel}: computed at ranks {ranks}, expected {expected_rank}"
    assert seqs == ref_seqs
    for r, f in zip(ref, fast):
        torch.testing.assert_close(f, r, atol=SAME_MODEL_LOGITS, rtol=0)


def test_rank_sliced_batch_matches_peft_per_row(files):
    base, adapters = files
    rows, _ = BATCHES["all four"]
    ours, seqs, _ = run_rows(make_engine(base, adapters, "auto"), adapters, rows, steps=3)
    for b, (name, seq) in enumerate(zip(rows, seqs)):
        theirs = peft_row_logits(base, adapters, name, seq, len(PROMPTS[b]), 3)
        assert (ours[b] - theirs).abs().max().item() <= ENGINE_VS_PEFT_LOGITS, f"row {b} ({name})"


def peft_row_logits(base, adapters, name: str | None, seq: list[int], prompt_len: int, steps: int,
                    quantization_config=None) -> torch.Tensor:
    """PEFT alone on one row's tokens: the logits (1 + steps, V) at the positions the engine predicted."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=quantization_config,
                                                 device_map="cpu").eval()
    if name is not None:
        model = PeftModel.from_pretrained(model, str(adapters / name)).eval()
    with torch.no_grad():
        full = model(torch.tensor([seq[:-1]])).logits[0]  # (len - 1, V)
    return full[prompt_len - 1:prompt_len + steps]


def test_lower_rank_reload_leaves_no_stale_columns(files):
    """A slot that held rank 24 and now holds rank 2 is computed at bucket 8: the old columns 2..23 must be zero."""
    base, adapters = files
    fast, ref = make_engine(base, adapters, "rows"), make_engine(base, adapters, "reference")
    for engine in (fast, ref):
        engine.bank.load(1, engine.parser.parse(adapters / "r24"))
        engine.runner.prefill(0, PROMPTS[:2], [1, 1])  # binds rows 0 and 1 to the rank-24 weights
        engine.bank.load(1, engine.parser.parse(adapters / "r2"))
    assert fast.bank.slot_rank[1] == 2
    ours = fast.runner.prefill(0, PROMPTS[:2], [1, 0])
    theirs = ref.runner.prefill(0, PROMPTS[:2], [1, 0])
    assert fast.runner.context.batch is None  # cleared after the forward
    torch.testing.assert_close(ours, theirs, atol=SAME_MODEL_LOGITS, rtol=0)


def test_choose_max_loras():
    one = 20 << 20
    assert choose_max_loras(5, 16, one, 1 << 40).max_loras == 5  # the user's value is kept
    auto = choose_max_loras(0, 16, one, 16 << 30)
    assert auto.max_loras == 16 and "max_batch_size" in auto.reason
    small = choose_max_loras(0, 16, one, 1 << 30)  # 10% of 1 GiB = 5 slots of 20 MiB
    assert small.max_loras == int(SLOT_MEMORY_FRACTION * (1 << 30)) // one == 5 and "holds only 5" in small.reason
    assert choose_max_loras(0, 16, 1 << 40, 1 << 30).max_loras == 1  # always at least one slot
    # from memory, not from the batch: as many slots as host-memory adapters where they fit (no thrash with
    # 32 adapters in rotation over 16 rows), the memory bound still applies
    assert choose_max_loras(0, 16, one, 16 << 30, max_cpu_adapters=64).max_loras == 64
    assert choose_max_loras(0, 16, one, 16 << 30, max_cpu_adapters=4).max_loras == 16  # never below the rows
    assert choose_max_loras(0, 16, one, 8 << 30, max_cpu_adapters=64).max_loras == int(0.1 * (8 << 30)) // one
    assert slot_bytes({"a": (512, 512), "b": (512, 1376)}, 64, torch.float32) == 64 * 4 * (1024 + 1888)


def test_engine_default_slots_cover_the_batch_and_the_host_tier(files, caplog):
    base, adapters = files
    with caplog.at_level(logging.INFO, logger="olora.engine"):
        engine = make_engine(base, adapters, "auto", max_loras=0, max_batch_size=6, max_cpu_adapters=9)
    assert engine.config.max_loras == engine.bank.n_slots == 9
    assert engine.stats().max_loras == 9
    assert any("max_loras=9 (auto" in r.getMessage() for r in caplog.records)
    assert make_engine(base, adapters, "auto", max_loras=0, max_batch_size=6, max_cpu_adapters=2).bank.n_slots == 6
    assert EngineConfig().max_loras == 0, "the default is the automatic choice"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_side_stream_slot_loads_give_the_cpu_tokens(files):
    """Slot loads on CUDA go through a side stream + event: every request still sees its own adapter."""
    from app.engine.sampling import SamplingParams

    base, adapters = files
    rows, _ = BATCHES["all four"]
    tokens = {}
    for device in ("cpu", "cuda"):
        engine = make_engine(base, adapters, "auto", device=device, max_loras=2)  # 4 adapters, 2 slots: reloads
        engine.start()
        try:
            handles = [engine.submit(p, a, SamplingParams(max_new_tokens=6, ignore_eos=True))
                       for p, a in zip(PROMPTS * 2, rows * 2)]
            tokens[device] = [h.result(timeout=120).token_ids for h in handles]
        finally:
            engine.shutdown()
    assert tokens["cuda"] == tokens["cpu"]


def test_row_rebound_to_a_lower_rank_clears_the_old_columns(files):
    """Row buffers copy only the slot's rank: a row that held rank 24 and now holds rank 2, in a batch computed at
    bucket 32 (another row has rank 24), must not keep columns 2..23 of the old adapter."""
    base, adapters = files
    fast, ref = make_engine(base, adapters, "rows"), make_engine(base, adapters, "reference")
    for engine in (fast, ref):
        engine.bank.load(1, engine.parser.parse(adapters / "r24"))
        engine.bank.load(2, engine.parser.parse(adapters / "r2"))
    for slots in ([1, 1, 0], [2, 1, 2], [1, 2, 1], [2, 2, 2]):  # rows change slots between forwards
        ours = fast.runner.prefill(0, PROMPTS[:3], slots)
        theirs = ref.runner.prefill(0, PROMPTS[:3], slots)
        torch.testing.assert_close(ours, theirs, atol=SAME_MODEL_LOGITS, rtol=0)
    assert fast.bank.row_rank[:3] == [2, 2, 2]
