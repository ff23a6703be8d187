"""Engine throughput/latency benchmark (run by hand; not a test). Nothing is downloaded.

    .venv/bin/python bench/engine_bench.py            # defaults below; ~5-10 min on 2 CPU cores

Builds a ~29M-parameter Llama with random weights (hidden 512, 8 layers, 8 heads, intermediate 1376, vocab 8000)
and K rank-R LoRA adapters on q,k,v,o saved as PEFT directories in a temp dir, then runs, in one process:
  (1) the base model alone through the engine,  (2) the engine with a random adapter per request,
  (3) naive PEFT: set_adapter + generate, one request at a time,
  (4) PEFT mixed-batch generate(adapter_names=...) in static batches of size C,
and measures cold adapter loads (disk -> host parse -> slot copy). Writes JSON + PNG into bench/out/.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.engine import DirectoryAdapterSource, Engine, EngineConfig, SamplingParams  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=48, help="requests per engine scenario and round")
    p.add_argument("--rounds", type=int, default=3, help="alternating base/adapter engine rounds (medians reported)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (engine) / static batch (PEFT)")
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-min", type=int, default=32)
    p.add_argument("--prompt-max", type=int, default=128)
    p.add_argument("--naive-requests", type=int, default=8, help="requests for naive PEFT (one at a time)")
    p.add_argument("--cold-loads", type=int, default=192, help="disk -> slot loads to time")
    p.add_argument("--kernel", default="auto", choices=("auto", "rows", "bgmv", "grouped", "reference"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="compute dtype of every scenario (engine and PEFT alike)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    p.add_argument("--skip-peft", action="store_true", help="only the engine scenarios")
    return p.parse_args()


# ---- fixtures: model, tokenizer, adapters ------------------------------------------------------------------
def build_model_dir(path: Path, seed: int) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(path))
    vocab = {f"t{i}": i for i in range(8000)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t0",
                            unk_token="t3").save_pretrained(str(path))
    return sum(p.numel() for p in model.parameters())


def write_adapter(path: Path, rank: int, seed: int, layers: int = 8, hidden: int = 512) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for module in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) / math.sqrt(hidden)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(hidden, rank, generator=gen) * 0.02
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": list(TARGETS), "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True}))


def make_requests(args, n: int, rng: random.Random) -> list[tuple[list[int], str]]:
    return [([rng.randrange(4, 8000) for _ in range(rng.randint(args.prompt_min, args.prompt_max))],
             f"ad{rng.randrange(args.adapters):03d}") for _ in range(n)]


def pct(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))] if values else None


def summary(tokens: int, wall: float, latencies: list[float], ttfts: list[float]) -> dict:
    r3 = lambda v: None if v is None else round(v, 3)  # noqa: E731
    return {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "latency_p50_s": r3(pct(latencies, 50)), "latency_p99_s": r3(pct(latencies, 99)),
            "ttft_p50_s": r3(pct(ttfts, 50)), "ttft_p99_s": r3(pct(ttfts, 99))}


# ---- scenarios ---------------------------------------------------------------------------------------------
def run_engine(engine: Engine, args, requests, use_adapters: bool) -> dict:
    """Closed loop: keep `concurrency` requests in flight until all are done."""
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    latencies, ttfts, tokens = [], [], 0
    lock = threading.Lock()
    queue = list(requests)
    start = time.perf_counter()

    def worker():
        nonlocal tokens
        while True:
            with lock:
                if not queue:
                    return
                prompt, adapter = queue.pop(0)
            res = engine.submit(prompt, adapter if use_adapters else None, params).result(timeout=600)
            with lock:
                tokens += len(res.token_ids)
                latencies.append(res.total_seconds)
                ttfts.append(res.time_to_first_token)

    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(tokens, time.perf_counter() - start, latencies, ttfts)


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_peft(model_dir: Path, adapters: Path, names: list[str], dtype: str = "fp32"):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=TORCH_DTYPES[dtype])
    model = PeftModel.from_pretrained(model, str(adapters / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters / name), adapter_name=name)
    return model.eval()


@torch.inference_mode()
def run_peft_naive(model, args, requests) -> dict:
    latencies, tokens = [], 0
    start = time.perf_counter()
    for prompt, adapter in requests:
        t0 = time.perf_counter()
        model.set_adapter(adapter)
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        tokens += out.shape[1] - len(prompt)
        latencies.append(time.perf_counter() - t0)
    return summary(tokens, time.perf_counter() - start, latencies, [])


@torch.inference_mode()
def run_peft_mixed(model, args, requests) -> dict:
    latencies, tokens = [], 0
    start = time.perf_counter()
    for i in range(0, len(requests), args.concurrency):
        batch = requests[i:i + args.concurrency]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])  # left padding for generate
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=[a for _, a in batch],
                             max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                             pad_token_id=0)
        tokens += (out.shape[1] - width) * len(batch)
        latencies += [time.perf_counter() - t0] * len(batch)
    return summary(tokens, time.perf_counter() - start, latencies, [])


def cold_loads(engine: Engine, adapters: Path, names: list[str], n: int) -> dict:
    """disk -> host (parse, the loader thread's work) -> slot (copy_, the scheduler's work), timed per load.
    The engine is idle; the same functions as in serving are called. Files are in the OS page cache."""
    parse_s, copy_s, total_s = [], [], []
    for i in range(n):
        t0 = time.perf_counter()
        parsed = engine.parser.parse(adapters / names[i % len(names)])
        t1 = time.perf_counter()
        engine.bank.load(1 + i % engine.bank.n_slots, parsed)
        t2 = time.perf_counter()
        parse_s.append(t1 - t0)
        copy_s.append(t2 - t1)
        total_s.append(t2 - t0)
    ms = lambda v, q: round(1000 * pct(v, q), 2)  # noqa: E731
    return {"loads": n, "total_p50_ms": ms(total_s, 50), "total_p99_ms": ms(total_s, 99),
            "parse_p50_ms": ms(parse_s, 50), "copy_p50_ms": ms(copy_s, 50)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"base": "(1) engine\nbase only", "engine": f"(2) engine\n{results['args']['adapters']} adapters",
              "peft_naive": "(3) PEFT naive\n1 at a time", "peft_mixed": "(4) PEFT mixed\nstatic batch"}
    keys = [k for k in labels if k in results["scenarios"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    tput = [results["scenarios"][k]["tokens_per_s"] for k in keys]
    axes[0].bar([labels[k] for k in keys], tput, color=["#888", "#2a7", "#c44", "#d93"][:len(keys)])
    axes[0].set_ylabel("generated tokens / s")
    axes[0].set_title("Throughput")
    for i, v in enumerate(tput):
        axes[0].text(i, v, f"{v:.0f}", ha="center", va="bottom")
    x = range(len(keys))
    axes[1].bar([i - 0.2 for i in x], [results["scenarios"][k]["latency_p50_s"] for k in keys], 0.4, label="p50")
    axes[1].bar([i + 0.2 for i in x], [results["scenarios"][k]["latency_p99_s"] for k in keys], 0.4, label="p99")
    axes[1].set_xticks(list(x), [labels[k] for k in keys])
    axes[1].set_ylabel("request latency (s)")
    axes[1].set_title("Latency")
    axes[1].legend()
    cold = results["cold_load"]
    axes[2].bar(["parse p50", "copy p50", "disk→slot p50", "disk→slot p99"],
                [cold["parse_p50_ms"], cold["copy_p50_ms"], cold["total_p50_ms"], cold["total_p99_ms"]])
    axes[2].axhline(30, color="r", ls="--", label="target p50 ≤ 30 ms")
    axes[2].set_ylabel("ms")
    axes[2].set_title(f"Cold load, rank-{results['args']['rank']} adapter")
    axes[2].legend()
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelsize=8)
    axes[1].text(0.99, 0.98, "(3): service time only, no queueing", transform=axes[1].transAxes, ha="right",
                 va="top", fontsize=7)
    fig.suptitle(results["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        tmp = Path(tmp)
        n_params = build_model_dir(tmp / "model", args.seed)
        names = [f"ad{i:03d}" for i in range(args.adapters)]
        for i, name in enumerate(names):
            write_adapter(tmp / "adapters" / name, args.rank, seed=1000 + i)
        max_total = args.prompt_max + args.new_tokens
        config = EngineConfig(model=str(tmp / "model"), dtype=args.dtype, max_loras=2 * args.concurrency,
                              max_cpu_adapters=args.adapters, max_rank=args.rank,
                              max_batch_size=args.concurrency, max_batch_tokens=args.concurrency * args.prompt_max,
                              max_input_tokens=args.prompt_max, max_total_tokens=max_total + 1,
                              target_modules=TARGETS, kernel=args.kernel)
        engine = Engine(config, DirectoryAdapterSource(tmp / "adapters"))
        engine.start()
        results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                               "torch": torch.__version__, "device": str(engine.device), "gpu": "not measured on GPU"},
                   "model_parameters": n_params, "scenarios": {}}
        results["title"] = (f"{n_params / 1e6:.1f}M-param Llama, {args.adapters} rank-{args.rank} adapters (q,k,v,o), "
                            f"C={args.concurrency}, {args.new_tokens} new tokens, {args.dtype} on "
                            f"{torch.get_num_threads()} CPU thread(s) (not measured on GPU)")
        warm = make_requests(args, args.concurrency, rng)
        run_engine(engine, args, warm, use_adapters=False)  # warm-up: allocator, kernels
        for prompt, name in [([5] * 8, n) for n in names]:  # every adapter in host memory (max_cpu_adapters = K)
            engine.submit(prompt, name, SamplingParams(max_new_tokens=1)).result(timeout=600)
        requests = make_requests(args, args.requests, rng)
        rounds: dict[str, list[dict]] = {"base": [], "engine": []}
        for i in range(args.rounds):  # alternate the order: other load on the machine hits both alike
            for mode in (("base", "engine") if i % 2 == 0 else ("engine", "base")):
                print(f"round {i + 1}: {'(1) engine, base only' if mode == 'base' else '(2) engine, adapters'}",
                      flush=True)
                rounds[mode].append(run_engine(engine, args, requests, use_adapters=mode == "engine"))
        for mode, runs in rounds.items():
            results["scenarios"][mode] = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
        results["rounds"] = {m: [r["tokens_per_s"] for r in runs] for m, runs in rounds.items()}
        results["round_ratios"] = [round(e["tokens_per_s"] / b["tokens_per_s"], 3)
                                   for e, b in zip(rounds["engine"], rounds["base"])]
        results["engine_cache"] = {t: {"hits": c.hits, "misses": c.misses, "evictions": c.evictions,
                                       "loads": c.loads} for t, c in engine.cache.counters.items()}
        engine.shutdown()
        print("cold loads ...", flush=True)
        results["cold_load"] = cold_loads(engine, tmp / "adapters", names, args.cold_loads)
        if not args.skip_peft:
            peft_model = load_peft(tmp / "model", tmp / "adapters", names, args.dtype)
            print("(3) PEFT naive ...", flush=True)
            run_peft_naive(peft_model, args, requests[:1])  # warm-up
            results["scenarios"]["peft_naive"] = run_peft_naive(peft_model, args, requests[:args.naive_requests])
            print("(4) PEFT mixed batch ...", flush=True)
            results["scenarios"]["peft_mixed"] = run_peft_mixed(peft_model, args, requests)
    s = results["scenarios"]
    ratio = lambda a, b: round(s[a]["tokens_per_s"] / s[b]["tokens_per_s"], 3) if b in s else None  # noqa: E731
    results["ratios"] = {"engine/base": ratio("engine", "base"), "engine/peft_naive": ratio("engine", "peft_naive"),
                         "engine/peft_mixed": ratio("engine", "peft_mixed")}
    results["targets"] = {"engine/base >= 0.85": results["ratios"]["engine/base"],  # engine: median rounds
                          "engine/peft_naive >= 10": results["ratios"]["engine/peft_naive"],
                          "engine/peft_mixed >= 1.5": results["ratios"]["engine/peft_mixed"],
                          "cold load p50 <= 30 ms": results["cold_load"]["total_p50_ms"]}
    (args.out / "engine_bench.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "engine_bench.png")
    print(json.dumps({k: results[k] for k in ("scenarios", "ratios", "rounds", "round_ratios", "cold_load")},
                     indent=2))


if __name__ == "__main__":
    main()
