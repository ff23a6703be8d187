"""Decode-step time of the engine's forward, variants side by side in one process (run by hand; not a test).

    .venv/bin/python bench/decode_step_bench.py --batch 64 --variants base,auto,bgmv

Model and adapters as in engine_bench.py (29.4M-parameter random Llama, rank-16 LoRA on q,k,v,o). B rows are
prefilled once (prompt lengths 32..128, so decode needs a mask: the real load), each row with its own adapter
(B distinct adapters in B slots); then every variant times `--steps` decode forwards of the same B rows at the same
positions, the variants taking turns step by step for `--rounds` x `--steps` steps (so the shared machine's drift hits all of them).
Variants: base (no adapter: slot 0 everywhere), auto / rows / bgmv / grouped (the LoRA kernel forced on the bank),
and with `--compile` also compiled-base / compiled-auto: the same forward through `torch.compile(model,
dynamic=True)` (inductor; needs a C++ compiler; compile time is reported apart and not in the step times);
buckets-<kernel>: the step padded to its shape bucket (EngineConfig.decode_graph="buckets").
Prints the median step time per variant and its ratio to base; writes bench/out/decode_step_bench.json.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from engine_bench import build_model_dir, write_adapter  # noqa: E402

from app.engine import DirectoryAdapterSource, Engine, EngineConfig  # noqa: E402

KERNEL_VARIANTS = ("auto", "rows", "bgmv", "grouped")
ADVANCE = False  # --advance
COMPILED: dict = {}  # eager model -> its torch.compile'd wrapper (--compile)


def prepare_rows(engine: Engine, adapters: Path, batch: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """Load `batch` adapters into slots 1..B and prefill B rows (one adapter each). -> (last tokens, positions)."""
    for slot in range(1, batch + 1):
        engine.bank.load(slot, engine.parser.parse(adapters / f"ad{slot:04d}"))
    prompts = [[rng.randrange(4, 8000) for _ in range(rng.randint(32, 128))] for _ in range(batch)]
    row = 0
    while row < batch:  # prefill in chunks within max_batch_tokens
        n = max(1, min(batch - row, engine.config.max_batch_tokens // 128))
        engine.runner.prefill(row, prompts[row:row + n], list(range(row + 1, row + n + 1)))
        row += n
    return [p[-1] for p in prompts], [len(p) for p in prompts]


def time_variant(engine: Engine, variant: str, tokens: list[int], positions: list[int], steps: int) -> list[float]:
    """Seconds per decode forward of the B prepared rows under `variant`."""
    batch = len(tokens)
    engine.runner.decode_model = COMPILED[engine.model] if variant.startswith("compiled-") else engine.model
    engine.runner.bucketed = variant.startswith("buckets-")
    variant = variant.removeprefix("compiled-").removeprefix("buckets-")
    slots = [0] * batch if variant == "base" else list(range(1, batch + 1))
    if variant in KERNEL_VARIANTS:
        engine.bank.kernel = variant
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.runner.decode(tokens, positions, slots)
        times.append(time.perf_counter() - start)
        if ADVANCE:  # the next step one position further, as real decoding goes (L changes every step)
            positions[:] = [p + 1 for p in positions]
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--variants", default="base,auto,bgmv")
    p.add_argument("--steps", type=int, default=10, help="decode forwards per variant and round")
    p.add_argument("--rounds", type=int, default=5, help="rounds; within a round the variants alternate per step")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--advance", action="store_true", help="positions advance every step (else they stay fixed)")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd forward")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = p.parse_args()
    global ADVANCE
    ADVANCE = args.advance
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="olora-step-") as tmp:
        tmp = Path(tmp)
        build_model_dir(tmp / "model", seed=0)
        for slot in range(1, args.batch + 1):
            write_adapter(tmp / "adapters" / f"ad{slot:04d}", rank=16, seed=slot)
        engine = Engine(EngineConfig(model=str(tmp / "model"), max_loras=args.batch, max_batch_size=args.batch),
                        DirectoryAdapterSource(tmp / "adapters"))
        tokens, positions = prepare_rows(engine, tmp / "adapters", args.batch, rng)
        compile_seconds = {}
        if args.compile:
            COMPILED[engine.model] = torch.compile(engine.model, dynamic=True)
            variants += ["compiled-base", "compiled-auto"]
        times: dict[str, list[float]] = {v: [] for v in variants}
        for v in variants:  # warm-up (allocations, row bindings, compilation)
            start = time.perf_counter()
            time_variant(engine, v, tokens, positions, 2)
            if v.startswith("compiled-"):
                compile_seconds[v] = round(time.perf_counter() - start, 1)
        for _ in range(args.rounds * args.steps):  # one step of each variant in turn
            for v in variants:
                times[v] += time_variant(engine, v, tokens, positions, 1)
        from torch._dynamo.utils import counters

        result = {"batch": args.batch, "advance": args.advance,
                  "dynamo_unique_graphs": counters["stats"]["unique_graphs"],
                  "dynamo_graph_breaks": sum(counters["graph_break"].values()), "row_buffer_rank": engine.bank.row_buffer_rank,
                  "torch_threads": torch.get_num_threads(), "steps_per_variant": args.steps * args.rounds,
                  "compile_and_first_steps_s": compile_seconds,
                  "median_ms": {v: round(1e3 * statistics.median(t), 2) for v, t in times.items()}}
    if "base" in variants:
        base = result["median_ms"]["base"]
        result["ratio_to_base"] = {v: round(base / ms, 3) for v, ms in result["median_ms"].items()}
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_step_bench.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
