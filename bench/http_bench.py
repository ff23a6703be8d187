"""HTTP overhead benchmark: the same workload through the in-process engine and through the real server.

Workload: a Llama-architecture model with random weights (no download; tokenizer of the embedded model),
K rank-16 adapters on q,k,v,o, N requests (a random adapter each) with prompts of 32-128 tokens and
64 new tokens (greedy, EOS ignored so every request yields exactly 64 tokens), C in flight at once.

  (A) in-process: Engine.submit from C concurrent asyncio tasks;
  (B) over HTTP: `olora serve` in a subprocess on 127.0.0.1, C concurrent httpx clients on POST /generate.

Both run with the same engine settings, one after the other in this one run; reported: tokens/s and the ratio
B/A (target >= 0.9). Usage:
    .venv/bin/python bench/http_bench.py [--requests 48] [--concurrency 16] [--adapters 16]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(out: Path, hidden: int, layers: int) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from olora_core.default_model import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    return out


def build_adapters(base: Path, root: Path, k: int, r: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                         "o_proj"],
                                                  task_type="CAUSAL_LM"))
    out = []
    for i in range(k):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        peft_model.save_pretrained(root / f"a{i}")
        out.append(root / f"a{i}")
    return out


def workload(tokenizer, n: int, k: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    words = "return the value of the given object if it is not None otherwise raise an error".split()
    jobs = []
    for _ in range(n):
        target = rng.randint(32, 128)
        text = ""
        while len(tokenizer(text)["input_ids"]) < target:
            text += rng.choice(words) + " "
        jobs.append((text, f"a{rng.randrange(k)}"))
    return jobs


async def run_in_process(base: Path, store_dir: Path, jobs, concurrency: int, settings: dict) -> dict:
    from app.engine.engine import Engine, EngineConfig
    from app.engine.sampling import SamplingParams
    from app.adapters.store.adapter_store import AdapterStore

    engine = Engine(EngineConfig(model=str(base), **settings), AdapterStore(store_dir))
    engine.start()
    try:
        sem = asyncio.Semaphore(concurrency)

        async def one(prompt: str, adapter: str) -> int:
            async with sem:
                handle = engine.submit(engine.tokenizer(prompt)["input_ids"], adapter,
                                       SamplingParams(max_new_tokens=64, ignore_eos=True))
                return sum([1 async for _ in handle])

        await asyncio.gather(*(one(*jobs[i]) for i in range(min(concurrency, len(jobs)))))  # warm-up
        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(p, a) for p, a in jobs)))
        seconds = time.perf_counter() - started
    finally:
        engine.shutdown()
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


async def run_http(base: Path, store_dir: Path, jobs, concurrency: int, settings: dict) -> dict:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OLORA_MODEL=str(base), OLORA_ADAPTER_DIR=str(store_dir), OLORA_DEMO_ADAPTERS="false",
               **{f"OLORA_{k.upper()}": str(v) for k, v in settings.items()})
    proc = subprocess.Popen([sys.executable, "-m", "olora_core.cli", "serve", "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600,
                                     limits=httpx.Limits(max_connections=concurrency)) as http:
            for _ in range(600):
                try:
                    if (await http.get("/ready")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
            sem = asyncio.Semaphore(concurrency)

            async def one(prompt: str, adapter: str) -> int:
                async with sem:
                    r = await http.post("/generate", json={"inputs": prompt, "parameters": {
                        "adapter_id": adapter, "max_new_tokens": 64, "ignore_eos_token": True, "details": True}})
                    r.raise_for_status()
                    return r.json()["details"]["generated_tokens"]

            await asyncio.gather(*(one(*jobs[i]) for i in range(min(concurrency, len(jobs)))))  # warm-up
            started = time.perf_counter()
            tokens = sum(await asyncio.gather(*(one(p, a) for p, a in jobs)))
            seconds = time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(30)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "http_bench.json")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from app.adapters.store.adapter_store import AdapterStore

    work = Path(tempfile.mkdtemp(prefix="olora-http-bench-"))
    try:
        base = build_model(work / "base", args.hidden, args.layers)
        store = AdapterStore(work / "store")
        from app.engine.engine import Engine, EngineConfig
        settings = dict(max_batch_size=args.concurrency, max_loras=min(args.adapters, 16), max_cpu_adapters=64,
                        max_rank=args.rank)
        fingerprint = Engine(EngineConfig(model=str(base), **settings), store).base.fingerprint
        for path in build_adapters(base, work / "adapters", args.adapters, args.rank):
            store.put(path.name, path, {"kind": "lora", "base_fingerprint": fingerprint})
        jobs = workload(AutoTokenizer.from_pretrained(base), args.requests, args.adapters)
        in_process = asyncio.run(run_in_process(base, work / "store", jobs, args.concurrency, settings))
        print(f"(A) in-process engine: {in_process['tokens_per_s']:.1f} tok/s")
        http = asyncio.run(run_http(base, work / "store", jobs, args.concurrency, settings))
        print(f"(B) HTTP /generate:    {http['tokens_per_s']:.1f} tok/s")
        ratio = http["tokens_per_s"] / in_process["tokens_per_s"]
        print(f"B/A = {ratio:.3f} (target >= 0.9)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "in_process": in_process, "http": http, "ratio": ratio}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
