#!/usr/bin/env python
"""Build the embedded default model (olora_core/assets/default_model/) from scratch, offline.

What it does, in order:
  1. corpus: docstrings (``ast``) and comment blocks (``tokenize``) of the Python standard library
     that runs this script (``sysconfig.get_paths()["stdlib"]``); split train/eval by source file.
  2. tokenizer: a byte-level BPE (vocab 2048) trained with ``tokenizers`` on the train split, wrapped
     as a transformers fast tokenizer (bos/eos/pad, a small chat template).
  3. model: a ~3.4M-parameter Llama (hidden 256, 4 layers, 4 heads / 2 KV heads, tied embeddings),
     pretrained with AdamW + linear warmup + cosine decay on packed 128-token blocks, on one CPU thread.
  4. writes the Hugging Face directory atomically (temp dir beside the target, then rename).

Rebuild (the command used for the shipped model is in docs/default-model.md):
    nice -n 10 .venv/bin/python scripts/build_default_model.py --out olora_core/assets/default_model

The result is reproducible for a given torch build and thread count, not bit-identical across machines;
after a rebuild update DEFAULT_MODEL_SHA256 in olora_core/default_model.py.
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import pathlib
import random
import shutil
import sys
import sysconfig
import tempfile
import time
import tokenize
from dataclasses import dataclass

import torch
from tqdm import tqdm

# Parts of the stdlib whose "docs" are not prose (codec tables, installer data, 2to3 test inputs).
EXCLUDED_DIRS = {"site-packages", "__pycache__", "encodings", "ensurepip", "pydoc_data", "data", "lib2to3"}

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Documented default chat format: "<s><|user|>\n{content}\n<|assistant|>\n{content}</s>\n" ...
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SAMPLE_PROMPTS = ["Return the", "Create a new", "If the file", "This module provides"]


@dataclass
class BuildConfig:
    out: pathlib.Path
    steps: int = 2400
    seed: int = 0
    threads: int = 1
    minutes: float = 27.0          # wall-clock ceiling for the training loop (the cosine ends there)
    vocab_size: int = 2048
    seq_len: int = 128
    batch_size: int = 16
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    eval_every: int = 250
    eval_batches: int = 16
    eval_fraction: float = 0.05    # share of source files held out for eval


# ---------------------------------------------------------------- corpus


def stdlib_source_files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.rglob("*.py") if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts))


def file_docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 12:
                docs.append(doc)
    return docs


def is_prose(text: str) -> bool:
    """Comment blocks worth keeping: mostly letters/spaces and a few words (drops commented-out code)."""
    if len(text) < 20 or len(text.split()) < 4:
        return False
    wordy = sum(c.isalpha() or c.isspace() or c in ".,;:'\"-()?!" for c in text)
    return wordy / len(text) >= 0.9


def file_comment_blocks(path: pathlib.Path) -> list[str]:
    """Consecutive full-line comments joined into one block each ('#' and one space stripped)."""
    blocks, lines, last_row = [], [], -2
    try:
        with open(path, "rb") as f:
            for tok in tokenize.tokenize(f.readline):
                if tok.type != tokenize.COMMENT or tok.line.strip() != tok.string.strip():
                    continue  # trailing comments after code are mostly terse; keep full-line ones
                text = tok.string.lstrip("#")
                text = text[1:] if text.startswith(" ") else text
                if tok.start[0] != last_row + 1 and lines:
                    blocks.append("\n".join(lines))
                    lines = []
                if text.strip("-=*#~_ ") and not text.startswith(("!", "-*-")):
                    lines.append(text.rstrip())
                last_row = tok.start[0]
    except (tokenize.TokenError, SyntaxError, UnicodeDecodeError, IndentationError):
        pass
    if lines:
        blocks.append("\n".join(lines))
    return [b for b in blocks if is_prose(b)]


def build_corpus(root: pathlib.Path, seed: int, eval_fraction: float) -> tuple[list[str], list[str]]:
    """(train documents, eval documents); the split is by source file so eval text is unseen."""
    files = stdlib_source_files(root)
    random.Random(seed).shuffle(files)
    n_eval = max(1, int(len(files) * eval_fraction))
    train, evals = [], []
    for i, path in enumerate(tqdm(files, desc="corpus", unit="file", mininterval=2)):
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs = file_docstrings(source) + file_comment_blocks(path)
        (evals if i < n_eval else train).extend(d for d in docs if d.isascii())
    return train, evals


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS, clean_up_tokenization_spaces=False,
        model_max_length=512, padding_side="left")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def pack_blocks(docs: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """All documents as `<s> text </s>` in one stream, cut into (N, seq_len) blocks (tail dropped)."""
    stream: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(docs):  # post-processor adds <s>
        stream.extend(encoding.ids)
        stream.append(tokenizer.eos_token_id)
    n_blocks = len(stream) // seq_len
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)  # (N, T)


# ---------------------------------------------------------------- model + training


def make_model(tokenizer, seed: int):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64)
    return model


def lr_factor(step: int, progress: float, cfg: BuildConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine from 1 to `min_lr_ratio` as `progress` goes 0 -> 1."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def eval_loss(model, blocks: torch.Tensor, cfg: BuildConfig) -> float:
    model.eval()
    n = min(len(blocks), cfg.eval_batches * cfg.batch_size)
    losses = [model(input_ids=blocks[i:i + cfg.batch_size], labels=blocks[i:i + cfg.batch_size]).loss.item()
              for i in range(0, n, cfg.batch_size)]
    model.train()
    return sum(losses) / len(losses)


def train(model, train_blocks: torch.Tensor, eval_blocks: torch.Tensor, cfg: BuildConfig) -> dict:
    """AdamW on shuffled blocks. The cosine follows whichever runs out first, `steps` or `minutes`, so a
    slower machine still ends with an annealed model (then the step count, not the recipe, differs)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.peak_lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train_blocks), generator=gen)
    cursor, ema, start, budget_s = 0, None, time.monotonic(), cfg.minutes * 60
    model.train()
    bar = tqdm(total=cfg.steps, desc="pretrain", unit="step", mininterval=5)
    step = 0
    while True:
        post_warmup = max(0, step - cfg.warmup_steps)
        step_progress = post_warmup / max(1, cfg.steps - cfg.warmup_steps)
        time_progress = (time.monotonic() - start) / budget_s
        progress = max(step_progress, time_progress if step >= cfg.warmup_steps else 0.0)
        if step >= cfg.steps or progress >= 1.0:
            break
        lr = cfg.peak_lr * lr_factor(step, progress, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(train_blocks), generator=gen), 0
        batch = train_blocks[order[cursor:cursor + cfg.batch_size]]  # (B, T)
        cursor += cfg.batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.2e}", refresh=False)
        if step % cfg.eval_every == 0:
            tqdm.write(f"step {step}: train loss (ema) {ema:.4f}  eval loss {eval_loss(model, eval_blocks, cfg):.4f}"
                       f"  lr {lr:.2e}  {(time.monotonic() - start) / 60:.1f} min")
    bar.close()
    if step < cfg.steps:
        tqdm.write(f"time budget of {cfg.minutes} min reached after {step} of {cfg.steps} steps")
    return {"steps_done": step, "train_loss_ema": ema, "eval_loss": eval_loss(model, eval_blocks, cfg),
            "train_minutes": (time.monotonic() - start) / 60}


def greedy_samples(model, tokenizer, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    model.eval()
    outs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        outs.append(tokenizer.decode(out[0], skip_special_tokens=True))
    return outs


def save_atomically(model, tokenizer, out: pathlib.Path) -> None:
    """Write into a temp dir beside `out`, then swap it in; a failure leaves `out` untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = out.parent / f".{out.name}.old"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; package data should be world-readable
        for file in tmp.iterdir():
            file.chmod(0o644)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def parse_args(argv: list[str] | None) -> BuildConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=pathlib.Path, required=True, help="output model directory")
    p.add_argument("--steps", type=int, default=BuildConfig.steps, help="optimizer steps")
    p.add_argument("--seed", type=int, default=BuildConfig.seed)
    p.add_argument("--threads", type=int, default=BuildConfig.threads, help="torch CPU threads")
    p.add_argument("--minutes", type=float, default=BuildConfig.minutes,
                   help="wall-clock budget for pretraining; training stops early when exceeded")
    a = p.parse_args(argv)
    return BuildConfig(out=a.out, steps=a.steps, seed=a.seed, threads=a.threads, minutes=a.minutes)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    t0 = time.monotonic()
    train_docs, eval_docs = build_corpus(root, cfg.seed, cfg.eval_fraction)
    print(f"corpus: {root} -> {len(train_docs)} train docs ({sum(map(len, train_docs)) / 1e6:.2f} M chars), "
          f"{len(eval_docs)} eval docs ({sum(map(len, eval_docs)) / 1e6:.2f} M chars)")
    tokenizer = train_tokenizer(train_docs, cfg.vocab_size)
    train_blocks = pack_blocks(train_docs, tokenizer, cfg.seq_len)
    eval_blocks = pack_blocks(eval_docs, tokenizer, cfg.seq_len)
    print(f"tokenizer: vocab {len(tokenizer)}; train {train_blocks.numel() / 1e6:.2f} M tokens, "
          f"eval {eval_blocks.numel() / 1e6:.2f} M tokens; prep took {time.monotonic() - t0:.0f} s")
    model = make_model(tokenizer, cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    tokens_planned = cfg.steps * cfg.batch_size * cfg.seq_len
    print(f"model: {n_params:,} parameters; {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} = "
          f"{tokens_planned / 1e6:.2f} M tokens ({tokens_planned / train_blocks.numel():.2f} epochs); "
          f"threads {torch.get_num_threads()}")
    stats = train(model, train_blocks, eval_blocks, cfg)
    print(f"done: {stats['steps_done']} steps in {stats['train_minutes']:.1f} min; "
          f"final train loss (ema) {stats['train_loss_ema']:.4f}, eval loss {stats['eval_loss']:.4f}")
    for text in greedy_samples(model, tokenizer, SAMPLE_PROMPTS):
        print(f"sample: {text!r}")
    save_atomically(model, tokenizer, cfg.out)
    print(f"saved to {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
