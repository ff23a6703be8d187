"""1,000 distinct adapters under a minute of traffic: both cache tiers keep missing (run by hand; not a test).

    .venv/bin/python bench/churn_bench.py                 # C = 16, 32, 64; ~8 min on 2 CPU cores

Model and adapters as in engine_bench.py (29.4M-parameter random Llama; rank-16 LoRA on q,k,v,o in PEFT's file
layout), K = 1,000 adapter directories on disk. For each concurrency C the in-process engine with the server's
default settings (`max_loras` auto, `max_cpu_adapters` 64) runs a closed loop of C clients for `--seconds`, first
on the base model, then with a uniformly random adapter per request (so nearly every request misses the host tier
and the device tier). Reported per C: tokens/s of both phases and their ratio (target >= 0.7), host/device misses,
and the slot wait: for every request, the engine steps between the moment its adapter was in host memory (its
load finished, or its arrival if it was already there) and its admission (target: never more than one step).
Writes bench/out/churn_bench.json and bench/out/churn_bench.png.
"""
from __future__ import annotations

import argparse
import bisect
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from engine_bench import build_model_dir, write_adapter  # noqa: E402

from app.engine import DirectoryAdapterSource, Engine, EngineConfig, SamplingParams  # noqa: E402


class Recorder:
    """Engine observer: step times, host-load completion times per adapter, per-request stats."""

    def __init__(self):
        self.lock = threading.Lock()
        self.steps: list[float] = []
        self.host_ready: dict[str, list[float]] = {}
        self.done = []  # (finish time, RequestStats)
        self.events = {"host_miss": 0, "device_miss": 0, "device_eviction": 0}

    def on_step(self, running, waiting, prefill_tokens, decode_tokens):
        self.steps.append(time.perf_counter())

    def on_cache_event(self, tier, event, adapter_id):
        with self.lock:
            if tier == "host" and event == "load":
                self.host_ready.setdefault(adapter_id, []).append(time.perf_counter())
            key = f"{tier}_{event}"
            if key in self.events:
                self.events[key] += 1

    def on_adapter_load(self, tier, seconds):
        pass

    def on_request_done(self, stats):
        with self.lock:
            self.done.append((time.perf_counter(), stats))

    def reset(self) -> None:
        with self.lock:
            self.steps, self.done = [], []
            self.events = dict.fromkeys(self.events, 0)


def slot_waits(rec: Recorder) -> list[int]:
    """Steps each finished adapter request waited after its adapter was in host memory."""
    waits = []
    for finished, s in rec.done:
        if s.adapter_id is None or s.finish_reason != "length":
            continue
        submitted = finished - s.total_seconds
        admitted = submitted + s.queue_seconds
        loads = [t for t in rec.host_ready.get(s.adapter_id, []) if t <= admitted]
        ready = max([submitted] + loads[-1:])
        # steps that *started* after `ready` and ended before admission = steps the request sat out
        waits.append(max(0, bisect.bisect_left(rec.steps, admitted) - bisect.bisect_right(rec.steps, ready) - 1))
    return waits


def closed_loop(engine: Engine, concurrency: int, seconds: float, adapters: list[str] | None, new_tokens: int,
                rng: random.Random) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    deadline = time.perf_counter() + seconds
    lock = threading.Lock()
    tokens = [0]
    prompts = [[rng.randrange(4, 8000) for _ in range(rng.randint(32, 128))] for _ in range(256)]

    def client(seed: int):
        r = random.Random(seed)
        while time.perf_counter() < deadline:
            adapter = r.choice(adapters) if adapters else None
            res = engine.submit(r.choice(prompts), adapter, params).result(timeout=600)
            with lock:
                tokens[0] += len(res.token_ids)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(rng.randrange(2**31),)) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"tokens": tokens[0], "seconds": round(wall, 2), "tokens_per_s": round(tokens[0] / wall, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--concurrency", default="16,32,64")
    p.add_argument("--seconds", type=float, default=60.0, help="traffic per phase (base, then adapters)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--kernel", default="auto", choices=("auto", "rows", "bgmv", "grouped"),
                   help="LoRA kernel (the server's default is auto)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = p.parse_args()
    from app.server.settings import Settings

    s = Settings()
    rng = random.Random(0)
    results = []
    with tempfile.TemporaryDirectory(prefix="olora-churn-") as tmp:
        tmp = Path(tmp)
        build_model_dir(tmp / "model", seed=0)
        names = [f"ad{i:04d}" for i in range(args.adapters)]
        for i, name in enumerate(names):
            write_adapter(tmp / "adapters" / name, rank=16, seed=i)
        print(f"wrote {len(names)} adapters", flush=True)
        for c in [int(x) for x in args.concurrency.split(",")]:
            rec = Recorder()
            config = EngineConfig(model=str(tmp / "model"), max_loras=s.max_loras, max_rank=s.max_rank,
                                  max_cpu_adapters=s.max_cpu_adapters, max_batch_size=max(c, s.max_batch_size),
                                  max_batch_tokens=s.max_batch_tokens, max_waiting=4 * c, kernel=args.kernel)
            engine = Engine(config, DirectoryAdapterSource(tmp / "adapters"), observer=rec)
            engine.start()
            try:
                closed_loop(engine, c, 5, None, 8, rng)  # warm-up
                base = closed_loop(engine, c, args.seconds, None, args.new_tokens, rng)
                rec.reset()
                adapted = closed_loop(engine, c, args.seconds, names, args.new_tokens, rng)
                waits = slot_waits(rec)
                row = {"concurrency": c, "max_batch_size": config.max_batch_size,
                       "max_loras": engine.config.max_loras, "kernel": args.kernel,
                       "row_buffer_rank": engine.bank.row_buffer_rank, "base": base, "adapters": adapted,
                       "ratio": round(adapted["tokens_per_s"] / base["tokens_per_s"], 3), **rec.events,
                       "adapter_requests": len(waits), "slot_wait_steps_max": max(waits, default=0),
                       "requests_waiting_over_1_step": sum(w > 1 for w in waits)}
            finally:
                engine.shutdown()
            print(json.dumps(row), flush=True)
            results.append(row)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "churn_bench.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                                   "results": results}, indent=2))
    plot(results, args.out / "churn_bench.png")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [r["concurrency"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(cs, [r["base"]["tokens_per_s"] for r in results], "o-", label="base model only")
    ax.plot(cs, [r["adapters"]["tokens_per_s"] for r in results], "s-", label="1,000 adapters, random per request")
    ax.set_xlabel("concurrent clients C")
    ax.set_ylabel("tokens/s")
    ax.set_xticks(cs)
    ax.legend()
    ax.set_title("adapter churn (engine in-process, server defaults)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
