"""Does OLoRA converge faster than standard LoRA (and PiSSA)? The OLoRA paper's claim, on our small task.
And does share-safe OLoRA (`olora train --share-safe`: base untouched, frozen (A0, −B0) beside the trained adapter,
olora_core/share_safe.py) keep OLoRA's convergence, on an fp32 and an nf4 base?

Fine-tunes the embedded default model (and any model given with --base) on the example tasks (examples/shout.jsonl,
examples/pirate.jsonl; held-out: examples/*-heldout.jsonl) with PEFT's init_lora_weights=True (standard LoRA:
Kaiming-uniform A, B = 0), "olora" and "pissa": same data order, seeds, rank, alpha, targets, learning rate and
optimizer (AdamW, constant lr, weight decay 0, gradients clipped to norm 1, no dropout; as `olora train`). Every
--eval-every steps the held-out loss (completion tokens only) is measured. Reported per init and lr, as mean ± std
over seeds: steps until the held-out loss first reaches the threshold, final held-out loss, final train loss (mean of
the last 10 steps). The threshold (unless --threshold) is the held-out loss at --reach (default 80 %) of the best
loss reduction seen at the main lr: L0 − reach·(L0 − L_best), L0 = mean held-out loss at step 0 (the same for
every init: all three leave the model's output unchanged at init), L_best = lowest mean final held-out loss over
the inits; chosen after the runs, the same for every init and lr. Plots (mean ± std band) go to
bench/out/convergence.png and docs/img/convergence.png.

`--quantizations none nf4` repeats everything on the base loaded with bitsandbytes as `olora serve --quantize`
loads it (olora_core.bnb_load; fp32 compute); the base is then labelled e.g. "default+nf4". Inits: lora, olora,
pissa (PEFT's, via get_peft_model) and olora-ss / pissa-ss (share-safe). PEFT cannot run PiSSA on a quantized base:
that combination is skipped. Held-out losses are those of the trained model in memory (for PEFT's OLoRA on nf4
that is not the model a shared nf4 base serves after conversion, see bench/share_safe_bench.py).

    nice -n 10 .venv/bin/python bench/convergence.py                      # default: ≤ ~10 min on 2 cores
    nice -n 10 .venv/bin/python bench/convergence.py --base DIR --seeds 0 1 2 --steps 120
    nice -n 10 .venv/bin/python bench/convergence.py --quantizations none nf4 --inits lora olora pissa olora-ss \
        --sweep-lrs --doc-image docs/img/convergence-share-safe.png --out bench/out/share-safe
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from olora_core.data import SeededBatches, collate, load_dataset  # noqa: E402

INITS = {"lora": True, "olora": "olora", "pissa": "pissa", "olora-ss": "olora", "pissa-ss": "pissa"}
SHARE_SAFE = ("olora-ss", "pissa-ss")
COLORS = {"lora": "tab:blue", "olora": "tab:red", "pissa": "tab:green", "olora-ss": "tab:purple",
          "pissa-ss": "tab:olive"}


def held_out_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train()
    return loss


def run(base: Path, quantize: str, task: str, init: str, lr: float, seed: int, args, tokenizer) -> dict:
    from peft import LoraConfig, get_peft_model

    from olora_core.share_safe import share_safe_model
    from olora_core.train import TrainConfig, load_base

    model = load_base(TrainConfig(base=base, data="unused", out="unused", quantize=quantize))  # as the server does
    torch.manual_seed(seed)  # standard LoRA draws A here
    config = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=args.targets,
                        init_lora_weights=INITS[init], lora_dropout=0.0, task_type="CAUSAL_LM")
    model = share_safe_model(model, config, INITS[init]) if init in SHARE_SAFE else get_peft_model(model, config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = load_dataset(ROOT / "examples" / f"{task}.jsonl", tokenizer, args.seq_len)
    heldout = collate(list(load_dataset(ROOT / "examples" / f"{task}-heldout.jsonl", tokenizer, args.seq_len).examples),
                      pad)
    batches = SeededBatches(train.examples, args.batch_size, seed, pad)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    train_losses, eval_points = [], [(0, held_out_loss(model, heldout))]
    for step in range(1, args.steps + 1):
        loss = model(**batches.next_batch()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            eval_points.append((step, held_out_loss(model, heldout)))
    return {"task": task, "init": init, "lr": lr, "seed": seed, "train_losses": train_losses, "eval": eval_points}


def steps_to(eval_points: list, threshold: float) -> int | None:
    return next((step for step, loss in eval_points if loss <= threshold), None)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict], threshold: float | None, main_lr: float, reach: float) -> tuple[list[dict], dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["base"], r["task"], r["lr"], r["init"]), []).append(r)
    best, start = {}, {}
    for (base, task, lr, init), rs in groups.items():
        if lr == main_lr:
            final = statistics.fmean(r["eval"][-1][1] for r in rs)
            best[(base, task)] = min(best.get((base, task), float("inf")), final)
            start[(base, task)] = statistics.fmean(r["eval"][0][1] for r in rs)
    thresholds = {k: (threshold if threshold is not None else start[k] - reach * (start[k] - best[k])) for k in best}
    rows = []
    for (base, task, lr, init), rs in sorted(groups.items()):
        thr = thresholds.get((base, task))
        reached = [steps_to(r["eval"], thr) for r in rs]
        hit = [s for s in reached if s is not None]
        rows.append({
            "base": base, "task": task, "lr": lr, "init": init, "seeds": len(rs), "threshold": thr,
            "steps_to_threshold": mean_std(hit) if hit else None, "reached": f"{len(hit)}/{len(rs)}",
            "final_eval": mean_std([r["eval"][-1][1] for r in rs]),
            "initial_eval": mean_std([r["eval"][0][1] for r in rs]),
            "final_train": mean_std([statistics.fmean(r["train_losses"][-10:]) for r in rs]),
        })
    return rows, {f"{b}|{t}": v for (b, t), v in thresholds.items()}


def table(rows: list[dict]) -> str:
    fmt = lambda ms: f"{ms[0]:.3f} ± {ms[1]:.3f}"  # noqa: E731
    lines = ["| base | task | lr | init | held-out loss at step 0 | steps to threshold (reached) | final held-out loss | "
             "final train loss |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        steps = (f"{r['steps_to_threshold'][0]:.0f} ± {r['steps_to_threshold'][1]:.0f}" if r["steps_to_threshold"]
                 else "never")
        lines.append(f"| {r['base']} | {r['task']} | {r['lr']:g} | {r['init']} | {fmt(r['initial_eval'])} | {steps} "
                     f"({r['reached']}, thr {r['threshold']:.3f}) | {fmt(r['final_eval'])} | {fmt(r['final_train'])} |")
    return "\n".join(lines)


def plot(runs: list[dict], main_lr: float, paths: list[Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["base"], r["task"]) for r in runs})
    fig, axes = plt.subplots(3, len(panels), figsize=(5 * len(panels), 10), squeeze=False)
    for col, (base, task) in enumerate(panels):
        for init in INITS:
            rs = [r for r in runs if (r["base"], r["task"], r["init"], r["lr"]) == (base, task, init, main_lr)]
            if not rs:
                continue
            train = torch.tensor([r["train_losses"] for r in rs])  # (seeds, steps)
            kernel = torch.ones(5) / 5  # 5-step moving average of each seed's curve
            smooth = torch.stack([torch.nn.functional.conv1d(t[None, None], kernel[None, None]).flatten() for t in train])
            x = torch.arange(smooth.shape[1]) + 5
            mean, std = smooth.mean(0), smooth.std(0) if len(rs) > 1 else torch.zeros(smooth.shape[1])
            ax = axes[0][col]
            ax.plot(x, mean, color=COLORS[init], label=init)
            ax.fill_between(x, mean - std, mean + std, color=COLORS[init], alpha=0.2)
            ev = torch.tensor([[loss for _, loss in r["eval"]] for r in rs])  # (seeds, points)
            steps = [s for s, _ in rs[0]["eval"]]
            mean, std = ev.mean(0), ev.std(0) if len(rs) > 1 else torch.zeros(ev.shape[1])
            ax = axes[1][col]
            ax.plot(steps, mean, color=COLORS[init], marker=".", label=init)
            ax.fill_between(steps, mean - std, mean + std, color=COLORS[init], alpha=0.2)
        seeds = len({r["seed"] for r in runs if (r["base"], r["task"], r["lr"]) == (base, task, main_lr)})
        axes[0][col].set_title(f"{base}: {task} (lr {main_lr:g}, {seeds} seeds)")
        axes[0][col].set_ylabel("train loss (5-step mean)")
        axes[1][col].set_ylabel("held-out loss")
        axes[1][col].set_xlabel("step")
        lrs = sorted({r["lr"] for r in runs if (r["base"], r["task"]) == (base, task)})
        ax = axes[2][col]
        for init in INITS:
            finals = [[r["eval"][-1][1] for r in runs if (r["base"], r["task"], r["init"], r["lr"]) ==
                       (base, task, init, lr)] for lr in lrs]
            if not all(finals):
                continue
            ax.errorbar(lrs, [statistics.fmean(f) for f in finals],
                        yerr=[statistics.stdev(f) if len(f) > 1 else 0.0 for f in finals],
                        color=COLORS[init], marker="o", capsize=3, label=init)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"held-out loss at step {runs[0]['eval'][-1][0]}")
        for row in (0, 1, 2):
            axes[row][col].legend()
            axes[row][col].grid(alpha=0.3)
    inits = sorted({r["init"] for r in runs}, key=list(INITS).index)
    fig.suptitle(" vs ".join(inits) + " init (mean ± std over seeds; -ss: share-safe)")
    fig.tight_layout()
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, action="append", default=None,
                   help="extra base model directory (repeatable); the default model is always run when present")
    p.add_argument("--no-default", action="store_true", help="skip the embedded default model")
    p.add_argument("--tasks", nargs="+", default=["shout", "pirate"])
    p.add_argument("--inits", nargs="+", choices=list(INITS), default=["lora", "olora", "pissa"])
    p.add_argument("--quantizations", nargs="+", choices=["none", "nf4", "fp4", "int8"], default=["none"],
                   help="base quantizations to run (bitsandbytes, as olora serve --quantize)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lr", type=float, default=1e-3, help="main learning rate (all tasks, plots, threshold)")
    p.add_argument("--sweep-lrs", type=float, nargs="*", default=[3e-4, 3e-3, 1e-2],
                   help="extra learning rates (first task only, same seeds)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threshold", type=float, default=None, help="fixed held-out loss threshold (default: --reach)")
    p.add_argument("--reach", type=float, default=0.8, help="threshold at this share of the best loss reduction")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    p.add_argument("--doc-image", type=Path, default=ROOT / "docs" / "img" / "convergence.png")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    bases: list[tuple[str, Path]] = []
    if not args.no_default:
        from olora_core.default_model import default_model_path

        bases.append(("default", default_model_path()))
    bases += [(path.name, path) for path in args.base or []]
    runs = []
    started = time.perf_counter()
    for (name, base), quantize in ((b, q) for b in bases for q in args.quantizations):
        label = name if quantize == "none" else f"{name}+{quantize}"
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        grid = [(task, args.lr) for task in args.tasks] + [(args.tasks[0], lr) for lr in args.sweep_lrs]
        for task, lr in grid:
            for seed in args.seeds:
                for init in args.inits:
                    if init == "pissa" and quantize != "none":
                        continue  # PEFT cannot run the PiSSA init on a quantized base (pissa-ss can)
                    tic = time.perf_counter()
                    result = run(base, quantize, task, init, lr, seed, args, tokenizer)
                    result["base"] = label
                    runs.append(result)
                    print(f"{label} {task} lr={lr:g} seed={seed} {init:5s}: held-out {result['eval'][0][1]:.3f} -> "
                          f"{result['eval'][-1][1]:.3f} ({time.perf_counter() - tic:.1f} s, total "
                          f"{time.perf_counter() - started:.0f} s)", flush=True)
    rows, thresholds = summarise(runs, args.threshold, args.lr, args.reach)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convergence.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "thresholds": thresholds, "summary": rows,
         "runs": runs, "total_s": time.perf_counter() - started}, indent=1) + "\n")
    plot(runs, args.lr, [args.out / "convergence.png", args.doc_image])
    print(table(rows))
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
