"""Where the adapter phase's time goes, inside the engine (run by hand; not a test).

    .venv/bin/python bench/profile_adapters.py [--rounds 2] [--max-loras 0] [--kernel auto]

The users' load (users_load.py: C clients, N requests x T new tokens, request i on adapter 7i mod K) on the
in-process engine with the server's default settings, base and adapter phases alternated `--rounds` times. The
engine's own methods are wrapped with timers, so every second of the engine thread is put in one bucket:
decode forward, prefill forward, slot loads (host -> slot copies in `acquire_slot`), row bindings (slot -> row
buffer copies), sampling, and the rest of the step (scheduler, detokenizer, hand-offs). Prints per phase: tok/s,
steps, mean rows per decode step, ms per decode step, the buckets' shares, and the device-tier hits/misses/evictions.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import users_load  # noqa: E402


class Counters:
    """Seconds and calls per bucket, cache events; reset per phase."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.seconds: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        self.rows: collections.Counter = collections.Counter()
        self.events: collections.Counter = collections.Counter()

    def wrap(self, obj, name: str, bucket: str, rows_of=None) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                with self.lock:
                    self.seconds[bucket] += time.perf_counter() - start
                    self.calls[bucket] += 1
                    if rows_of is not None:
                        self.rows[bucket] += rows_of(*args)
        setattr(obj, name, timed)

    # observer protocol
    def on_cache_event(self, tier, event, adapter_id):
        with self.lock:
            self.events[f"{tier}_{event}"] += 1

    def on_adapter_load(self, tier, seconds):
        pass

    def on_step(self, running, waiting, prefill_tokens, decode_tokens):
        pass

    def on_request_done(self, stats):
        pass


def build(work: Path, k: int, rank: int, hidden: int, layers: int, vocab: int):
    from http_bench import build_adapters

    from app.adapters.store.adapter_store import AdapterStore
    from app.engine.engine import Engine, EngineConfig

    base = build_model(work / "base", hidden, layers, vocab)
    store = AdapterStore(work / "store")
    fingerprint = Engine(EngineConfig(model=str(base), max_loras=1, max_rank=rank), store).base.fingerprint
    for path in build_adapters(base, work / "adapters", k, rank):
        store.put(path.name, path, {"kind": "lora", "base_fingerprint": fingerprint})
    return base, work / "store"


def build_model(out: Path, hidden: int, layers: int, vocab: int, intermediate: int | None = None,
                heads: int | None = None, kv_heads: int | None = None, arch: str = "llama") -> Path:
    """A random-weight Llama/Qwen2 with the embedded model's tokenizer (its ids < vocab)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from olora_core.default_model import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    heads = heads or hidden // 64
    cls, cfg = (Qwen2ForCausalLM, Qwen2Config) if arch == "qwen2" else (LlamaForCausalLM, LlamaConfig)
    config = cfg(vocab_size=max(vocab, len(tok)), hidden_size=hidden, intermediate_size=intermediate or int(hidden * 2.6875),
                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                 max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id, tie_word_embeddings=arch == "qwen2")
    model = cls(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"model ({arch}): {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
    return out


def instrument(engine, counters: Counters) -> None:
    import app.engine.engine as engine_module

    counters.wrap(engine.runner, "decode", "decode forward", rows_of=lambda tokens, *a: len(tokens))
    counters.wrap(engine.runner, "prefill", "prefill forward", rows_of=lambda row, prompts, *a: len(prompts))
    counters.wrap(engine.cache, "acquire_slot", "slot acquire (+ host->slot copy)")
    counters.wrap(engine.bank, "load", "  of which host->slot copy")
    counters.wrap(engine.bank, "_bind", "row binding (slot->row copy)")
    counters.wrap(engine, "_step", "engine step (all)")
    counters.wrap(engine_module, "choose_tokens", "sampling")


async def run_phase(engine, jobs, concurrency: int, new_tokens: int) -> dict:
    from app.engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    ids = [(engine.tokenizer(p)["input_ids"], a) for p, a in jobs]
    sem = asyncio.Semaphore(concurrency)

    async def one(prompt_ids, adapter) -> int:
        async with sem:
            return sum([1 async for _ in engine.submit(prompt_ids, adapter, params)])

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(*j) for j in ids)))
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-loras", type=int, default=None, help="default: the server's setting")
    p.add_argument("--kernel", default="auto")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "profile_adapters.json")
    args = p.parse_args()

    from app.adapters.store.adapter_store import AdapterStore
    from app.engine.engine import Engine, EngineConfig
    from app.server.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="olora-profile-adapters-"))
    base, store_dir = build(work, args.adapters, args.rank, 512, 8, 8000)
    s = Settings()
    config = EngineConfig(model=str(base), max_loras=s.max_loras if args.max_loras is None else args.max_loras,
                          max_cpu_adapters=s.max_cpu_adapters, max_rank=s.max_rank, max_batch_size=s.max_batch_size,
                          max_batch_tokens=s.max_batch_tokens, max_input_tokens=s.max_input_tokens,
                          max_total_tokens=s.max_total_tokens, kernel=args.kernel)
    counters = Counters()
    engine = Engine(config, AdapterStore(store_dir), observer=counters)
    instrument(engine, counters)
    engine.start()
    texts = users_load.prompts(args.requests)
    phases = users_load.phases(texts, args.adapters)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "max_loras": engine.config.max_loras,
              "row_buffer_rank": engine.bank.row_buffer_rank, "rounds": []}
    try:
        asyncio.run(run_phase(engine, phases["adapters"][:args.concurrency], args.concurrency, 4))  # warm-up
        for r in range(args.rounds):
            for phase, jobs in phases.items():
                counters.reset()
                res = asyncio.run(run_phase(engine, jobs, args.concurrency, args.new_tokens))
                step = counters.seconds["engine step (all)"]
                buckets = {b: round(100 * sec / res["seconds"], 1) for b, sec in counters.seconds.items()}
                decode_calls = max(counters.calls["decode forward"], 1)
                row = {"round": r, "phase": phase, "tokens_per_s": round(res["tokens_per_s"], 1),
                       "wall_s": round(res["seconds"], 2), "steps": counters.calls["engine step (all)"],
                       "engine_busy_pct": round(100 * step / res["seconds"], 1),
                       "decode_ms_per_step": round(1000 * counters.seconds["decode forward"] / decode_calls, 2),
                       "rows_per_decode": round(counters.rows["decode forward"] / decode_calls, 2),
                       "pct_of_wall": buckets, "calls": dict(counters.calls), "events": dict(counters.events)}
                report["rounds"].append(row)
                print(json.dumps(row), flush=True)
    finally:
        engine.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
