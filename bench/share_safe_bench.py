"""Share-safe OLoRA vs PEFT's OLoRA on quantized bases: is the served model the trained model, and what it costs.

Per base quantization (nf4, int8, none = fp32; bitsandbytes on CPU, fp32 compute, loaded as `olora serve
--quantize` loads it: `olora_core.bnb_load`) and per training mode, each in a fresh subprocess (clean timing and
peak memory), r=8 / alpha=16 on q_proj, v_proj of the default model, AdamW (as `olora train`) on
examples/shout.jsonl:

- `peft`: PEFT's OLoRA (the residual W' − s·B0A0 is re-quantized). Reference = the trained model in memory.
  Served = a fresh quantized base + PeftModel of (a) PEFT's conversion (`olora_core.convert`, rank 2r) and (b) our
  quantization-aware conversion (`olora_core.quant_convert`, rank 2r).
- `share-safe`: `olora train --share-safe` (base untouched, frozen (A0, −B0) beside the trained adapter).
  Reference = the trained model in memory; served = fresh quantized base + PeftModel(trained/, rank 2r).

Max |logit error| served vs reference over all positions of the 24 held-out prompts (examples/shout-heldout.jsonl),
the held-out loss of the trained model, train step time (median of the steps after the first) and memory: peak RSS
of the process minus its RSS before the first step, plus the parameter bytes of the frozen adapter.

    nice -n 10 .venv/bin/python bench/share_safe_bench.py [--base DIR] [--steps 40] [--quantizations nf4,int8,none]
    nice -n 10 .venv/bin/python bench/share_safe_bench.py --timing 12 [--quantizations nf4,none]

`--timing N` measures only the step-time ratio, side by side in one process: PEFT's OLoRA model and the share-safe
model on the same base, N steps each, alternating (one step of one, then one of the other, same batch), so both see
the same machine load; reported: the median per-step time of each and the median of the per-pair ratios.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from olora_core.data import collate, load_dataset  # noqa: E402
from olora_core.train import TrainConfig, load_base, prepare_training, train_steps  # noqa: E402

MODES = ("peft", "share-safe")


def default_base() -> Path:
    from olora_core.default_model import default_model_path

    return default_model_path()


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def heldout(tokenizer) -> dict[str, torch.Tensor]:
    dataset = load_dataset(ROOT / "examples" / "shout-heldout.jsonl", tokenizer, 128)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return collate(list(dataset.examples), pad)  # input_ids, attention_mask, labels: (B, T)


def logits_and_loss(model, batch) -> tuple[torch.Tensor, float]:
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return out.logits[batch["attention_mask"].bool()], out.loss.item()  # (N, V)


def load_quantized(base: Path, quantize: str):
    """The base as the server loads it (bitsandbytes settings and CPU kernel switch of olora_core.bnb_load)."""
    return load_base(TrainConfig(base=base, data="unused", out="unused", quantize=quantize)).eval()


def served(base: Path, quantize: str, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_quantized(base, quantize), str(adapter)).eval()


def one_run(base: Path, quantize: str, mode: str, steps: int, lr: float, seed: int, work: Path) -> dict:
    """Train once in this process and measure; returns a JSON-able dict."""
    from olora_core.convert import convert
    from olora_core.quant_convert import convert_quant_aware
    from olora_core.share_safe import save_stacked

    torch.set_num_threads(2)
    cfg = TrainConfig(base=base, data=ROOT / "examples" / "shout.jsonl", out=work, r=8, alpha=16.0, steps=steps,
                      lr=lr, batch_size=8, seq_len=128, seed=seed, quantize=quantize, share_safe=mode == "share-safe",
                      progress=False)
    model, tokenizer, dataset = prepare_training(cfg)
    if mode == "peft":
        model.save_pretrained(str(work / "initial"))
    step_times: list[float] = []
    forward = model.forward

    def timed_forward(*args, **kwargs):  # a step = forward + backward + optimizer: time between forwards
        step_times.append(time.perf_counter())
        return forward(*args, **kwargs)

    model.forward = timed_forward
    rss_before = rss_bytes()
    losses = train_steps(model, dataset, tokenizer, cfg)
    step_times.append(time.perf_counter())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model.forward = forward
    frozen_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if ".lora_" in n and not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch = heldout(tokenizer)
    reference, heldout_loss = logits_and_loss(model, batch)
    plain, _ = logits_and_loss(load_quantized(base, quantize), batch)
    result = {"quantization": quantize, "mode": mode, "steps": steps, "first_loss": losses[0], "last_loss": losses[-1],
              "heldout_loss": heldout_loss, "adapter_effect": (reference - plain).abs().max().item(),
              "step_s_median": statistics.median(b - a for a, b in zip(step_times[1:-1], step_times[2:])),
              "peak_rss_minus_start_mb": (peak - rss_before) / 2**20, "peak_rss_mb": peak / 2**20,
              "frozen_adapter_mb": frozen_bytes / 2**20, "trainable_params": trainable, "served": {}}
    adapters = {}
    if mode == "peft":
        model.save_pretrained(str(work / "trained"))
        convert(work / "initial", work / "trained", work / "peft_conversion")
        convert_quant_aware(work / "initial", work / "trained", work / "quant_aware", base, quantize)
        adapters = {"PEFT conversion (2r)": work / "peft_conversion", "quant-aware conversion (2r)": work / "quant_aware"}
    else:
        save_stacked(model, work / "share_safe")
        adapters = {"share-safe, no conversion (2r)": work / "share_safe"}
    del model
    for name, path in adapters.items():
        logits, _ = logits_and_loss(served(base, quantize, path), batch)
        result["served"][name] = {"max_err": (logits - reference).abs().max().item(),
                                  "mean_err": (logits - reference).abs().mean().item()}
    return result


def interleaved_timing(base: Path, quantize: str, steps: int, seed: int) -> dict:
    """Median step time of PEFT's OLoRA vs share-safe, alternating steps on the same batches (one process)."""
    from olora_core.data import SeededBatches

    torch.set_num_threads(2)
    models, optimizers = {}, {}
    for mode in MODES:
        cfg = TrainConfig(base=base, data=ROOT / "examples" / "shout.jsonl", out="unused", r=8, alpha=16.0,
                          quantize=quantize, share_safe=mode == "share-safe", seed=seed)
        model, tokenizer, dataset = prepare_training(cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        models[mode], optimizers[mode] = model.train(), (params, torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = SeededBatches(dataset.examples, 8, seed, pad)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for step in range(steps + 1):  # step 0 warms up both
        batch = batches.next_batch()
        for mode in (MODES if step % 2 else MODES[::-1]):
            params, optimizer = optimizers[mode]
            tic = time.perf_counter()
            models[mode](**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:
                times[mode].append(time.perf_counter() - tic)
    ratios = [b / a for a, b in zip(times["peft"], times["share-safe"])]
    return {"quantization": quantize, "steps": steps, **{f"{m}_step_s_median": statistics.median(t) for m, t in
                                                         times.items()}, "ratio_median": statistics.median(ratios)}


def table(results: list[dict]) -> str:
    lines = ["| base | training | served adapter | max logit err | mean logit err | held-out loss | "
             "step time (median) | peak RSS − start | frozen adapter |", "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for name, err in res["served"].items():
            lines.append(f"| {res['quantization']} | {res['mode']} | {name} | {err['max_err']:.2e} | "
                         f"{err['mean_err']:.2e} | {res['heldout_loss']:.4f} | {1000 * res['step_s_median']:.0f} ms | "
                         f"{res['peak_rss_minus_start_mb']:.0f} MiB | {res['frozen_adapter_mb']:.2f} MiB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=None, help="base model dir (default: the embedded default model)")
    p.add_argument("--quantizations", default="nf4,int8,none")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "share_safe.json")
    p.add_argument("--timing", type=int, default=0, metavar="N", help="only the interleaved step-time ratio, N steps")
    p.add_argument("--one", nargs=2, metavar=("QUANTIZATION", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    base = args.base or default_base()
    if args.one:  # child process: one training run, JSON on the last stdout line
        with tempfile.TemporaryDirectory(prefix="share-safe-bench-") as work:
            print(json.dumps(one_run(base, args.one[0], args.one[1], args.steps, args.lr, args.seed, Path(work))))
        return 0
    started = time.perf_counter()
    if args.timing:
        timings = [interleaved_timing(base, q, args.timing, args.seed) for q in args.quantizations.split(",")]
        for entry in timings:
            print(json.dumps(entry), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_name("share_safe_timing.json").write_text(json.dumps(timings, indent=1) + "\n")
        return 0
    results = []
    for quantize in args.quantizations.split(","):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--base", str(base), "--steps", str(args.steps), "--lr", str(args.lr),
                   "--seed", str(args.seed), "--one", quantize, mode]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), f"({time.perf_counter() - started:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"base": str(base), "args": {k: str(v) for k, v in vars(args).items()},
                                    "results": results, "total_s": time.perf_counter() - started}, indent=1) + "\n")
    print(table(results))
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
