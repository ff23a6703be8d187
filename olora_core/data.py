"""Training data: load a .txt or .jsonl file into token examples, and batch them.

Formats
- ``.txt``: the whole file is tokenized once and cut into chunks of ``seq_len`` tokens
  (loss on every token; a last chunk shorter than 2 tokens is dropped).
- ``.jsonl``: one JSON object per line, either ``{"text": ...}`` (loss on every token, long
  texts are cut into ``seq_len`` chunks) or ``{"prompt": ..., "completion": ...}`` (loss only
  on the completion tokens and the end-of-sequence token; the prompt's labels are -100).
  Blank lines are ignored.

The prompt is tokenized on its own (with the tokenizer's special tokens, e.g. BOS) and the
completion separately (without), so training sees exactly the token boundary that greedy
generation from the prompt sees.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from olora_core.errors import OLoRAError

IGNORE_INDEX = -100  # label value that the causal-LM loss skips
SUPPORTED_SUFFIXES = (".txt", ".jsonl")


class DataError(OLoRAError):
    """A training data file is missing, malformed or empty."""


@dataclass(frozen=True)
class TokenExample:
    """One training sequence: token ids and per-token labels (same length, -100 = no loss)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class TokenDataset:
    """What `load_dataset` returns: the examples plus counts for the training report."""

    path: Path
    kind: str  # "text", "jsonl-text" or "jsonl-prompt-completion"
    examples: tuple[TokenExample, ...]
    records: int  # lines/chunks read before filtering
    dropped_no_loss_tokens: int  # prompt/completion pairs whose completion did not fit in seq_len

    @property
    def loss_tokens(self) -> int:
        return sum(sum(1 for label in ex.labels if label != IGNORE_INDEX) for ex in self.examples)


def load_dataset(path: str | Path, tokenizer, seq_len: int) -> TokenDataset:
    """Read `path` (.txt or .jsonl) and tokenize it into examples of at most `seq_len` tokens."""
    path = Path(path)
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2 tokens, got {seq_len}")
    if not path.is_file():
        raise DataError(f"training data file not found: {path}")
    if path.suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"unsupported training data file type {path.suffix!r} for {path}: "
                        f"use one of {', '.join(SUPPORTED_SUFFIXES)}")
    text = _read_utf8(path)
    if path.suffix == ".txt":
        dataset = _load_plain_text(path, text, tokenizer, seq_len)
    else:
        dataset = _load_jsonl(path, text, tokenizer, seq_len)
    if not dataset.examples:
        detail = ""
        if dataset.dropped_no_loss_tokens:
            detail = (f" ({dataset.dropped_no_loss_tokens} prompt/completion pairs had no completion "
                      f"token left within seq_len={seq_len}; raise --seq-len)")
        raise DataError(f"training data set is empty: {path}{detail}")
    return dataset


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"training data file is not UTF-8 text: {path} (byte {exc.start})") from exc


def _eos_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _chunks(ids: list[int], seq_len: int) -> list[list[int]]:
    """Cut `ids` into pieces of `seq_len`; a trailing piece of fewer than 2 tokens has no target."""
    pieces = [ids[start:start + seq_len] for start in range(0, len(ids), seq_len)]
    return [piece for piece in pieces if len(piece) >= 2]


def _full_loss(ids: list[int]) -> TokenExample:
    return TokenExample(input_ids=tuple(ids), labels=tuple(ids))


def _load_plain_text(path: Path, text: str, tokenizer, seq_len: int) -> TokenDataset:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"] if text.strip() else []
    examples = tuple(_full_loss(piece) for piece in _chunks(ids, seq_len))
    return TokenDataset(path=path, kind="text", examples=examples, records=len(examples),
                        dropped_no_loss_tokens=0)


def _load_jsonl(path: Path, text: str, tokenizer, seq_len: int) -> TokenDataset:
    examples: list[TokenExample] = []
    kinds: set[str] = set()
    records = 0
    dropped = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        record = _parse_record(path, line_no, line)
        records += 1
        if "text" in record:
            kinds.add("jsonl-text")
            ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"] + _eos_ids(tokenizer)
            examples.extend(_full_loss(piece) for piece in _chunks(ids, seq_len))
        else:
            kinds.add("jsonl-prompt-completion")
            example = _prompt_completion_example(record["prompt"], record["completion"], tokenizer, seq_len)
            if example is None:
                dropped += 1
            else:
                examples.append(example)
    kind = kinds.pop() if len(kinds) == 1 else ("jsonl-mixed" if kinds else "jsonl")
    return TokenDataset(path=path, kind=kind, examples=tuple(examples), records=records,
                        dropped_no_loss_tokens=dropped)


def _parse_record(path: Path, line_no: int, line: str) -> dict:
    where = f"{path}, line {line_no}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"bad JSON in {where}: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "text" in record:
        fields = ("text",)
    elif "prompt" in record or "completion" in record:
        fields = ("prompt", "completion")
    else:
        raise DataError(f"{where}: expected a 'text' key or 'prompt' and 'completion' keys, "
                        f"got keys {sorted(record)}")
    for field in fields:
        if field not in record:
            raise DataError(f"{where}: missing key {field!r}")
        if not isinstance(record[field], str):
            raise DataError(f"{where}: {field!r} must be a string, got {type(record[field]).__name__}")
    if not record[fields[-1]]:
        raise DataError(f"{where}: {fields[-1]!r} is empty")
    return record


def _prompt_completion_example(prompt: str, completion: str, tokenizer, seq_len: int) -> TokenExample | None:
    """Prompt labels are -100; completion (+ EOS) labels are the tokens. None if no label fits."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + _eos_ids(tokenizer)
    input_ids = (prompt_ids + completion_ids)[:seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:seq_len]
    # The label of position 0 is never predicted (the loss shifts by one).
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return TokenExample(input_ids=tuple(input_ids), labels=tuple(labels))


def collate(examples: list[TokenExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into tensors: input_ids, attention_mask, labels, each (B, T)."""
    longest = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)  # (B, T)
    for row, ex in enumerate(examples):
        length = len(ex.input_ids)
        input_ids[row, :length] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :length] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class SeededBatches:
    """Endless batches in an order fixed by `seed`: a fresh permutation of the data set per epoch."""

    def __init__(self, examples: tuple[TokenExample, ...], batch_size: int, seed: int, pad_token_id: int):
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        self.examples = examples
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.epoch = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        picked: list[TokenExample] = []
        while len(picked) < self.batch_size:
            if not self.order:
                self.order = torch.randperm(len(self.examples), generator=self.generator).tolist()
                self.epoch += 1
            picked.append(self.examples[self.order.pop()])
        return collate(picked, self.pad_token_id)
