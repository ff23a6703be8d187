"""Intra-op threads against the decode step's GEMM chain, with and without competing busy processes (run by hand).

    .venv/bin/python bench/cpu_threads_bench.py --threads 1,2 --busy 0,1 --steps 5
    taskset -c 0,1 python bench/cpu_threads_bench.py ...      # a quiet many-core machine, held to 2 cores

Pure torch (no engine, no transformers): the Linear layers of one decode step of a Qwen2-0.5B-shaped model
(hidden 896, 24 layers, 14/2 heads x 64, MLP 4864, vocab 151936) at B rows, in the model's order with SiLU-gate
and residual adds, random fp32 (or --dtype bf16) weights. For each count of busy competitors (processes spinning a
Python loop, standing for the HTTP event loop and the neighbours of a shared machine) the thread counts take turns
step by step; prints the median step time per (busy, threads). Writes bench/out/cpu_threads_bench.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden=896, layers=24, q=896, kv=128, mlp=4864, vocab=151936)


def spin(stop) -> None:
    while not stop.is_set():
        pass


def build(dtype: torch.dtype) -> list:
    h, g = SHAPE["hidden"], torch.Generator().manual_seed(0)
    def w(out, inp):
        return (torch.randn(out, inp, generator=g) / inp ** 0.5).to(dtype)
    layers = [dict(qkv=[w(SHAPE["q"], h), w(SHAPE["kv"], h), w(SHAPE["kv"], h)], o=w(h, SHAPE["q"]),
                   gate=w(SHAPE["mlp"], h), up=w(SHAPE["mlp"], h), down=w(h, SHAPE["mlp"])) for _ in range(SHAPE["layers"])]
    return layers + [w(SHAPE["vocab"], h)]


def step(weights: list, x: torch.Tensor) -> torch.Tensor:
    """x: (B, hidden) -> logits (B, vocab): every GEMM of a decode step (attention itself left out)."""
    *layers, head = weights
    for lw in layers:
        q, k, v = (F.linear(x, m) for m in lw["qkv"])  # (B, 896), (B, 128), (B, 128)
        x = x + F.linear(q, lw["o"])
        x = x + F.linear(F.silu(F.linear(x, lw["gate"])) * F.linear(x, lw["up"]), lw["down"])
    return F.linear(x, head)  # (B, vocab)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--busy", default="0,1", help="counts of competing busy processes")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = p.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    weights = build(dtype)
    x = torch.randn(args.batch, SHAPE["hidden"]).to(dtype)
    threads = [int(t) for t in args.threads.split(",")]
    result = {"cpus": len(os.sched_getaffinity(0)), "batch": args.batch, "dtype": args.dtype, "median_ms": {}}
    with torch.inference_mode():
        for busy in (int(b) for b in args.busy.split(",")):
            stop = mp.Event()
            procs = [mp.Process(target=spin, args=(stop,), daemon=True) for _ in range(busy)]
            for proc in procs:
                proc.start()
            times = {t: [] for t in threads}
            try:
                for t in threads:  # warm-up
                    torch.set_num_threads(t)
                    step(weights, x)
                for _ in range(args.steps):
                    for t in threads:
                        torch.set_num_threads(t)
                        start = time.perf_counter()
                        step(weights, x)
                        times[t].append(time.perf_counter() - start)
            finally:
                stop.set()
                for proc in procs:
                    proc.join()
            for t, v in times.items():
                result["median_ms"][f"busy={busy} threads={t}"] = round(1e3 * statistics.median(v), 1)
            print(json.dumps(result["median_ms"]), flush=True)
    result["load_average_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_threads_bench.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
