"""Where the server's time goes under the peer_vllm.py load: py-spy on `olora serve` (run by hand; not a test).

    .venv/bin/python bench/profile_http.py [--seconds 30] [--olora-flags "..."]

Same model, adapters and /v1/completions load as bench/peer_vllm.py (adapters phase, C clients, one adapter per
request), looped while `py-spy record --gil --threads` samples the server: only the thread holding the GIL is
recorded, so the shares below say which thread's Python work the others wait for. Prints the GIL share per thread
and the top functions of each (own time); writes bench/out/profile_http.txt (py-spy's raw collapsed stacks).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from http_bench import build_adapters, build_model, workload  # noqa: E402
from peer_vllm import Server, free_port, openai_load  # noqa: E402

RATE = 200  # py-spy samples per second


def summarize(raw: Path, seconds: int, rate: int, top: int = 12) -> str:
    """py-spy raw output: 'thread (tid);frame;frame... count' lines -> GIL share per thread, own time per function."""
    per_thread: collections.Counter = collections.Counter()
    own: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1] if frames else "?"  # "thread (tid): name"
        per_thread[thread] += int(count)
        own[thread][frames[-1]] += int(count)
    total = sum(per_thread.values()) or 1
    lines = [f"{total} samples holding the GIL (of {seconds * rate} taken: the GIL was held "
             f"{100 * total / max(seconds * rate, 1):.0f}% of the time)"]
    for thread, n in per_thread.most_common():
        lines.append(f"\n{thread}: {100 * n / total:.1f}% of GIL samples")
        for frame, k in own[thread].most_common(top):
            lines.append(f"  {100 * k / total:5.1f}%  {frame}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=30)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--olora-flags", default="")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = p.parse_args()
    from transformers import AutoTokenizer

    from app.engine.engine import Engine, EngineConfig
    from app.adapters.store.adapter_store import AdapterStore

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="olora-profile-"))
    try:
        base = build_model(work / "base", 512, 8)
        store = AdapterStore(work / "store")
        fingerprint = Engine(EngineConfig(model=str(base), max_loras=1, max_rank=16), store).base.fingerprint
        for path in build_adapters(base, work / "adapters", args.adapters, 16):
            store.put(path.name, path, {"kind": "lora", "base_fingerprint": fingerprint})
        texts = [t for t, _ in workload(AutoTokenizer.from_pretrained(base), 4 * args.concurrency, args.adapters)]
        jobs = [(t, f"a{i % args.adapters}") for i, t in enumerate(texts)]
        port = free_port()
        env = dict(os.environ, OLORA_MODEL=str(base), OLORA_ADAPTER_DIR=str(work / "store"),
                   OLORA_DEMO_ADAPTERS="false", OLORA_PORT=str(port))
        server = Server([sys.executable, "-m", "olora_core.cli", "serve", "--log-level", "warning",
                         *args.olora_flags.split()], env, port, "/ready", work / "olora.log")
        raw = args.out / "profile_http.txt"

        async def run() -> None:
            import httpx

            async with httpx.AsyncClient(timeout=10) as http:
                await server.wait_ready(http)
            await openai_load(server.url, jobs[:args.concurrency], args.concurrency, 64)  # warm-up
            spy = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record",
                                    "--pid", str(server.proc.pid), "--gil", "--threads", "--format", "raw",
                                    "--rate", str(RATE), "--duration", str(args.seconds), "--output", str(raw),
                                    "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rates = []
            while spy.poll() is None:
                rates.append((await openai_load(server.url, jobs, args.concurrency, 64))["tokens_per_s"])
            print(f"load while profiled: {rates} tok/s")

        try:
            asyncio.run(run())
        finally:
            server.stop()
        report = summarize(raw, args.seconds, RATE)
        print(report)
        (args.out / "profile_http_summary.txt").write_text(report)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
