"""Training helper: fine-tune an OLoRA (or PiSSA / plain LoRA) adapter with PEFT and convert it.

`train(cfg)` writes into ``cfg.out``::

    initial/            the untrained adapter, saved BEFORE training (PEFT, safetensors)
    trained/            the trained adapter as PEFT saves it (for OLoRA/PiSSA: still relative to
                        the *mutated* base; PEFT re-runs the init on the base when it loads it)
    converted/          a plain LoRA adapter (rank 2r) for the ORIGINAL base (not for init="lora")
    train_report.json   config, data set counts, loss per step, timings, conversion summary

With ``share_safe=True`` (OLoRA/PiSSA; `olora_core.share_safe`) the base is never mutated: ``initial/`` and
``trained/`` are plain LoRA adapters of rank 2r for the unmodified (possibly quantized) base - ``trained/`` is the
trained model itself, on the base the server shares - and nothing is converted.

``quantize`` ("nf4", "fp4", "int8") loads the base with bitsandbytes exactly as `olora serve --quantize` does
(`olora_core.bnb_load`). Without share_safe, OLoRA then follows PEFT (the residual is re-quantized) and
``converted/`` is PEFT's conversion, which is not exact on a quantized base (docs/beyond-peft.md).

Why `converted/`: PEFT's OLoRA init subtracts ``scaling * B0 @ A0`` from every targeted base
weight, so ``trained/`` only reproduces the trained model on a base that went through the same
init. `olora_core.convert` folds the initial factors into the adapter so it runs on the untouched
base weights - what a server that shares one base between many adapters needs.

Reproducible on CPU: the same config and seed give bitwise-equal adapters (seeded init, seeded
data order, no dropout). The loop is plain torch: AdamW at a constant learning rate, gradients
clipped to norm 1.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from olora_core.bnb_load import avoid_unsupported_cpu_4bit_packing, bnb_quantization_config
from olora_core.data import SeededBatches, TokenDataset, load_dataset
from olora_core.dtypes import DTYPE_NAMES, QUANTIZATIONS, torch_dtype
from olora_core.errors import OLoRAError

INIT_CHOICES = ("olora", "pissa", "lora")
REPORT_NAME = "train_report.json"


class TrainError(OLoRAError):
    """A training run cannot start or finish (bad config, base model, output directory)."""


@dataclass
class TrainConfig:
    """Everything one training run needs. `targets` is module names or the string "all-linear"."""

    base: str | Path
    data: str | Path
    out: str | Path
    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | str = ("q_proj", "v_proj")
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0
    init: str = "olora"
    use_rslora: bool = False
    dtype: str = "float32"  # dtype the base is loaded in (the compute dtype of a quantized base)
    quantize: str = "none"  # none | nf4 | fp4 | int8: bitsandbytes, as `olora serve --quantize`
    share_safe: bool = False  # OLoRA/PiSSA without mutating the base: trained/ is a plain rank-2r LoRA
    threads: int | None = None  # torch CPU threads during the run (None: leave torch's setting)
    overwrite: bool = False  # replace an existing training output directory in `out`
    progress: bool = True  # show a tqdm bar on stderr

    def validate(self) -> None:
        if self.init not in INIT_CHOICES:
            raise TrainError(f"init must be one of {', '.join(INIT_CHOICES)}, got {self.init!r}")
        if self.dtype not in DTYPE_NAMES:
            raise TrainError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.quantize not in QUANTIZATIONS:
            raise TrainError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {self.quantize!r}")
        if self.share_safe and self.init == "lora":
            raise TrainError("share_safe applies to init olora or pissa (a plain LoRA never mutates the base)")
        if self.init == "pissa" and self.quantize != "none" and not self.share_safe:
            raise TrainError("PEFT cannot run the PiSSA init on a quantized base; use share_safe=True "
                             "(--share-safe), which keeps the base as it is")
        for name in ("r", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise TrainError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.threads is not None and self.threads < 1:
            raise TrainError(f"threads must be at least 1, got {self.threads}")
        if not self.lr > 0:
            raise TrainError(f"lr must be positive, got {self.lr}")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            raise TrainError(f"targets must be a list of module names or 'all-linear', got {self.targets!r}")
        if not isinstance(self.targets, str) and not self.targets:
            raise TrainError("targets is empty: name at least one module (e.g. q_proj) or use 'all-linear'")

    def to_json_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("base", "data", "out"):
            out[key] = str(Path(out[key]).resolve())
        out["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        return out


@dataclass
class TrainReport:
    """What a run did; also written to ``out/train_report.json``."""

    config: dict
    out_dir: str
    initial_dir: str
    trained_dir: str
    converted_dir: str | None
    conversion: dict | None  # the converter's report, None when nothing was converted
    conversion_note: str
    dataset: dict
    trainable_params: int
    losses: list[float]
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def last_loss(self) -> float:
        return self.losses[-1]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str) + "\n"


def train(cfg: TrainConfig) -> TrainReport:
    """Train an adapter on `cfg.data` over the base in `cfg.base`; see the module docstring."""
    cfg.validate()
    out_dir = Path(cfg.out).resolve()
    _check_out_dir(out_dir, cfg.overwrite)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    model, tokenizer, dataset = prepare_training(cfg, timings)

    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tic = time.perf_counter()
        _save_adapter(model, staging / "initial", cfg.share_safe)  # before any step
        timings["save_initial_s"] = time.perf_counter() - tic

        tic = time.perf_counter()
        losses = train_steps(model, dataset, tokenizer, cfg)
        timings["train_s"] = time.perf_counter() - tic

        tic = time.perf_counter()
        _save_adapter(model, staging / "trained", cfg.share_safe)
        timings["save_trained_s"] = time.perf_counter() - tic
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    report = TrainReport(
        config=cfg.to_json_dict(), out_dir=str(out_dir), initial_dir=str(out_dir / "initial"),
        trained_dir=str(out_dir / "trained"), converted_dir=None, conversion=None, conversion_note="",
        dataset=_dataset_summary(dataset),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        losses=losses, timings_s=timings,
    )
    del model  # its base weights are mutated (OLoRA/PiSSA); nothing below may use them
    try:
        _convert_into(report, cfg)
    finally:
        timings["total_s"] = time.perf_counter() - started
        _write_atomic(out_dir / REPORT_NAME, report.to_json())
    return report


def prepare_training(cfg: TrainConfig, timings: dict[str, float] | None = None):
    """(PEFT model ready to train, tokenizer, dataset) for `cfg`: base loaded (and quantized), adapter(s)
    initialised. `train_steps` then trains it in place; `train` = both + the directories and the report."""
    from peft import get_peft_model  # heavy imports stay out of `olora --help`
    from transformers import AutoTokenizer

    cfg.validate()
    timings = {} if timings is None else timings
    tic = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(_base_dir(cfg.base)), local_files_only=True)
    dataset = load_dataset(cfg.data, tokenizer, cfg.seq_len)
    model = load_base(cfg)
    timings["load_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    torch.manual_seed(cfg.seed)  # plain LoRA draws A at random
    if cfg.share_safe:
        from olora_core.share_safe import share_safe_model

        model = share_safe_model(model, _lora_config(cfg), cfg.init)
    else:
        model = get_peft_model(model, _lora_config(cfg))
    _check_ranks(model, cfg.r)
    timings["init_s"] = time.perf_counter() - tic
    return model, tokenizer, dataset


def _base_dir(base: str | Path) -> Path:
    path = Path(base)
    if not (path / "config.json").is_file():
        raise TrainError(f"base model directory has no config.json: {path} "
                         "(give a local Hugging Face model directory; nothing is downloaded)")
    return path.resolve()


def load_base(cfg: TrainConfig):
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(cfg.dtype)
    quantization = bnb_quantization_config(cfg.quantize, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        str(_base_dir(cfg.base)), dtype=dtype, local_files_only=True, use_safetensors=True,
        **({"quantization_config": quantization, "device_map": {"": "cpu"}} if quantization else {}))
    if cfg.quantize in ("nf4", "fp4"):
        avoid_unsupported_cpu_4bit_packing(model)  # the same CPU kernels as the server
    model.config.use_cache = False
    return model


def _save_adapter(model, path: Path, share_safe: bool) -> None:
    if share_safe:
        from olora_core.share_safe import save_stacked

        save_stacked(model, path)  # the rank-2r plain LoRA: both active adapters in one
    else:
        model.save_pretrained(str(path), safe_serialization=True)


def _lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    init_lora_weights: bool | str = True if cfg.init == "lora" else cfg.init
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, use_rslora=cfg.use_rslora,
        target_modules=cfg.targets if isinstance(cfg.targets, str) else list(cfg.targets),
        init_lora_weights=init_lora_weights, bias="none", task_type="CAUSAL_LM",
    )


def _check_ranks(model, r: int) -> None:
    """PEFT does not check r <= min(in, out); OLoRA then silently builds a smaller A than r."""
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or "default" not in lora_a:
            continue
        weight = lora_a["default"].weight  # (r, in)
        if weight.shape[0] != r:
            raise TrainError(f"rank r={r} does not fit module {name} (its LoRA A has {weight.shape[0]} "
                             f"rows, in/out features limit the rank): lower --r or change --targets")


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """Run with `threads` intra-op CPU threads, then restore (on a busy machine 1 is often fastest)."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_steps(model, dataset: TokenDataset, tokenizer, cfg: TrainConfig) -> list[float]:
    """`cfg.steps` AdamW steps on `model` in place (seeded data order); returns the loss of every step."""
    with _torch_threads(cfg.threads):
        return _train_loop(model, dataset, tokenizer, cfg)


def _train_loop(model, dataset: TokenDataset, tokenizer, cfg: TrainConfig) -> list[float]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    torch.manual_seed(cfg.seed)
    batches = SeededBatches(dataset.examples, cfg.batch_size, cfg.seed, pad_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="train", unit="step", file=sys.stderr, disable=not cfg.progress,
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)
    for _step in bar:
        batch = batches.next_batch()  # input_ids, attention_mask, labels: (B, T)
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise TrainError(f"loss became {loss.item()} at step {len(losses) + 1}: lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    model.eval()
    return losses


def _convert_into(report: TrainReport, cfg: TrainConfig) -> None:
    """Fill report.converted_dir/conversion; the error (if any) is noted in the report and re-raised."""
    init = cfg.init
    if init == "lora":
        report.conversion_note = ("init=lora: trained/ is already a plain LoRA adapter for the original base; "
                                  "nothing to convert")
        return
    if cfg.share_safe:
        report.conversion_note = (f"share-safe {init}: trained/ is a plain LoRA adapter (rank 2r) for the "
                                  "unmodified base, exactly the trained model; nothing to convert")
        return
    from olora_core.convert import convert

    out_dir = Path(report.out_dir)
    tic = time.perf_counter()
    try:
        conversion = convert(out_dir / "initial", out_dir / "trained", out_dir / "converted")
    except OLoRAError as exc:
        report.conversion_note = (f"conversion failed: {exc}; trained/ is kept but needs the {init} init "
                                  "applied to the base (PEFT does that when it loads it)")
        exc.add_note(f"the trained adapter is kept in {out_dir / 'trained'}")
        raise
    finally:
        report.timings_s["convert_s"] = time.perf_counter() - tic
    report.converted_dir = str(out_dir / "converted")
    report.conversion = dataclasses.asdict(conversion) if dataclasses.is_dataclass(conversion) else None
    report.conversion_note = (f"converted/ is a plain LoRA adapter for the ORIGINAL base "
                              f"(the {init} init factors folded in, rank 2r)")
    if cfg.quantize != "none":
        report.conversion_note += (f"; on the {cfg.quantize} base it misses the re-quantization error of PEFT's "
                                   "init (use --share-safe, or `olora convert --quantization`)")


def _dataset_summary(dataset: TokenDataset) -> dict:
    return {"path": str(dataset.path.resolve()), "kind": dataset.kind, "examples": len(dataset.examples),
            "records": dataset.records, "dropped_no_loss_tokens": dataset.dropped_no_loss_tokens,
            "loss_tokens": dataset.loss_tokens}


def _looks_like_train_output(path: Path) -> bool:
    return (path / REPORT_NAME).is_file() or (path / "initial" / "adapter_config.json").is_file()


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        if out_dir.parent.exists() and not out_dir.parent.is_dir():
            raise TrainError(f"parent of the output directory is not a directory: {out_dir.parent}")
        out_dir.parent.mkdir(parents=True, exist_ok=True)  # like `mkdir -p`: runs/NAME works on a fresh clone
        return
    if not out_dir.is_dir():
        raise TrainError(f"output path exists and is not a directory: {out_dir}")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise TrainError(f"output directory is not empty: {out_dir} (pass --overwrite to replace a "
                         "previous training output)")
    if not _looks_like_train_output(out_dir):
        raise TrainError(f"refusing to overwrite {out_dir}: it is not empty and holds no previous "
                         f"training output ({REPORT_NAME} or initial/)")


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished staging dir to `out_dir`, replacing an empty or previous output dir."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "previous")
        try:
            os.replace(staging, out_dir)
        except BaseException:
            os.replace(old / "previous", out_dir)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
