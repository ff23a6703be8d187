"""Decode-step time of the engine's forward, variants side by side in one process (run by hand; not a test).

    .venv/bin/python bench/decode_step_bench.py --batch 64 --variants base,auto,bgmv
    .venv/bin/python bench/decode_step_bench.py --shape 0.5b --batch 16 --variants base,aten-base,aten-base@2 --advance

Model and adapters as in engine_bench.py (29.4M-parameter random Llama, rank-16 LoRA on q,k,v,o). B rows are
prefilled once (prompt lengths 32..128, so decode needs a mask: the real load), each row with its own adapter
(B distinct adapters in B slots); then every variant times `--steps` decode forwards of the same B rows at the same
positions, the variants taking turns step by step for `--rounds` x `--steps` steps (so the shared machine's drift hits all of them).
Variants: base (no adapter: slot 0 everywhere), auto / rows / bgmv / grouped (the LoRA kernel forced on the bank),
and with `--compile` also compiled-base / compiled-auto: the same forward through `torch.compile(model,
dynamic=True)` (inductor; needs a C++ compiler; compile time is reported apart and not in the step times);
buckets-<kernel>: the step padded to its shape bucket (EngineConfig.decode_graph="buckets"); a suffix @N runs the
variant with N torch threads (else the engine's own choice, EngineConfig.cpu_threads auto); a prefix aten- runs
it with torch's F.linear for the fp32 Linear layers instead of oneDNN (EngineConfig.cpu_gemm, cpu_linear.py). `--shape 0.5b`: a
random Qwen2 shaped like Qwen2-0.5B (users_bench.py SHAPES; 494M parameters) instead of the 29.4M Llama, with
rank-16 q,k,v,o adapters of its shapes; prompts of 30..80 tokens there.
Prints the median step time per variant and its ratio to base; writes bench/out/decode_step_bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
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

from engine_bench import build_model_dir  # noqa: E402
from profile_adapters import build_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from users_bench import SHAPES  # noqa: E402

from app.engine import DirectoryAdapterSource, Engine, EngineConfig  # noqa: E402
from app.engine.cpu_linear import OutputHead, use_onednn  # noqa: E402

KERNEL_VARIANTS = ("auto", "rows", "bgmv", "grouped")
ADVANCE = False  # --advance
COMPILED: dict = {}  # eager model -> its torch.compile'd wrapper (--compile)


def write_shaped_adapter(path: Path, targets: dict[str, tuple[int, int]], rank: int, seed: int) -> None:
    """A rank-r PEFT LoRA on every q,k,v,o module of `targets` (name -> (in, out)), with their own shapes."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (fan_in, fan_out) in targets.items():
        if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.02
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "lora_dropout": 0.0, "bias": "none"}))


def prepare_rows(engine: Engine, adapters: Path, batch: int, rng: random.Random,
                 lengths: tuple[int, int] = (32, 128)) -> tuple[list[int], list[int]]:
    """Load `batch` adapters into slots 1..B and prefill B rows (one adapter each). -> (last tokens, positions)."""
    for slot in range(1, batch + 1):
        engine.bank.load(slot, engine.parser.parse(adapters / f"ad{slot:04d}"))
    prompts = [[rng.randrange(4, 8000) for _ in range(rng.randint(*lengths))] for _ in range(batch)]
    row = 0
    while row < batch:  # prefill in chunks within max_batch_tokens
        n = max(1, min(batch - row, engine.config.max_batch_tokens // 128))
        engine.runner.prefill(row, prompts[row:row + n], list(range(row + 1, row + n + 1)))
        row += n
    return [p[-1] for p in prompts], [len(p) for p in prompts]


def set_cpu_gemm(engine: Engine, cpu_gemm: str) -> None:
    """Switch the engine's fp32 Linear layers between oneDNN and F.linear (cpu_linear.py) in place."""
    for layer in engine.bank.layers.values():
        layer.onednn = use_onednn(layer.base_layer, cpu_gemm)
    head = engine.model.get_output_embeddings()
    plain = head.base_layer if isinstance(head, OutputHead) else head
    engine.model.set_output_embeddings(OutputHead(plain) if use_onednn(plain, cpu_gemm) else plain)


def time_variant(engine: Engine, variant: str, tokens: list[int], positions: list[int], steps: int) -> list[float]:
    """Seconds per decode forward of the B prepared rows under `variant`."""
    variant, _, threads = variant.partition("@")
    torch.set_num_threads(int(threads) if threads else engine.cpu_threads)
    set_cpu_gemm(engine, "aten" if variant.startswith("aten-") else engine.config.cpu_gemm)
    variant = variant.removeprefix("aten-")
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
    p.add_argument("--threads", type=int, default=0, help="the engine's cpu_threads (0 = auto)")
    p.add_argument("--shape", choices=("small", "0.5b"), default="small")
    p.add_argument("--advance", action="store_true", help="positions advance every step (else they stay fixed)")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd forward")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = p.parse_args()
    global ADVANCE
    ADVANCE = args.advance
    variants = args.variants.split(",")
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="olora-step-") as tmp:
        tmp = Path(tmp)
        if args.shape == "small":
            build_model_dir(tmp / "model", seed=0)
        else:
            build_model(tmp / "model", **SHAPES[args.shape])
        engine = Engine(EngineConfig(model=str(tmp / "model"), max_loras=args.batch, max_batch_size=args.batch,
                                     cpu_threads=args.threads), DirectoryAdapterSource(tmp / "adapters"))
        for slot in range(1, args.batch + 1):
            write_shaped_adapter(tmp / "adapters" / f"ad{slot:04d}", engine.bank.targets, rank=16, seed=slot)
        lengths = (32, 128) if args.shape == "small" else (30, 80)
        tokens, positions = prepare_rows(engine, tmp / "adapters", args.batch, rng, lengths)
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
                  "engine_cpu_threads": engine.cpu_threads, "steps_per_variant": args.steps * args.rounds,
                  "shape": args.shape, "load_average_after": os.getloadavg(),
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
