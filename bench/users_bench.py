"""Speed the way users measure it: OpenAI /v1/completions from outside, at the servers' defaults (run by hand).

    .venv/bin/python bench/users_bench.py                                  # small model, 32 adapters, vs vLLM
    .venv/bin/python bench/users_bench.py --shape 0.5b --adapters 8 --requests 16 --new-tokens 32 --rounds 1
    .venv/bin/python bench/users_bench.py --skip-vllm --churn 1000         # + 1,000 adapters in rotation

Load (users_load.py): C clients, N requests x T new tokens, prompts of 24-64 common English words, greedy
(`temperature` 0, `ignore_eos`), request i on adapter a{7i mod K}. Phases "base" and "adapters" alternate, every
target in every round, the order of targets rotated each round; medians over rounds. Targets, all up at once:
  olora         `olora serve` with its defaults (model, store and port given; adapters put in its store as PEFT dirs)
  olora-ref     with --reference-tree PATH: `olora serve` run from that source tree (before/after a change)
  olora-engine  the same engine in-process with the server's defaults (Engine.submit from C asyncio tasks)
  vllm          vLLM's CPU build (bench/.vllm-venv, made by peer_vllm.ensure_vllm), --enable-lora --max-loras 16
                --max-lora-rank R --max-cpu-loras K, unless --skip-vllm
Then, once per HTTP target: a streamed pass of each phase (TTFT and time per output token p50/p99, from the
arrival of the SSE chunks), the first-request cost (a 1-token request to an adapter never used since start, against
the same request to one in use; chunks count with empty text too), and with --churn M: M adapters, request i on a{7i mod M} (almost every request
needs an adapter not in memory). Shapes: small = the 27M Llama (hidden 512, 8 layers, vocab 8000); 0.5b = a random
Qwen2 shaped like Qwen2-0.5B (hidden 896, 24 layers, 14/2 heads, MLP 4864, vocab 151936, tied embeddings).
Per target and phase it also records CPU milliseconds per token: the server's processes, this process (the HTTP
clients, or the in-process engine) and the main thread (the server's event loop). Writes
bench/out/users_bench[_<shape>].json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import users_load  # noqa: E402
from peer_vllm import Server, ensure_vllm, free_port  # noqa: E402
from profile_adapters import build_model, run_phase  # noqa: E402

SHAPES = {"small": dict(hidden=512, layers=8, vocab=8000),
          "0.5b": dict(hidden=896, layers=24, vocab=151936, intermediate=4864, heads=14, kv_heads=2, arch="qwen2")}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--adapters", default="32", help="adapters in rotation; a list (8,32) adds a phase per count")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--churn", type=int, default=0, help="also a phase over this many adapters (0 = none)")
    p.add_argument("--olora-flags", default="")
    p.add_argument("--compare-flags", default=None,
                   help="also start a second `olora serve` (target olora-alt) with these flags: A/B in one run")
    p.add_argument("--reference-tree", type=Path, default=None,
                   help="also `olora serve` from this source tree (target olora-ref), e.g. the code before a change: "
                        "git archive <commit> app olora_core | tar -x -C /tmp/ref")
    p.add_argument("--vllm-venv", type=Path, default=ROOT / "bench" / ".vllm-venv")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    return p.parse_args()


def build_adapters(base: Path, root: Path, names: list[str], r: int) -> list[Path]:
    """PEFT LoRA (q,k,v,o, rank r, alpha 2r) directories with random factors, one per name."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    out = []
    for i, name in enumerate(names):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(root / name)
        out.append(root / name)
    return out


async def http_load(url: str, jobs, concurrency: int, new_tokens: int, stream: bool = False) -> dict:
    """C clients on /v1/completions (model = adapter name or "base"). Streamed: per request the time to the first
    chunk and the mean gap between chunks after it."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    ttft: list[float] = []
    tpot: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=1800,
                                 limits=httpx.Limits(max_connections=concurrency)) as http:
        async def one(prompt: str, model: str | None) -> int:
            body = {"model": model or "base", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                    "ignore_eos": True}
            async with sem:
                if not stream:
                    r = await http.post("/v1/completions", json=body)
                    r.raise_for_status()
                    return r.json()["usage"]["completion_tokens"]
                body.update(stream=True, stream_options={"include_usage": True})
                start, arrivals, usage = time.perf_counter(), [], 0
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if not line.startswith("data:") or line.strip() == "data: [DONE]":
                            continue
                        event = json.loads(line[5:])
                        if event.get("usage"):
                            usage = event["usage"]["completion_tokens"]
                        if event.get("choices"):  # a token's chunk, its text possibly empty (ids the
                            arrivals.append(time.perf_counter())  # random model draws outside the tokenizer)
                if arrivals:
                    ttft.append(arrivals[0] - start)
                    if usage > 1:
                        tpot.append((arrivals[-1] - arrivals[0]) / (usage - 1))
                return usage

        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(p, m) for p, m in jobs)))
        seconds = time.perf_counter() - started
    res = {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}
    if stream:
        res.update({f"{name}_{q}_ms": round(1000 * users_load.percentile(v, p), 1)
                    for name, v in (("ttft", ttft), ("tpot", tpot)) for q, p in (("p50", 0.5), ("p99", 0.99))})
    return res


async def first_request_cost(url: str, cold: str, warm: str) -> dict:
    """One 1-token request to `cold` (never used since start), then the same to `warm`, the server idle."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        seconds = {}
        for label, model in (("cold", cold), ("warm", warm), ("cold_again", cold)):
            start = time.perf_counter()
            r = await http.post("/v1/completions", json={"model": model, "prompt": "the first word", "max_tokens": 1,
                                                         "temperature": 0})
            r.raise_for_status()
            seconds[f"{label}_ms"] = round(1000 * (time.perf_counter() - start), 1)
    return seconds


def engine_target(base: Path, store_dir: Path, args):
    from app.adapters.store.adapter_store import AdapterStore
    from app.engine.engine import Engine
    from app.server.settings import Settings

    config = Settings(model=str(base)).engine_config()  # every engine setting as `olora serve` has it by default
    engine = Engine(config, AdapterStore(store_dir))
    engine.start()
    return engine


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds so far of a server process and its children (vLLM's engine core is a child), or
    with None of this process alone (the benchmark: the HTTP clients, and the in-process engine with its consumer;
    not its children, which are the servers)."""
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *(proc.children(recursive=True) if pid is not None else [])]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def loop_thread_seconds(pid: int | None) -> float:
    """CPU seconds so far of a process's main thread: `olora serve`'s event loop (uvicorn), or with None this
    process's (the in-process engine's asyncio consumer)."""
    import psutil

    pid = os.getpid() if pid is None else pid
    return next((t.user_time + t.system_time for t in psutil.Process(pid).threads() if t.id == pid), 0.0)


async def measure(args, servers: dict[str, Server], engine, phases, churn_jobs, report, save) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=10) as http:
        for server in servers.values():
            await server.wait_ready(http)
    targets = {name: (lambda jobs, url=s.url: http_load(url, jobs, args.concurrency, args.new_tokens))
               for name, s in servers.items()}
    if engine is not None:
        targets["olora-engine"] = lambda jobs: run_phase(engine, jobs, args.concurrency, args.new_tokens)
    texts = [p for p, _ in phases["base"]]
    warm = [(texts[i % len(texts)], f"a{i}") for i in range(args.adapters)] + phases["base"][:args.concurrency]
    for name, run in targets.items():  # warm-up: every adapter once, every target
        await run(warm)
        print(f"warm {name}", flush=True)
    rounds = report["rounds"] = {name: {phase: [] for phase in phases} for name in targets}
    # CPU milliseconds per generated token, per round: the server's process tree, this process (the HTTP clients;
    # for olora-engine the engine itself and its asyncio consumer), and the main thread's (the event loop of
    # `olora serve`, the asyncio consumer of olora-engine)
    cpu = report["cpu_ms_per_token"] = {name: {phase: {"server": [], "bench": [], "loop": []} for phase in phases}
                                        for name in targets}
    order = list(targets)
    for r in range(args.rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            for phase, jobs in phases.items():
                pid = servers[name].proc.pid if name in servers else None
                before = (cpu_seconds(pid) if pid else 0.0), cpu_seconds(None), loop_thread_seconds(pid)
                res = await targets[name](jobs)
                after = (cpu_seconds(pid) if pid else 0.0), cpu_seconds(None), loop_thread_seconds(pid)
                rounds[name][phase].append(res["tokens_per_s"])
                report.setdefault("load_average_per_phase", []).append([r, name, phase, os.getloadavg()[0]])
                for side, b, a in zip(("server", "bench", "loop"), before, after):
                    cpu[name][phase][side].append(round(1000 * (a - b) / res["tokens"], 3))
                print(f"round {r} {name} {phase}: {res['tokens_per_s']:.1f} tok/s, CPU ms/token server "
                      f"{cpu[name][phase]['server'][-1]:.2f} bench {cpu[name][phase]['bench'][-1]:.2f} "
                      f"main thread {cpu[name][phase]['loop'][-1]:.3f} "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
                save()
    report["results"] = {name: {phase: statistics.median(v) for phase, v in by.items()} for name, by in rounds.items()}
    report["per_round_ratio"] = {name: {ph: [round(a / b, 3) for a, b in zip(by[ph], by["base"])]
                                        for ph in by if ph != "base"} for name, by in rounds.items()}
    if not args.skip_latency:
        report["latency"] = {name: {phase: await http_load(s.url, jobs, args.concurrency, args.new_tokens, stream=True)
                                    for phase, jobs in phases.items()} for name, s in servers.items()}
        save()
        report["first_request"] = {name: await first_request_cost(s.url, f"a{args.adapters}", "a0")
                                   for name, s in servers.items()}
        save()
    if churn_jobs:
        report["churn"] = {}
        for name, run in targets.items():
            report["churn"][name] = res = await run(churn_jobs)
            print(f"churn {name}: {res['tokens_per_s']:.1f} tok/s", flush=True)
            save()


def main() -> None:
    args = parse_args()
    counts = [int(k) for k in str(args.adapters).split(",")]
    args.adapters = max(counts)
    from app.adapters.store.adapter_store import AdapterStore
    from app.engine.engine import Engine, EngineConfig

    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / ("users_bench.json" if args.shape == "small" else f"users_bench_{args.shape}.json")
    vllm_python = None if args.skip_vllm else ensure_vllm(args.vllm_venv)
    work = Path(tempfile.mkdtemp(prefix="olora-users-bench-"))
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count(),
              "load_average_before": os.getloadavg()}
    save = lambda: out.write_text(json.dumps(report, indent=2))  # noqa: E731
    servers: dict[str, Server] = {}
    engine = None
    try:
        base = build_model(work / "base", **SHAPES[args.shape])
        n_adapters = max(args.adapters + 1, args.churn)  # a{K}: never requested before the first-request test
        names = [f"a{i}" for i in range(n_adapters)]
        dirs = build_adapters(base, work / "adapters", names, args.rank)
        store = AdapterStore(work / "store")
        fingerprint = Engine(EngineConfig(model=str(base), max_loras=1, max_rank=args.rank), store).base.fingerprint
        for path in dirs:
            store.put(path.name, path, {"kind": "lora", "base_fingerprint": fingerprint})
        texts = users_load.prompts(args.requests)
        phases = users_load.phases(texts, counts[0])
        for k in counts[1:]:
            phases[f"adapters{k}"] = users_load.phases(texts, k)["adapters"]
        churn_jobs = [(t, users_load.adapter_for(i, args.churn)) for i, t in enumerate(texts)] if args.churn else []
        port = free_port()
        env = dict(os.environ, OLORA_MODEL=str(base), OLORA_ADAPTER_DIR=str(work / "store"),
                   OLORA_DEMO_ADAPTERS="false", OLORA_PORT=str(port))
        servers["olora"] = Server([sys.executable, "-m", "olora_core.cli", "serve", "--log-level", "warning",
                                   *args.olora_flags.split()], env, port, "/ready", work / "olora.log")
        if args.compare_flags is not None:
            port = free_port()
            servers["olora-alt"] = Server([sys.executable, "-m", "olora_core.cli", "serve", "--log-level", "warning",
                                           *args.compare_flags.split()], dict(env, OLORA_PORT=str(port)), port,
                                          "/ready", work / "olora-alt.log")
        if args.reference_tree is not None:  # the same server from another source tree, in the same rounds
            port = free_port()
            servers["olora-ref"] = Server(  # -P: the current directory (this tree) does not go before PYTHONPATH
                [sys.executable, "-P", "-m", "olora_core.cli", "serve", "--log-level", "warning", *args.olora_flags.split()],
                dict(env, OLORA_PORT=str(port), PYTHONPATH=str(args.reference_tree.resolve())), port, "/ready",
                work / "olora-ref.log")
        if vllm_python is not None:
            port = free_port()
            served = dirs if args.churn else dirs[:args.adapters + 1]
            cmd = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
                   "--served-model-name", "base", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024",
                   "--max-num-seqs", str(args.concurrency), "--enable-lora", "--max-loras", "16",
                   "--max-lora-rank", str(args.rank), "--max-cpu-loras", str(min(len(served), 64)),
                   "--lora-modules", *[f"{p.name}={p}" for p in served]]
            servers["vllm"] = Server(cmd, dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2"), port, "/health",
                                     work / "vllm.log")
        if not args.skip_engine:
            engine = engine_target(base, work / "store", args)
        asyncio.run(measure(args, servers, engine, phases, churn_jobs, report, save))
    finally:
        if engine is not None:
            engine.shutdown()
        for server in servers.values():
            server.stop()
        for log in work.glob("*.log"):
            shutil.copy(log, args.out / f"users_bench_{log.name}")
        shutil.rmtree(work, ignore_errors=True)
    res = report.get("results", {})
    ratios = {f"{n} {ph}/base": round(r[ph] / r["base"], 3) for n, r in res.items() for ph in r if ph != "base"}
    if "olora" in res and "olora-engine" in res:
        ratios["HTTP/in-process (adapters)"] = round(res["olora"]["adapters"] / res["olora-engine"]["adapters"], 3)
        ratios["HTTP/in-process (base)"] = round(res["olora"]["base"] / res["olora-engine"]["base"], 3)
    if "olora-alt" in res:
        ratios.update({f"olora/olora-alt ({ph})": round(res["olora"][ph] / res["olora-alt"][ph], 3) for ph in res["olora"]})
    if "olora-ref" in res:
        ratios.update({f"olora/olora-ref ({ph})": round(res["olora"][ph] / res["olora-ref"][ph], 3) for ph in res["olora"]})
        if "olora-engine" in res:
            ratios["olora-ref HTTP/in-process (adapters)"] = round(
                res["olora-ref"]["adapters"] / res["olora-engine"]["adapters"], 3)
    if "vllm" in res:
        ratios.update({f"olora/vllm ({ph})": round(res["olora"][ph] / res["vllm"][ph], 3) for ph in res["vllm"]})
    report["ratios"] = ratios
    report["load_average_after"] = os.getloadavg()
    save()
    print(json.dumps({"results": res, "ratios": ratios, "latency": report.get("latency"),
                      "first_request": report.get("first_request"), "churn": report.get("churn")}, indent=1))


if __name__ == "__main__":
    main()
