"""One command for a lent GPU: the engine on a random model of Llama-3-8B's shape (run by hand; not a test).

    python3 bench/gpu_check.py --out "$OUT"          # on the GPU machine, < 8 minutes, JSON saved after each phase
    .venv/bin/python bench/gpu_check.py --smoke      # a tiny model on CPU in seconds (tests/test_gpu_check.py)

Phases (each skipped once `--budget-s` is spent, so a run cut at its limit still leaves its JSON):
  matmul   nf4 (bitsandbytes) vs bf16 matmuls of a 4096x14336 Linear at M = 1, 8, 32, 128, 512 tokens
  engine   for each of bf16 and nf4: the engine at C concurrent requests, base model only vs C distinct adapters
           (rank 16 on q,k,v,o, one per request); tokens/s, median decode step time, the GEMM-only floor of one
           decode step at batch C (every Linear of the model plus lm_head, timed alone), and device kernels per
           decode step (CPU: aten ops per step) from torch.profiler
  anchor   the published vLLM figure beside ours: A100, Llama-2-7B, 2,694 tok/s base and 1,788 tok/s with LoRA
           (vLLM PR #11267); target: ours with adapters >= 0.7x the LoRA figure
The model is written once with random weights (safetensors, no download) and the adapters in PEFT's file layout.
"""
from __future__ import annotations

import argparse
import json
import math
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

from engine_bench import run_engine  # noqa: E402

from app.engine import DirectoryAdapterSource, Engine, EngineConfig  # noqa: E402

VLLM_ANCHOR = {"source": "vLLM PR #11267", "gpu": "A100", "model": "Llama-2-7B", "base_tokens_per_s": 2694,
               "lora_tokens_per_s": 1788}
SHAPES = {  # Llama-3-8B; smoke: a tiny model of the same structure (GQA, untied lm_head)
    "full": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256),
    "smoke": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, few requests (CPU test of the script)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench" / "out"))
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 32; smoke 4)")
    p.add_argument("--requests", type=int, default=None, help="requests per scenario (default 2 x C)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128; smoke 8")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 256; smoke 16")
    p.add_argument("--quantize", default="none,nf4", help="comma list of engine runs: none (bf16) and/or nf4")
    p.add_argument("--decode-graph", default="off", choices=("off", "buckets", "cuda"),
                   help="EngineConfig.decode_graph of the engine runs (cuda: CUDA graphs of the bucketed decode step)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip the phases that start after this")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.concurrency = args.concurrency or (2 if smoke else 32)
    args.requests = args.requests or 2 * args.concurrency
    args.new_tokens = args.new_tokens or (4 if smoke else 128)
    args.prompt_tokens = args.prompt_tokens or (16 if smoke else 256)
    args.adapters = args.concurrency
    return args


class Report:
    """The JSON result, rewritten after every phase."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data, self.start = path, data, time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)
        print(f"[{self.elapsed():6.1f}s] saved {self.path}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of `fn()` over `reps` calls after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- fixtures ----------------------------------------------------------------------------------------------
def build_model_dir(path: Path, shape: dict, device: torch.device, dtype: torch.dtype) -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(str(path))
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t0",
                            unk_token="t3").save_pretrained(str(path))
    n = sum(p.numel() for p in model.parameters())
    del model
    return {"parameters": n, "config": shape}


def write_adapter(path: Path, shape: dict, rank: int, seed: int) -> None:
    """A rank-`rank` LoRA on q,k,v,o in PEFT's file layout (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import save_file

    hidden = shape["hidden_size"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    out = {"q_proj": hidden, "k_proj": kv, "v_proj": kv, "o_proj": hidden}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape["num_hidden_layers"]):
        for module in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) / math.sqrt(hidden)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out[module], rank, generator=gen) * 0.02
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": list(TARGETS), "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True}))


# ---- phases ------------------------------------------------------------------------------------------------
def matmul_phase(device: torch.device, dtype: torch.dtype, smoke: bool) -> dict:
    """bf16 nn.Linear vs bitsandbytes nf4 Linear4bit of one MLP up-projection, by token count M."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        return {"skipped": f"bitsandbytes not importable ({exc})"}
    in_f, out_f = (64, 160) if smoke else (4096, 14336)
    dense = torch.nn.Linear(in_f, out_f, bias=False, dtype=dtype, device=device)
    nf4 = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4")
    nf4.weight = bnb.nn.Params4bit(dense.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
    nf4 = nf4.to(device)
    rows = []
    with torch.inference_mode():
        for m in (1, 8, 32, 128, 512):
            x = torch.randn(m, in_f, dtype=dtype, device=device)
            bf = timed(lambda: dense(x), device, 3 if smoke else 50)
            q = timed(lambda: nf4(x), device, 3 if smoke else 50)
            rows.append({"m": m, "dense_ms": round(1e3 * bf, 4), "nf4_ms": round(1e3 * q, 4),
                         "nf4_over_dense": round(q / bf, 2)})
    return {"shape": [in_f, out_f], "rows": rows}


class StepTimes:
    """Engine observer: wall time between consecutive pure-decode steps."""

    def __init__(self):
        self.last, self.decode_steps = None, []

    def on_step(self, running, waiting, prefill_tokens, decode_tokens):
        now = time.perf_counter()
        if self.last is not None and prefill_tokens == 0:
            self.decode_steps.append(now - self.last)
        self.last = now


@torch.inference_mode()
def gemm_floor(engine: Engine, batch: int) -> float:
    """Seconds of one decode step's matmuls alone: every Linear (base weights, no LoRA) + lm_head at (B, 1, in)."""
    from app.engine.lora_layers import MultiLoRALinear

    wrapped = [m.base_layer for m in engine.model.modules() if isinstance(m, MultiLoRALinear)]
    seen = {id(m) for m in wrapped}
    linears = wrapped + [m for m in engine.model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in seen]
    dtype = engine.bank.dtype
    inputs = [torch.randn(batch, 1, m.in_features, dtype=dtype, device=engine.device) for m in linears]

    def step():
        for m, x in zip(linears, inputs):
            m(x)
    return timed(step, engine.device, 5)


@torch.inference_mode()
def profile_decode(engine: Engine, adapters: Path, args, use_adapters: bool) -> dict:
    """One decode step of C rows run directly on the stopped engine's runner: its time, and the device kernels
    (CUDA) or aten ops (CPU) and host syncs (`item`/`tolist` of the sampled tokens) it issues (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from app.engine.sampling import RowSampler, SamplingParams, choose_tokens

    c = args.concurrency
    slots = [0] * c
    if use_adapters:
        for i in range(min(c, engine.bank.n_slots)):
            engine.bank.load(i + 1, engine.parser.parse(adapters / f"ad{i:03d}"))
        slots = [1 + i % engine.bank.n_slots for i in range(c)]
    rng = random.Random(1)
    prompts = [[rng.randrange(4, engine.runner.vocab_size) for _ in range(args.prompt_tokens)] for _ in range(c)]
    engine.runner.prefill(0, prompts, slots)
    samplers = [RowSampler(SamplingParams(max_new_tokens=8), engine.device) for _ in range(c)]
    position = [args.prompt_tokens]

    def step():
        logits = engine.runner.decode([5] * c, [position[0]] * c, slots)
        position[0] += 1
        return choose_tokens(logits, samplers, [None] * c)

    seconds = timed(step, engine.device, 3)
    device = engine.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    events = prof.events()
    if device.type == "cuda":
        launches = {"cuda_kernels": sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)}
    else:
        launches = {"aten_ops": sum(1 for e in events if e.name.startswith("aten::"))}
    syncs = sum(1 for e in events if e.name == "aten::_local_scalar_dense")  # .item() (tolist() is not seen)
    mode = engine.bank.prepare(0, slots).kernel.name  # the LoRA kernel the step used
    return {"decode_step_ms": round(1e3 * seconds, 3), **launches, "item_calls": syncs, "lora_mode": mode}


def engine_phase(model_dir: Path, adapters: Path, args, quantize: str, device: torch.device) -> dict:
    steps = StepTimes()
    config = EngineConfig(model=str(model_dir), dtype="bf16", quantize=quantize, device=str(device),
                          decode_graph=args.decode_graph,
                          max_loras=0, max_rank=16, max_batch_size=args.concurrency,
                          max_batch_tokens=max(2048, args.concurrency * args.prompt_tokens // 4),
                          max_input_tokens=args.prompt_tokens, max_total_tokens=args.prompt_tokens + args.new_tokens + 16,
                          max_cpu_adapters=max(64, args.adapters), max_waiting=4 * args.requests)
    engine = Engine(config, DirectoryAdapterSource(adapters), observer=steps)
    engine.start()
    rng = random.Random(0)
    vocab = engine.runner.vocab_size
    requests = [([rng.randrange(4, vocab) for _ in range(args.prompt_tokens)], f"ad{i % args.adapters:03d}")
                for i in range(args.requests)]
    result = {"quantize": quantize, "decode_graph": args.decode_graph, "max_loras": engine.config.max_loras}
    try:
        run_engine(engine, args, requests[:args.concurrency], True)  # warm-up: every adapter in host memory
        for name, use in (("base", False), ("adapters", True)):
            steps.decode_steps.clear()
            result[name] = run_engine(engine, args, requests, use)
            result[name]["decode_step_ms_p50"] = round(1e3 * statistics.median(steps.decode_steps), 3) \
                if steps.decode_steps else None
        result["adapters_over_base"] = round(result["adapters"]["tokens_per_s"] / result["base"]["tokens_per_s"], 3)
        result["gemm_floor_ms"] = round(1e3 * gemm_floor(engine, args.concurrency), 3)
    finally:
        engine.shutdown()
    for name, use in (("base", False), ("adapters", True)):
        result[f"decode_step_{name}"] = profile_decode(engine, adapters, args, use)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16
    shape = SHAPES["smoke" if args.smoke else "full"]
    report = Report(args.out / ("gpu_check_smoke.json" if args.smoke else "gpu_check.json"), {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "smoke": args.smoke, "concurrency": args.concurrency,
        "requests": args.requests, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
        "vllm_anchor": VLLM_ANCHOR, "phases": {}})
    phases = report.data["phases"]
    phases["matmul"] = matmul_phase(device, dtype, args.smoke)
    report.save()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        report.data["model"] = build_model_dir(tmp / "model", shape, device, dtype)
        for i in range(args.adapters):
            write_adapter(tmp / "adapters" / f"ad{i:03d}", shape, rank=16, seed=i)
        report.save()
        for quantize in [q for q in args.quantize.split(",") if q]:
            if report.elapsed() > args.budget_s:
                phases[f"engine_{quantize}"] = {"skipped": f"time budget {args.budget_s}s spent"}
                continue
            try:
                phases[f"engine_{quantize}"] = engine_phase(tmp / "model", tmp / "adapters", args, quantize, device)
            except Exception as exc:  # keep what was measured; say what failed
                phases[f"engine_{quantize}"] = {"error": f"{type(exc).__name__}: {exc}"}
            report.save()
    bf16 = phases.get("engine_none", {})
    if "adapters" in bf16:
        phases["anchor"] = {"ours_adapters_tokens_per_s": bf16["adapters"]["tokens_per_s"],
                            "over_vllm_lora": round(bf16["adapters"]["tokens_per_s"] / VLLM_ANCHOR["lora_tokens_per_s"], 3),
                            "target": 0.7}
    report.save()
    print(json.dumps(phases, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
