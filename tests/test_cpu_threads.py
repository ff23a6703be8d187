"""The engine's intra-op thread count (app/engine/cpu_threads.py): chosen from the usable CPUs, applied in the
engine's loop thread, and without effect on what the forwards compute beyond fp32 reordering."""
from __future__ import annotations

import os

import pytest
import torch
from helpers import save_random_lora, save_tiny_checkpoint
from tolerances import SAME_MODEL_LOGITS

from app.engine import DirectoryAdapterSource, Engine, EngineConfig, InvalidRequest, SamplingParams
from app.engine.cpu_threads import choose_cpu_threads

pytestmark = pytest.mark.numeric  # outputs compared across thread counts (fp32 reordering: tests/tolerances.py)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cpus, expected", [(1, 1), (2, 1), (4, 3), (16, 15)])
def test_auto_leaves_one_cpu_to_the_event_loop(cpus, expected):
    assert choose_cpu_threads(0, CPU, cpus=cpus).threads == expected


def test_an_explicit_count_is_used_as_given():
    assert choose_cpu_threads(3, CPU, cpus=2).threads == 3


def test_auto_keeps_torch_default_off_cpu():
    torch.set_num_threads(2)
    assert choose_cpu_threads(0, torch.device("cuda"), cpus=16).threads == 2


def test_negative_count_is_refused():
    with pytest.raises(InvalidRequest, match="cpu_threads"):
        EngineConfig(cpu_threads=-1).validate()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("threads")
    base = save_tiny_checkpoint(root / "base")
    save_random_lora(base, root / "adapters" / "x", r=4, seed=1)
    return base, root / "adapters"


def make_engine(model_dirs, threads: int) -> Engine:
    base, adapters = model_dirs
    return Engine(EngineConfig(model=base, dtype="fp32", device="cpu", max_loras=2, max_rank=8, max_batch_size=4,
                               max_input_tokens=32, max_total_tokens=64, max_batch_tokens=64, cpu_threads=threads),
                  DirectoryAdapterSource(adapters))


@pytest.mark.parametrize("threads", [1, 2])
def test_the_loop_thread_runs_with_the_configured_count(model_dirs, threads):
    torch.set_num_threads(3)  # whatever the process had before: the engine's choice wins
    engine = make_engine(model_dirs, threads)
    engine.start()
    try:
        done = engine.submit([5, 9, 200, 31], "x", SamplingParams(max_new_tokens=3, ignore_eos=True)).result(60)
        assert len(done.tokens) == 3
        assert engine.stats().cpu_threads == threads  # read by the loop thread itself
        assert torch.get_num_threads() == threads  # process-wide, as documented
    finally:
        engine.shutdown()


def test_thread_count_changes_no_result(model_dirs):
    """The same prefill and decode steps (base rows and an adapter row) at 1 thread and at 2 threads: the logits
    agree within the fp32 reordering bound of one model computed twice (tolerances.SAME_MODEL_LOGITS)."""
    engine = make_engine(model_dirs, 1)
    engine.bank.load(1, engine.parser.parse(model_dirs[1] / "x"))
    prompts, slots = [[5, 9, 200, 31, 7], [100, 3, 44], [17, 18, 19, 20, 21, 22]], [1, 0, 1]
    logits = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        first = engine.runner.prefill(0, prompts, slots)  # (3, V)
        step = engine.runner.decode([11, 12, 13], [len(p) for p in prompts], slots)  # (3, V)
        logits[threads] = torch.cat([first, step])
    assert (logits[1] - logits[2]).abs().max().item() <= SAME_MODEL_LOGITS


@pytest.mark.parametrize("cpu_max, limit", [("400000 100000\n", 4), ("150000 100000", 2), ("max 100000", None),
                                            ("50000 100000", 1), ("garbage", None)])
def test_a_containers_cpu_quota_caps_the_usable_cpus(tmp_path, cpu_max, limit):
    from app.engine.cpu_threads import cgroup_cpu_limit, usable_cpus

    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert cgroup_cpu_limit(path) == limit
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(path) == (min(affinity, limit) if limit is not None else affinity)
    assert cgroup_cpu_limit(tmp_path / "absent") is None  # cgroup v1 or no cgroup: no cap
