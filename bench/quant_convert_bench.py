"""Quantization-aware OLoRA -> LoRA conversion vs PEFT's conversion: served logits against the trained model.

For each base quantization (nf4, int8, none = fp32): load the base (bitsandbytes on CPU, fp32 compute), PEFT
OLoRA r=8 / alpha=16 on q_proj, v_proj (PEFT dequantizes, subtracts s·B0A0, requantizes), save the init, train a
few steps on examples/shout.jsonl (so B != B0), save. Reference = PEFT's trained quantized model (the trained
adapter reloaded by PeftModel on a fresh quantized base: PEFT re-runs the init, so it is the model that was
trained). Served = a fresh quantized base + PeftModel(converted adapter): PEFT's conversion (rank 2r), ours at
rank 2r, ours at 4r, and ours with --max-rel-error. Logits on the held-out prompts (examples/shout-heldout.jsonl).

Two errors per method: `raw` with bitsandbytes' CPU kernels (int8 quantizes activations; 4-bit on an
AVX512-BF16 CPU computes through bf16 with bf16 block scales) and `weights` with every bitsandbytes layer replaced
by a float32 Linear of its dequantized weight (the part a conversion controls). No quantized forward happens
before an init or a dequantization (bitsandbytes repacks 4-bit weights for its CPU kernel on the first forward).

    nice -n 10 .venv/bin/python bench/quant_convert_bench.py [--base DIR] [--steps 40]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from olora_core.convert import convert  # noqa: E402
from olora_core.data import SeededBatches, collate, load_dataset  # noqa: E402
from olora_core.quant_convert import convert_quant_aware, dequantize_linears  # noqa: E402

R, ALPHA, TARGETS = 8, 16, ["q_proj", "v_proj"]


def default_base() -> Path:
    try:
        from olora_core.default_model import default_model_path

        path = default_model_path()
        if (path / "model.safetensors").is_file():
            return path
    except Exception:  # noqa: BLE001 - not built yet: fall back to a tiny random Llama
        pass
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import save_tiny_checkpoint

    return Path(save_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="qc-bench-")) / "tiny"))


def cpu_4bit_skips(base: Path) -> list[str]:
    """bitsandbytes' CPU 4-bit kernel (AVX512-BF16 repacking) needs out_features % 32 == 0 and in_features % 64
    == 0: the default model's MLP (intermediate 688) fails it, so the MLP stays float32 there. The attention
    layers (the adapted q/v among them) are quantized."""
    config = json.loads((base / "config.json").read_text())
    return ["lm_head"] + (["gate_proj", "up_proj", "down_proj"] if config.get("intermediate_size", 0) % 64 else [])


def load_base(base: Path, quantization: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    skips = cpu_4bit_skips(base)
    config = {"nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=skips,
                                        bnb_4bit_compute_dtype=torch.float32),
              "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", llm_int8_skip_modules=skips,
                                        bnb_4bit_compute_dtype=torch.float32),
              "int8": BitsAndBytesConfig(load_in_8bit=True)}.get(quantization)
    kwargs = dict(quantization_config=config, device_map="cpu") if config else {}
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, **kwargs)
    model.config.use_cache = False
    return model.eval()


dequantized = dequantize_linears


def train(base: Path, quantization: str, data: Path, out: Path, steps: int, lr: float, seed: int, tokenizer) -> float:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_base(base, quantization), LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="olora", lora_dropout=0.0,
        task_type="CAUSAL_LM"))
    model.save_pretrained(str(out / "initial"))
    dataset = load_dataset(data, tokenizer, 128)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = SeededBatches(dataset.examples, 8, seed, pad)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = model(**batches.next_batch()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(str(out / "trained"))
    return loss.item()


def heldout_batch(path: Path, tokenizer) -> dict[str, torch.Tensor]:
    dataset = load_dataset(path, tokenizer, 128)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate(list(dataset.examples), pad)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def masked_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch).logits  # (B, T, V)
    return out[batch["attention_mask"].bool()]  # (N, V)


def peft_on(base: Path, quantization: str, adapter: Path | None, weights_only: bool):
    from peft import PeftModel

    model = load_base(base, quantization)
    if adapter is not None:  # an unconverted OLoRA adapter: PEFT re-runs the init (requantizing) on this base
        model = PeftModel.from_pretrained(model, str(adapter))
    return (dequantized(model) if weights_only else model).eval()


def run_one(base: Path, quantization: str, args, tokenizer, batch, work: Path) -> dict:
    tic = time.perf_counter()
    final_loss = train(base, quantization, ROOT / "examples" / "shout.jsonl", work, args.steps, args.lr, args.seed,
                       tokenizer)
    train_s = time.perf_counter() - tic
    print(f"{quantization}: trained {args.steps} steps in {train_s:.0f} s (loss {final_loss:.3f})", flush=True)
    kind = quantization if quantization != "none" else "none"
    conversions = {"peft (2r)": None, "ours 2r": dict(rank=None), "ours 4r": dict(rank=4 * R),
                   "ours 8r": dict(rank=8 * R)}
    for target in args.max_rel_error:
        conversions[f"ours max_rel_error={target}"] = dict(max_rel_error=target)
    reports = {}
    tic = time.perf_counter()
    for name, options in conversions.items():
        out = work / name.replace(" ", "_").replace("=", "")
        if options is None:
            convert(work / "initial", work / "trained", out)
        else:
            reports[name] = convert_quant_aware(work / "initial", work / "trained", out, base, kind, **options)
    convert_s = time.perf_counter() - tic
    result = {"quantization": quantization, "train_steps": args.steps, "final_train_loss": final_loss,
              "train_s": round(train_s, 1), "convert_s": round(convert_s, 2), "methods": {}}
    for weights_only in (False, True):
        mode = "weights" if weights_only else "raw"
        if quantization == "none" and weights_only:
            continue
        ref = masked_logits(peft_on(base, quantization, work / "trained", weights_only), batch)
        plain = masked_logits(peft_on(base, quantization, None, weights_only), batch)
        result[f"adapter_effect_{mode}"] = (ref - plain).abs().max().item()
        for name in conversions:
            out = work / name.replace(" ", "_").replace("=", "")
            got = masked_logits(peft_on(base, quantization, out, weights_only), batch)
            entry = result["methods"].setdefault(name, {})
            entry[f"max_err_{mode}"] = (got - ref).abs().max().item()
            entry[f"mean_err_{mode}"] = (got - ref).abs().mean().item()
            if name in reports:
                rep = reports[name]
                entry.update(ranks=sorted({x.rank for x in rep.layers}), max_rel_error=rep.max_rel_error,
                             peft_max_rel_error=rep.max_peft_rel_error)
    return result


def table(results: list[dict]) -> str:
    lines = ["| base | method | rank(s) | max logit err (raw) | ratio PEFT/ours (raw) | max logit err (weights) | "
             "ratio PEFT/ours (weights) | worst layer rel. Frobenius err |",
             "|---|---|---|---|---|---|---|---|"]
    for res in results:
        peft = res["methods"]["peft (2r)"]
        for name, entry in res["methods"].items():
            ranks = ",".join(map(str, entry.get("ranks", [2 * R])))
            raw_ratio = peft["max_err_raw"] / entry["max_err_raw"]
            w = entry.get("max_err_weights")
            w_ratio = f"{peft['max_err_weights'] / w:.2f}×" if w else "-"
            rel = f"{entry['max_rel_error']:.2e}" if "max_rel_error" in entry else (
                f"{res['methods']['ours 2r']['peft_max_rel_error']:.2e}")
            lines.append(f"| {res['quantization']} | {name} | {ranks} | {entry['max_err_raw']:.2e} | {raw_ratio:.2f}× | "
                         f"{w:.2e} | {w_ratio} | {rel} |" if w else
                         f"| {res['quantization']} | {name} | {ranks} | {entry['max_err_raw']:.2e} | {raw_ratio:.2f}× | "
                         f"- | - | {rel} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=None, help="base model dir (default: the embedded default model)")
    p.add_argument("--quantizations", default="nf4,int8,none")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rel-error", type=float, nargs="*", default=[0.1, 0.01])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "quant_convert.json")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    base = args.base or default_base()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    batch = heldout_batch(ROOT / "examples" / "shout-heldout.jsonl", tokenizer)
    results = []
    for quantization in args.quantizations.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"qc-{quantization}-"))
        try:
            results.append(run_one(base, quantization, args, tokenizer, batch, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(results[-1], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"base": str(base), "args": {k: str(v) for k, v in vars(args).items()},
                                    "results": results}, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
